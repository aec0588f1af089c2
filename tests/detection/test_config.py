"""Every YAML config under configs/ loads with the project's keys."""

from __future__ import annotations

from pathlib import Path

import detection  # noqa: F401  (compat shims)
from detection.config import add_cmb_config

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
