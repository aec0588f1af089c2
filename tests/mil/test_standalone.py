"""``mil`` must import in a process where Detectron2 cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "detectron2" or name.startswith("detectron2."):
                raise ImportError("detectron2 is blocked in this test")
            if name == "detection" or name.startswith("detection."):
                raise ImportError("detection is blocked in this test")
            return None

    sys.meta_path.insert(0, _Block())
    """
)


def test_import_mil_without_detectron2() -> None:
    code = BLOCKER + textwrap.dedent(
        """
        import pkgutil, importlib
        import mil
        for info in pkgutil.walk_packages(mil.__path__, "mil."):
            importlib.import_module(info.name)
        assert not any(m.startswith("detectron2") for m in sys.modules), sorted(sys.modules)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_blocker_really_blocks() -> None:
    code = BLOCKER + "import detectron2\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "blocked" in proc.stderr


def test_mil_tools_import_without_detectron2() -> None:
    """The MIL tools import (and parse --help) with Detectron2 blocked."""
    code = BLOCKER + textwrap.dedent(
        """
        import contextlib, io, runpy
        for tool in ("tools/train_mil.py", "tools/evaluate_mil.py"):
            ns = runpy.run_path(tool, run_name="not_main")
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
                ns["main"](["--help"])
            assert "--output" in buf.getvalue(), tool
            import mil.train  # what main() imports lazily
        assert not any(m.startswith("detectron2") for m in sys.modules)
        print("ok")
        """
    )
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
