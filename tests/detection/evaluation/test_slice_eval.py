"""Slice COCO evaluation with overlapping instances fused: hand-made masks, known AP."""

from __future__ import annotations

import detection  # noqa: F401  (Detectron2 compatibility shims first)
from detection.evaluation.slices import (
    FusedCOCOEvaluator,
    RawCOCOEvaluator,
    fuse_overlapping_instances,
    overlap_groups,
)

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluators
from detectron2.structures import Boxes, Instances

H, W = 40, 50


def rect(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def box_of(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def instances(masks, scores, classes=None) -> Instances:
    inst = Instances((H, W))
    inst.pred_masks = torch.as_tensor(np.stack(masks))
    inst.pred_boxes = Boxes(torch.tensor([box_of(m) for m in masks], dtype=torch.float32))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes or [0] * len(masks), dtype=torch.int64)
    return inst


def test_overlap_groups_follow_chains_and_respect_classes() -> None:
    a, b, c = rect(0, 0, 5, 5), rect(4, 4, 9, 9), rect(8, 8, 12, 12)  # a-b, b-c touch
    d = rect(30, 30, 35, 35)                                          # alone
    e = rect(2, 2, 4, 4)                                              # inside a, other class
    masks = np.stack([a, b, c, d, e])
    boxes = np.array([box_of(m) for m in masks], dtype=np.float32)
    groups = overlap_groups(masks, boxes, np.array([0, 0, 0, 0, 1]))
    assert groups == [[0, 1, 2], [3], [4]]
    # Boxes that overlap but masks that do not: two instances.
    f, g = rect(10, 10, 12, 20), rect(13, 10, 15, 20)
    both = np.stack([f, g])
    assert overlap_groups(both, np.array([[10, 10, 20, 15]] * 2, np.float32)) == [[0], [1]]
    assert overlap_groups(np.zeros((0, H, W), bool), np.zeros((0, 4), np.float32)) == []


def test_fusion_unions_masks_and_boxes_and_keeps_the_top_score_and_class() -> None:
    a, b = rect(10, 10, 20, 16), rect(10, 14, 20, 22)  # one bleed seen twice
    c = rect(30, 30, 34, 34)
    fused = fuse_overlapping_instances(instances([a, b, c], [0.6, 0.9, 0.7], [0, 0, 0]))
    assert len(fused) == 2
    np.testing.assert_allclose(fused.scores.numpy(), [0.9, 0.7])  # highest first
    assert torch.equal(fused.pred_masks[0], torch.as_tensor(a | b))
    np.testing.assert_allclose(fused.pred_boxes.tensor[0].numpy(), [10, 10, 22, 20])
    assert torch.equal(fused.pred_masks[1], torch.as_tensor(c))
    # Nothing overlapping, or nothing at all: unchanged.
    lone = instances([a, c], [0.5, 0.4])
    assert fuse_overlapping_instances(lone) is lone
    empty = lone[torch.zeros(2, dtype=torch.bool)]  # what the model gives for no detection
    assert len(fuse_overlapping_instances(empty)) == 0


@pytest.fixture()
def one_bleed_dataset(tmp_path):
    """One slice with one reference bleed (a 10 x 10 square)."""
    name = f"cmb_slice_eval_{tmp_path.name}"
    poly = [[10, 10, 20, 10, 20, 20, 10, 20]]
    record = {"file_name": str(tmp_path / "x.png"), "image_id": 1, "height": H, "width": W,
              "annotations": [{"bbox": [10, 10, 10, 10], "bbox_mode": 1, "category_id": 0,
                               "segmentation": poly, "iscrowd": 0}]}
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).set(thing_classes=["cmb"])
    yield name, tmp_path
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_fused_evaluator_scores_a_bleed_found_twice_as_one(one_bleed_dataset) -> None:
    name, tmp = one_bleed_dataset
    # Three overlapping thirds of the bleed: each has IoU ~0.4 with it, their union ~1.
    # COCO counts the raw three as a miss at IoU 0.5 and three false positives; fused,
    # they are one hit.
    parts = [rect(10, 10, 20, 14), rect(10, 13, 20, 17), rect(10, 16, 20, 20)]
    out = [{"instances": instances(parts, [0.9, 0.8, 0.7])}]
    evals = DatasetEvaluators([
        FusedCOCOEvaluator(name, tasks=("segm",), distributed=False,
                           output_dir=str(tmp / "fused"), use_fast_impl=False),
        RawCOCOEvaluator(name, tasks=("segm",), distributed=False,
                         output_dir=str(tmp / "raw"), use_fast_impl=False),
    ])
    evals.reset()
    evals.process([{"image_id": 1, "height": H, "width": W}], out)
    res = evals.evaluate()
    assert res["segm"]["AP50"] == pytest.approx(100.0)
    assert res["segm_raw"]["AP50"] == pytest.approx(0.0)
    assert (tmp / "fused" / "coco_instances_results.json").is_file()
    assert (tmp / "raw" / "coco_instances_results.json").is_file()
