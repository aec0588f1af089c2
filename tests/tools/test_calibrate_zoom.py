"""tools/calibrate_zoom.py: bad input ends with a message naming the file and the problem."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
INSTANT = REPO / "configs" / "quick_schedules" / "cmb_R_18_FPN_instant_test.yaml"


def _tool():
    spec = importlib.util.spec_from_file_location("calibrate_zoom_tool",
                                                  REPO / "tools" / "calibrate_zoom.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_calibration_needs_masks_and_the_named_centre(tmp_path: Path) -> None:
    tool = _tool()
    swi = tmp_path / "swi.nii.gz"
    swi.write_bytes(b"")
    no_masks = tmp_path / "no_masks.csv"
    pd.DataFrame({"patient_id": ["P1"], "center": ["A"], "label": ["CAA"],
                  "swi": ["swi.nii.gz"]}).to_csv(no_masks, index=False)
    base = ["--config-file", str(INSTANT), "--weights", str(tmp_path / "w.pth"),
            "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"calibrate_zoom: .*no_masks\.csv.*cmb_mask"):
        tool.main(base + ["--manifest", str(no_masks)])
    labelled = tmp_path / "labelled.csv"
    pd.DataFrame({"patient_id": ["P1"], "center": ["A"], "label": ["CAA"],
                  "swi": ["swi.nii.gz"], "cmb_mask": ["swi.nii.gz"]}).to_csv(labelled,
                                                                            index=False)
    with pytest.raises(SystemExit, match=r"no patient of centre\(s\) \['Q'\]"):
        tool.main(base + ["--manifest", str(labelled), "--centers", "Q"])
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_mask_threshs_option(tmp_path: Path, monkeypatch) -> None:
    """No --mask-threshs: the config's threshold only (None); the bare option: the default
    candidates; a value outside (0, 1): a message, nothing written."""
    tool = _tool()
    (tmp_path / "swi.nii.gz").write_bytes(b"")
    labelled = tmp_path / "labelled.csv"
    pd.DataFrame({"patient_id": ["P1"], "center": ["A"], "label": ["CAA"],
                  "swi": ["swi.nii.gz"], "cmb_mask": ["swi.nii.gz"]}).to_csv(labelled,
                                                                            index=False)
    base = ["--config-file", str(INSTANT), "--weights", str(tmp_path / "w.pth"),
            "--output", str(tmp_path / "out"), "--manifest", str(labelled)]
    with pytest.raises(SystemExit, match=r"calibrate_zoom: mask thresholds must be in \(0, 1\)"):
        tool.main(base + ["--mask-threshs", "0.3", "1.5"])
    assert not (tmp_path / "out").exists()

    seen = []

    def fake(cfg, weights, cohort, output, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append(kw["mask_threshs"])
        return {"trials": [], "selected_zoom": 1.0, "opts": ["CMB.INFER.ZOOM", 1.0]}

    monkeypatch.setattr(tool, "calibrate_zoom", fake)
    assert tool.main(base) == 0
    assert tool.main(base + ["--mask-threshs"]) == 0
    assert tool.main(base + ["--mask-threshs", "0.35"]) == 0
    assert seen == [None, list(tool.MASK_THRESHS), [0.35]]
