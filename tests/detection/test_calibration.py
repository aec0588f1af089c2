"""Per-site test-time zoom: the selection rule on hand-made trials and a CPU run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import detection  # noqa: F401
from detection.calibration import calibrate_zoom, select_mask_thresh, select_zoom
from detection.engine import setup_cfg

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

INSTANT = (Path(__file__).resolve().parents[2] / "configs" / "quick_schedules"
           / "cmb_R_18_FPN_instant_test.yaml")


def _trial(zoom: float, sens: float, mean: float) -> dict[str, float]:
    return {"zoom": zoom, "sensitivity_at_fp": sens, "froc_mean": mean}


def test_select_zoom_prefers_sensitivity_then_froc_then_no_zoom() -> None:
    assert select_zoom([_trial(1.0, 0.6, 0.5), _trial(1.3, 0.8, 0.4)]) == 1.3
    assert select_zoom([_trial(1.0, 0.8, 0.5), _trial(1.3, 0.8, 0.6)]) == 1.3
    # all equal: the zoom closest to 1 (in ratio), so 0.85 beats 1.3
    assert select_zoom([_trial(1.3, 0.7, 0.5), _trial(0.85, 0.7, 0.5)]) == 0.85
    assert select_zoom([_trial(1.15, 0.7, 0.5), _trial(1.0, 0.7, 0.5)]) == 1.0
    assert select_zoom([_trial(1.3, math.nan, math.nan), _trial(1.0, 0.1, 0.1)]) == 1.0
    with pytest.raises(ValueError, match="no zoom"):
        select_zoom([])


def test_select_mask_thresh_prefers_dice_then_the_default() -> None:
    def t(m: float, d: float) -> dict[str, float]:
        return {"mask_thresh": m, "dice": d}

    assert select_mask_thresh([t(0.3, 0.70), t(0.5, 0.65)]) == 0.3
    assert select_mask_thresh([t(0.3, 0.60), t(0.5, 0.65)]) == 0.5
    assert select_mask_thresh([t(0.3, 0.65), t(0.4, 0.65), t(0.5, 0.65)]) == 0.5
    assert select_mask_thresh([t(0.3, 0.65), t(0.4, 0.65)], default=0.5) == 0.4
    assert select_mask_thresh([t(0.3, math.nan), t(0.5, 0.1)]) == 0.5
    with pytest.raises(ValueError, match="no mask"):
        select_mask_thresh([])


def _case(root: Path, pid: str) -> dict[str, str]:
    rng = np.random.default_rng(len(pid))
    data = rng.normal(100, 5, (40, 48, 10)).astype(np.float32)
    data[8:32, 8:40, 2:8] += 50
    data[15:18, 20:23, 4:6] = 5
    mask = np.zeros(data.shape, np.uint8)
    mask[15:18, 20:23, 4:6] = 1
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    (root / pid).mkdir()
    nib.save(nib.Nifti1Image(data, affine), root / pid / "swi.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), root / pid / "cmb.nii.gz")
    return {"patient_id": pid, "swi": str(root / pid / "swi.nii.gz"),
            "cmb_mask": str(root / pid / "cmb.nii.gz"), "brain_mask": ""}


def test_calibrate_zoom_predicts_each_zoom_and_writes_the_selection(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    cfg = setup_cfg(INSTANT, ["CMB.DATA_ROOT", "/nonexistent", "CMB.TARGET_SPACING", "1.0",
                              "CMB.INFER.SCORE_THRESH", "0.0"])
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    cohort = pd.DataFrame([_case(tmp_path, "P1"), _case(tmp_path, "P2")])
    out = tmp_path / "calib"
    sel = calibrate_zoom(cfg, str(tmp_path / "model.pth"), cohort, out, zooms=(1.0, 1.5),
                         progress=False)
    assert [t["zoom"] for t in sel["trials"]] == [1.0, 1.5]
    assert sel["selected_zoom"] == select_zoom(sel["trials"])
    assert sel["opts"] == ["CMB.INFER.ZOOM", sel["selected_zoom"]]
    for z in ("1", "1.5"):
        for pid in ("P1", "P2"):
            assert (out / f"zoom_{z}" / pid / "lesions.csv").is_file()
        assert (out / f"zoom_{z}" / "evaluation" / "metrics.json").is_file()
    saved = json.loads((out / "zoom_selection.json").read_text())
    assert saved["selected_zoom"] == sel["selected_zoom"] and saved["patients"] == ["P1", "P2"]
    assert all(t["n_reference_lesions"] == 2 for t in saved["trials"])
    assert saved["n_reference_lesions"] == 2
    assert "only 2 reference lesions" in caplog.text  # too few for a firm choice
    assert not list(out.glob(".*"))  # no temporary files left

    assert "mask_trials" not in saved and not list(out.glob("zoom_*_mask_*"))

    # Mask thresholds: predicted at the selected zoom only, the config's 0.5 reused.
    out2 = tmp_path / "calib_mask"
    sel2 = calibrate_zoom(cfg, str(tmp_path / "model.pth"), cohort, out2, zooms=(1.0,),
                          mask_threshs=(0.3,), progress=False)
    assert [m["mask_thresh"] for m in sel2["mask_trials"]] == [0.3, 0.5]
    assert sel2["mask_trials"][1]["dice"] == sel2["trials"][0]["dice"]
    assert sel2["selected_mask_thresh"] == select_mask_thresh(sel2["mask_trials"])
    assert sel2["opts"] == ["CMB.INFER.ZOOM", 1.0,
                            "CMB.INFER.MASK_THRESH", sel2["selected_mask_thresh"]]
    dirs = sorted(p.name for p in out2.glob("zoom_*") if p.is_dir())
    assert dirs == ["zoom_1", "zoom_1_mask_0.3"]
    pred3 = out2 / "zoom_1_mask_0.3"
    assert all((pred3 / pid / "lesions.csv").is_file() for pid in ("P1", "P2"))
    saved2 = json.loads((out2 / "zoom_selection.json").read_text())
    assert saved2["selected_mask_thresh"] == sel2["selected_mask_thresh"]
    for bad in ((0.0,), (1.0,), (0.3, 0.3)):
        with pytest.raises(ValueError, match="mask thresholds"):
            calibrate_zoom(cfg, str(tmp_path / "model.pth"), cohort, out2, zooms=(1.0,),
                           mask_threshs=bad)

    with pytest.raises(ValueError, match="duplicate"):
        calibrate_zoom(cfg, str(tmp_path / "model.pth"), cohort, out, zooms=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        calibrate_zoom(cfg, str(tmp_path / "model.pth"), cohort, out, zooms=(0.0,))
    unlabelled = cohort.assign(cmb_mask=["", str(tmp_path / "P2" / "cmb.nii.gz")])
    with pytest.raises(ValueError, match="cmb_mask.*P1"):
        calibrate_zoom(cfg, str(tmp_path / "model.pth"), unlabelled, out, zooms=(1.0,))
