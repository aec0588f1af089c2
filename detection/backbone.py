"""A light ResNet-FPN backbone for training from scratch on CPU.

Detectron2's R-18 fixes its widths at 64-512 channels; microbleeds on 2.5D SWI slices
need far less capacity, and CPU training and inference pay for every channel. This
backbone reuses Detectron2's own building blocks (``BasicStem``, ``BasicBlock``,
``ResNet``, ``FPN``) with widths and depths from ``cfg.CMB.LITE`` so the rest of the
Mask R-CNN (RPN on P2-P6, ROI heads on P2-P5) is unchanged.
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = ["build_cmb_lite_resnet", "build_cmb_lite_fpn_backbone"]


def build_cmb_lite_resnet(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """ResNet of BasicBlocks with ``CMB.LITE.STEM_WIDTH``, ``STAGE_WIDTHS`` and ``BLOCKS``."""
    lite = cfg.CMB.LITE
    norm = cfg.MODEL.RESNETS.NORM
    widths, blocks = list(lite.STAGE_WIDTHS), list(lite.BLOCKS)
    if len(widths) != 4 or len(blocks) != 4:
        raise ValueError(
            f"CMB.LITE.STAGE_WIDTHS and CMB.LITE.BLOCKS need 4 entries (res2..res5), "
            f"got {widths} and {blocks}"
        )
    # BasicBlock only projects its shortcut when the width changes, so each strided
    # stage (res3..res5) must widen.
    if any(b <= a for a, b in zip(widths, widths[1:])) or min(blocks) < 1:
        raise ValueError(
            f"CMB.LITE.STAGE_WIDTHS must increase strictly and BLOCKS be >= 1, "
            f"got {widths} and {blocks}"
        )
    stem = BasicStem(in_channels=input_shape.channels, out_channels=lite.STEM_WIDTH, norm=norm)
    stages, in_ch = [], lite.STEM_WIDTH
    for idx, (width, n) in enumerate(zip(widths, blocks)):
        stages.append(
            ResNet.make_stage(
                BasicBlock, n, in_channels=in_ch, out_channels=width,
                stride_per_block=[1 if idx == 0 else 2] + [1] * (n - 1), norm=norm,
            )
        )
        in_ch = width
    return ResNet(stem, stages, out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
                  freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_cmb_lite_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """FPN (P2-P6) over :func:`build_cmb_lite_resnet`."""
    return FPN(
        bottom_up=build_cmb_lite_resnet(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
