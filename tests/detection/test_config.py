"""Every YAML config under configs/ loads with the project's keys."""

from __future__ import annotations

from pathlib import Path

import detection  # noqa: F401  (compat shims)
from detection.config import EXPORT_PARAM_KEYS, add_cmb_config, export_params
from detection.data.export_coco import ExportParams

import pytest
from detectron2.config import get_cfg

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# configs/mil holds MIL hyper-parameters and configs/centers synthetic scanner profiles;
# everything else is a Detectron2 config.
NOT_DETECTRON2 = ("mil", "centers")
DETECTRON2_CONFIGS = sorted(
    p for p in CONFIG_DIR.rglob("*.yaml")
    if p.relative_to(CONFIG_DIR).parts[0] not in NOT_DETECTRON2
)


def test_there_are_configs() -> None:
    assert any("instant_test" in p.name for p in DETECTRON2_CONFIGS)
    assert (CONFIG_DIR / "Base-CMB-RCNN-FPN.yaml") in DETECTRON2_CONFIGS


@pytest.mark.parametrize("path", DETECTRON2_CONFIGS, ids=lambda p: p.name)
def test_config_loads(path: Path) -> None:
    cfg = get_cfg()
    add_cmb_config(cfg)
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1
    assert cfg.MODEL.MASK_ON
    # Small-object anchors: the first FPN level starts at 4-8 px.
    assert 4 <= cfg.MODEL.ANCHOR_GENERATOR.SIZES[0][0] <= 8
    assert "p2" in cfg.MODEL.RPN.IN_FEATURES
    # Weights must never point at a download.
    assert not str(cfg.MODEL.WEIGHTS).startswith(("http", "detectron2://"))


def test_add_cmb_config_requires_keys_before_merge(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("CMB:\n  NOT_A_KEY: 1\n")
    cfg = get_cfg()
    add_cmb_config(cfg)
    with pytest.raises(KeyError):
        cfg.merge_from_file(str(bad))


def _cmb_cfg():
    cfg = get_cfg()
    add_cmb_config(cfg)
    return cfg


def test_export_params_follow_every_slice_key() -> None:
    """One mapping from a config to the slice preparation: each key moves its own field,
    and every field a config sets is named."""
    cfg = _cmb_cfg()
    base = export_params(cfg)
    assert isinstance(base, ExportParams)
    assert set(EXPORT_PARAM_KEYS) <= set(base.as_dict())
    changed = {"CMB.TARGET_SPACING": 0.27, "CMB.CONTEXT_OFFSET": 2,
               "CMB.BRAIN_MARGIN_MM": 3.0, "CMB.BIAS_DEGREE": 2,
               "CMB.INTENSITY_PERCENTILES": (0.0, 98.0)}
    assert set(changed) == set(EXPORT_PARAM_KEYS.values())
    for field, key in EXPORT_PARAM_KEYS.items():
        c = cfg.clone()
        c.merge_from_list([key, changed[key]])
        got, want = export_params(c).as_dict(), base.as_dict()
        diff = {k for k in want if got[k] != want[k]}
        assert diff == {field}, key
        assert got[field] == (list(changed[key]) if field == "percentiles" else changed[key])


def test_export_params_zoom_divides_the_spacing_only() -> None:
    cfg = _cmb_cfg()
    cfg.CMB.TARGET_SPACING = 0.35
    zoomed = export_params(cfg, zoom=1.25)
    assert zoomed.target_spacing == pytest.approx(0.28)
    assert {**zoomed.as_dict(), "target_spacing": 0.35} == export_params(cfg).as_dict()
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="zoom"):
            export_params(cfg, zoom=bad)
    cfg.CMB.INTENSITY_PERCENTILES = (99.0, 1.0)
    with pytest.raises(ValueError, match="percentiles"):
        export_params(cfg)
