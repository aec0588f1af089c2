"""COCO evaluation of slice detections, with overlapping instances of a slice fused.

A small bleed is often detected two or three times on one slice: boxes shifted by a
pixel or two, each with its own mask. Box NMS (IoU 0.5) keeps them all, because tiny
boxes a pixel apart overlap less than that. The volume predictor unites them (same-slice
overlaps are unioned into one lesion, score = max; :mod:`detection.lesions`), but COCO
counts every extra instance as a false positive and scores the best-scoring member alone,
often not the best-placed one.

:func:`fuse_overlapping_instances` applies the volume predictor's rule on each slice:
instances whose masks share at least one pixel belong together (connected groups of the
overlap graph); each group becomes one instance with the union of the masks, the union of
the boxes, the highest score and the class of its best-scoring member. Only instances of
the same class are fused.

:class:`FusedCOCOEvaluator` is Detectron2's ``COCOEvaluator`` on fused instances (result
keys ``bbox`` / ``segm``); :class:`RawCOCOEvaluator` evaluates the model's instances as
they are and reports them under ``bbox_raw`` / ``segm_raw``, so both appear in
``metrics.json`` and the training log. ``CMB.EVAL_FUSE_OVERLAPS`` chooses between them.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

__all__ = [
    "overlap_groups",
    "fuse_overlapping_instances",
    "FusedCOCOEvaluator",
    "RawCOCOEvaluator",
    "build_slice_evaluators",
]


def overlap_groups(masks: np.ndarray, boxes: np.ndarray,
                   classes: np.ndarray | None = None) -> list[list[int]]:
    """Connected groups of instances whose masks share a pixel (same class only).

    ``masks`` [n, H, W] bool, ``boxes`` [n, 4] XYXY (used only to skip pairs that cannot
    touch), ``classes`` [n] or None. Returns the groups as sorted index lists, ordered by
    their smallest index.
    """
    n = len(masks)
    if n == 0:
        return []
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # Integer pixel spans of the boxes, padded by one: a mask can spill a pixel past its
    # float box after rounding; the mask test below decides.
    h, w = masks.shape[1:]
    x0 = np.clip(np.floor(boxes[:, 0]).astype(int) - 1, 0, w)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(int) - 1, 0, h)
    x1 = np.clip(np.ceil(boxes[:, 2]).astype(int) + 1, 0, w)
    y1 = np.clip(np.ceil(boxes[:, 3]).astype(int) + 1, 0, h)
    for i in range(n):
        for j in range(i + 1, n):
            if classes is not None and classes[i] != classes[j]:
                continue
            ax, ay = max(x0[i], x0[j]), max(y0[i], y0[j])
            bx, by = min(x1[i], x1[j]), min(y1[i], y1[j])
            if ax >= bx or ay >= by:
                continue
            if np.logical_and(masks[i, ay:by, ax:bx], masks[j, ay:by, ax:bx]).any():
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [sorted(g) for g in sorted(groups.values(), key=min)]


def fuse_overlapping_instances(instances: Instances) -> Instances:
    """One instance per group of same-class instances whose masks overlap (see module
    docstring): union mask, union box, max score, class of the best-scoring member.

    Needs ``pred_masks`` ([n, H, W], bool or probabilities thresholded at 0.5),
    ``pred_boxes``, ``scores`` and ``pred_classes``; returns new ``Instances`` of the same
    image size, highest score first. Without masks the instances are returned unchanged.
    """
    if len(instances) == 0 or not instances.has("pred_masks"):
        return instances
    masks_t = instances.pred_masks
    masks = (masks_t > 0.5 if masks_t.dtype != torch.bool else masks_t).cpu().numpy()
    boxes = instances.pred_boxes.tensor.cpu().numpy()
    scores = instances.scores.cpu().numpy()
    classes = instances.pred_classes.cpu().numpy()
    groups = overlap_groups(masks, boxes, classes)
    if len(groups) == len(instances):
        return instances
    out_masks, out_boxes, out_scores, out_classes = [], [], [], []
    for g in groups:
        top = g[int(np.argmax(scores[g]))]
        out_masks.append(np.logical_or.reduce(masks[g], axis=0))
        b = boxes[g]
        out_boxes.append([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])
        out_scores.append(scores[top])
        out_classes.append(classes[top])
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    fused = Instances(instances.image_size)
    fused.pred_boxes = Boxes(torch.as_tensor(np.asarray(out_boxes, dtype=np.float32)[order]))
    fused.scores = torch.as_tensor(np.asarray(out_scores, dtype=np.float32)[order])
    fused.pred_classes = torch.as_tensor(np.asarray(out_classes, dtype=np.int64)[order])
    fused.pred_masks = torch.as_tensor(np.stack(out_masks)[order])
    return fused


class FusedCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` on each slice's instances after :func:`fuse_overlapping_instances`."""

    def process(self, inputs, outputs):  # noqa: D401 - Detectron2's signature
        """Fuse each output's instances, then record them as ``COCOEvaluator`` does."""
        fused = []
        for output in outputs:
            if "instances" in output:
                output = dict(output)
                output["instances"] = fuse_overlapping_instances(
                    output["instances"].to(torch.device("cpu")))
            fused.append(output)
        super().process(inputs, fused)


class RawCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` on the model's instances as they are, its results renamed
    ``<task>_raw`` so that they sit beside the fused ones in one results dict."""

    def evaluate(self, img_ids=None):
        """Detectron2's evaluation, each task's results under ``<task>_raw``."""
        results = super().evaluate(img_ids)
        if not results:
            return results
        return OrderedDict((f"{task}_raw", res) for task, res in results.items())


def build_slice_evaluators(dataset_name: str, output_folder: str, fuse: bool,
                           tasks: tuple[str, ...] = ("bbox", "segm")) -> list[COCOEvaluator]:
    """The evaluators of one test set: fused (main results, in ``output_folder``) and raw
    (``<output_folder>/raw``) when ``fuse``, else the raw evaluator alone under the plain
    task names. Pure-Python COCOeval (no C++ extension here)."""
    if not fuse:
        return [COCOEvaluator(dataset_name, tasks=tasks, distributed=True,
                              output_dir=output_folder, use_fast_impl=False)]
    return [
        FusedCOCOEvaluator(dataset_name, tasks=tasks, distributed=True,
                           output_dir=output_folder, use_fast_impl=False),
        RawCOCOEvaluator(dataset_name, tasks=tasks, distributed=True,
                         output_dir=os.path.join(output_folder, "raw"), use_fast_impl=False),
    ]
