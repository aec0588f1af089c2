# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp

.PHONY: install test demo lint bench clean-venv

install: $(STAMP)

# Re-run only when the packaging or the installer changed.
$(STAMP): setup.py tools/install_detectron2.py Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python tools/install_detectron2.py
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/python tools/run_pipeline.py

lint: install
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
