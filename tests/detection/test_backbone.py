"""The light ResNet-FPN backbone: shapes, widths and config validation."""

from __future__ import annotations

from pathlib import Path

import detection  # noqa: F401
from detection.engine import setup_cfg

import pytest
import torch
from detectron2.modeling import build_backbone

CPU_CFG = Path(__file__).resolve().parents[2] / "configs" / "CMB-RCNN-Lite-FPN-cpu.yaml"


def test_lite_backbone_levels_and_widths() -> None:
    cfg = setup_cfg(CPU_CFG, ["CMB.DATA_ROOT", "/nonexistent"])
    backbone = build_backbone(cfg)
    feats = backbone(torch.zeros(1, 3, 160, 192))
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    for name, f in feats.items():
        assert f.shape[1] == cfg.MODEL.FPN.OUT_CHANNELS
        assert f.shape[2] == -(-160 // strides[name]) and f.shape[3] == -(-192 // strides[name])
    widths = [backbone.bottom_up._out_feature_channels[f"res{i}"] for i in range(2, 6)]
    assert widths == list(cfg.CMB.LITE.STAGE_WIDTHS)
    n_params = sum(p.numel() for p in backbone.parameters())
    assert n_params < 2_000_000  # far lighter than R-18-FPN (~12M)


@pytest.mark.parametrize(
    "widths,blocks", [([32, 64, 64, 128], [1, 1, 1, 1]), ([32, 64, 96], [1, 1, 1]),
                      ([32, 64, 96, 128], [1, 0, 1, 1])]
)
def test_lite_backbone_rejects_bad_widths(widths, blocks) -> None:
    cfg = setup_cfg(CPU_CFG, ["CMB.DATA_ROOT", "/nonexistent"])
    cfg.CMB.LITE.STAGE_WIDTHS = widths
    cfg.CMB.LITE.BLOCKS = blocks
    with pytest.raises(ValueError, match="CMB.LITE"):
        build_backbone(cfg)
