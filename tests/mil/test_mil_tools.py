"""tools/train_mil.py and tools/evaluate_mil.py end to end, Detectron2 blocked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mil.synthetic_bags import write_synthetic_bags

REPO = Path(__file__).resolve().parents[2]


def _blocker() -> str:
    spec = importlib.util.spec_from_file_location("_mil_standalone",
                                                  Path(__file__).with_name("test_standalone.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.BLOCKER


def _run_tool(tool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = _blocker() + (
        "import runpy\n"
        f"sys.argv = [{tool!r}] + {args!r}\n"
        f"runpy.run_path({str(REPO / tool)!r}, run_name='__main__')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_train_and_evaluate_tools(tmp_path: Path) -> None:
    index = write_synthetic_bags(tmp_path / "bags", {"A": 15, "B": 15, "C": 9}, seed=1,
                                 crop_size=16)
    out = tmp_path / "mil"
    proc = _run_tool("tools/train_mil.py", [
        "--index", str(index), "--output", str(out), "--external-center", "C",
        "--config", str(REPO / "configs/mil/quick_test.yaml"), "--max-epochs", "3",
        "--n-bootstrap", "100", "--opts", "min_epochs=1",
    ], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["external"]["model"]["n"] == 9
    assert summary["external"]["baseline"]["n"] == 9
    for name in ("predictions.csv", "baseline_predictions.csv", "attention.csv", "metrics.json",
                 "roc_cv.png", "confusion_external.png", "model/model.pth", "model/model.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["max_epochs"] == 3 and metrics["config"]["n_bootstrap"] == 100

    ev = tmp_path / "eval"
    proc = _run_tool("tools/evaluate_mil.py", [
        "--model", str(out / "model"), "--index", str(index), "--output", str(ev),
        "--center", "C", "--n-bootstrap", "100",
    ], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["model"]["n"] == 9
    a = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    b = pd.read_csv(ev / "predictions.csv", keep_default_na=False)
    a = a[a["fold"] == "external"].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6)
