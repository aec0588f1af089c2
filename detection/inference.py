"""Volume inference: a trained Mask R-CNN over a patient's SWI, back to 3D lesions.

:class:`VolumePredictor` prepares the volume exactly as the COCO export does
(:func:`detection.data.export_coco.prepare_case`: RAS reorientation, brain-percentile
normalisation, in-plane resampling to ``CMB.TARGET_SPACING``, 2.5D slices), runs the
model over the **brain slices only**, **in batches** of ``CMB.INFER.BATCH_SIZE``, and
pastes each instance mask **only inside its box** (Detectron2's default postprocess pastes
every candidate over the whole image, which dominates CPU time).

Slice instances are then brought back to the RAS voxel grid (area coverage >= 50 % of a
voxel, or the best-covered voxel for a lesion smaller than one voxel), merged into 3D
lesions with :func:`detection.lesions.merge_slice_instances` (10-connectivity: 8 in-plane,
2 through-plane; same-slice overlaps unioned; lesion score = max instance score),
optionally fused with a mirrored pass (``CMB.INFER.TTA_HFLIP``, :func:`fuse_flip_instances`),
filtered by :func:`detection.lesions.reject_implausible` (``CMB.INFER.MAX_SLICES``,
``MAX_DIAMETER_MM``, ``MAX_ELONGATION``, ``MIN_BRAIN_FRACTION`` of the lesion's voxels
inside the brain mask, and ``MIN_PARENCHYMA_SURROUND`` of the ring ``SURROUND_RING_MM``
around it that is brain parenchyma, and, when ``MAX_MIRROR_RATIO`` > 0, no twin as dark
across the mid-sagittal plane, :mod:`detection.symmetry`) and described by
:func:`detection.lesions.lesion_table` with a MARS-style region.

Outputs per patient (DESIGN.md contract 3): ``cmb_pred.nii.gz`` (instance ids on the input
grid and affine), ``lesions.csv``, ``rejected.csv`` (candidates dropped by shape, with the
reason) and ``overlay.png``. With ``CMB.INFER.CANDIDATE_THRESH`` below ``SCORE_THRESH``,
also ``candidates.csv``: the same merging and rejection run from the slice instances
scoring at least the candidate threshold (lesions.csv columns), so that a FROC curve can
sweep scores under the operating threshold. With the mirrored pass the candidates are fused
from the passes separately (each pass down to half the candidate threshold; the lesions
down to ``CMB.INFER.TTA_PASS_THRESH``), so the candidate threshold never changes the
lesions.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from .config import export_params, inference_zoom, mask_threshold
from .data.export_coco import PreparedVolume, prepare_case
from .data.volume import Volume, load_case
from .fileio import atomic_output
from .lesions import (
    LESION_COLUMNS,
    RegionFn,
    lesion_table,
    merge_slice_instances,
    reject_implausible,
)
from .symmetry import Plane, midsagittal_plane

logger = logging.getLogger(__name__)

__all__ = [
    "MirroredPassTTA",
    "PatientPrediction",
    "SliceInstances",
    "SlicePasses",
    "VolumePredictor",
    "WindowMask",
    "as_full",
    "as_window",
    "candidate_threshold",
    "fuse_flip_instances",
    "image_mask_to_ras_plane",
    "paste_mask_in_box",
    "save_overlay",
    "slice_floors",
]

#: ``(slice_index, masks [n, nx, ny] bool on the RAS plane, scores [n])``.
SliceInstances = tuple[int, np.ndarray, np.ndarray]
# One slice's raw model output: (z, (masks, scores) of the plain pass, the mirrored pass's
# (masks flipped back, scores) or None without CMB.INFER.TTA_HFLIP). The masks are
# WindowMask objects from VolumePredictor; full (H, W) bool arrays are accepted too.
SlicePasses = tuple[int, tuple[list, np.ndarray], "tuple[list, np.ndarray] | None"]


@dataclass(frozen=True, eq=False)
class WindowMask:
    """A slice instance's mask kept as the window it was pasted into.

    ``window`` holds rows ``r0 ..`` and columns ``c0 ..`` of a ``shape`` = (H, W) slice;
    the rest of the slice is background. A full 0.35 mm slice mask is ~300 KB, and a
    patient's two passes hold over a thousand instances (480 MB for the demo's busiest
    patient); the windows take a few hundred bytes each.
    """

    r0: int
    c0: int
    window: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def from_full(cls, mask: np.ndarray) -> WindowMask:
        """The tight window of a full (H, W) mask (an empty window when it is empty)."""
        box = _mask_box(mask)
        shape = (int(mask.shape[0]), int(mask.shape[1]))
        if box is None:
            return cls(0, 0, np.zeros((0, 0), dtype=bool), shape)
        r0, r1, c0, c1 = box
        return cls(r0, c0, np.ascontiguousarray(mask[r0:r1, c0:c1], dtype=bool), shape)

    @functools.cached_property
    def area(self) -> int:
        """Pixels in the mask."""
        return int(self.window.sum())

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """Half-open ``(r0, r1, c0, c1)`` of the window on the slice."""
        h, w = self.window.shape
        return self.r0, self.r0 + h, self.c0, self.c0 + w

    def full(self) -> np.ndarray:
        """The (H, W) bool mask."""
        out = np.zeros(self.shape, dtype=bool)
        r0, r1, c0, c1 = self.bounds
        out[r0:r1, c0:c1] = self.window
        return out

    def flip_lr(self) -> WindowMask:
        """The same mask mirrored left-right on its slice."""
        _, _, c0, c1 = self.bounds
        return WindowMask(self.r0, self.shape[1] - c1, self.window[:, ::-1], self.shape)


def as_window(mask: np.ndarray | WindowMask) -> WindowMask:
    """A :class:`WindowMask` as it is; a full (H, W) array as its tight window."""
    return mask if isinstance(mask, WindowMask) else WindowMask.from_full(np.asarray(mask))


def as_full(mask: np.ndarray | WindowMask) -> np.ndarray:
    """A full (H, W) bool array from either form."""
    return mask.full() if isinstance(mask, WindowMask) else np.asarray(mask, dtype=bool)


def paste_mask_in_box(mask_prob: np.ndarray, box: Sequence[float], height: int, width: int,
                      threshold: float = 0.5) -> tuple[slice, slice, np.ndarray]:
    """Paste a ``M x M`` mask probability map into its box; returns the window and the
    binary mask inside it (the rest of the image is background by construction)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    c1, r1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
    if c1 <= c0 or r1 <= r0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), dtype=bool)
    m = mask_prob.shape[0]
    # Pixel centre (c + 0.5, r + 0.5) in image coordinates -> mask grid coordinate.
    sx, sy = m / max(x1 - x0, 1e-6), m / max(y1 - y0, 1e-6)
    cols = (np.arange(c0, c1) + 0.5 - x0) * sx - 0.5
    rows = (np.arange(r0, r1) + 0.5 - y0) * sy - 0.5
    map_x = np.broadcast_to(cols[None, :], (r1 - r0, c1 - c0)).astype(np.float32)
    map_y = np.broadcast_to(rows[:, None], (r1 - r0, c1 - c0)).astype(np.float32)
    prob = cv2.remap(mask_prob.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return slice(r0, r1), slice(c0, c1), prob >= threshold


def image_mask_to_ras_plane(mask: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Export-layout slice mask ``(H, W)`` (rows anterior -> posterior) -> RAS plane
    ``(nx, ny)``: voxels covered >= 50 %; a mask smaller than one voxel keeps its
    best-covered voxel so no detection disappears."""
    h, w = mask.shape
    if (h, w) == (ny, nx):
        lay = mask.astype(bool)
    else:
        interp = cv2.INTER_AREA if (h >= ny and w >= nx) else cv2.INTER_LINEAR
        cov = cv2.resize(mask.astype(np.float32), (nx, ny), interpolation=interp)
        lay = cov >= 0.5
        if not lay.any() and mask.any():
            lay = np.zeros_like(lay)
            lay[np.unravel_index(int(np.argmax(cov)), cov.shape)] = True
    return np.ascontiguousarray(lay[::-1].T)


@dataclass
class PatientPrediction:
    """3D lesions of one patient on the RAS grid plus what is needed to write them."""

    patient_id: str
    volume: Volume
    labels_ras: np.ndarray  # int32 lesion ids, RAS voxel grid
    table: pd.DataFrame  # lesions.csv rows (LESION_COLUMNS)
    rejected: pd.DataFrame  # candidates dropped by shape, with the reason
    brain_ras: np.ndarray
    n_slices: int  # slices the model ran on
    seconds: float
    candidates: pd.DataFrame | None = None  # candidates.csv rows (CANDIDATE_THRESH)

    def write(self, out_dir: str | os.PathLike, overlay: bool = True) -> Path:
        """Write ``cmb_pred.nii.gz``, ``lesions.csv``, ``rejected.csv`` and ``overlay.png``
        into ``out_dir`` (each through a temporary name, then renamed)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        img = self.volume.to_nifti(self.labels_ras, dtype=np.int16)
        img.header.set_data_dtype(np.int16)
        with atomic_output(out / "cmb_pred.nii.gz") as tmp:
            nib.save(img, tmp)
        with atomic_output(out / "lesions.csv") as tmp:
            self.table.to_csv(tmp, index=False)
        with atomic_output(out / "rejected.csv") as tmp:
            self.rejected.to_csv(tmp, index=False)
        if self.candidates is not None:
            with atomic_output(out / "candidates.csv") as tmp:
                self.candidates.to_csv(tmp, index=False)
        if overlay:
            with atomic_output(out / "overlay.png") as tmp:
                save_overlay(self.volume.data, self.labels_ras, tmp, title=self.patient_id)
        return out


def save_overlay(swi_ras: np.ndarray, labels_ras: np.ndarray, path: str | os.PathLike,
                 title: str = "", max_panels: int = 12,
                 truth_ras: np.ndarray | None = None) -> None:
    """PNG montage of the axial slices holding the most lesion voxels, lesion outlines in
    red (and the reference in green when ``truth_ras`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_slice = (labels_ras > 0).sum(axis=(0, 1))
    if truth_ras is not None:
        per_slice = per_slice + (truth_ras > 0).sum(axis=(0, 1))
    order = [int(z) for z in np.argsort(-per_slice, kind="stable") if per_slice[z] > 0]
    if not order:
        order = [swi_ras.shape[2] // 2]
    zs = sorted(order[:max_panels])
    ncol = min(4, len(zs))
    nrow = int(np.ceil(len(zs) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 3.3 * nrow), squeeze=False)
    lo, hi = np.percentile(swi_ras, [1, 99])
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), zs):
        ax.imshow(swi_ras[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        if truth_ras is not None and truth_ras[:, :, z].any():
            ax.contour((truth_ras[:, :, z] > 0).T, levels=[0.5], colors="lime", linewidths=0.8)
        if labels_ras[:, :, z].any():
            ax.contour((labels_ras[:, :, z] > 0).T, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"slice {z}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def _mask_box(m: np.ndarray) -> tuple[int, int, int, int] | None:
    """Half-open ``(r0, r1, c0, c1)`` bounds of a 2D mask's pixels; None when empty."""
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _window_iou(a: WindowMask, b: WindowMask) -> float:
    """IoU of two masks of one slice, computed where their windows overlap (outside the
    windows both are empty); 0 when they do not meet or both are empty."""
    ar0, ar1, ac0, ac1 = a.bounds
    br0, br1, bc0, bc1 = b.bounds
    r0, r1, c0, c1 = max(ar0, br0), min(ar1, br1), max(ac0, bc0), min(ac1, bc1)
    inter = 0
    if r0 < r1 and c0 < c1:
        inter = int(np.logical_and(a.window[r0 - ar0:r1 - ar0, c0 - ac0:c1 - ac0],
                                   b.window[r0 - br0:r1 - br0, c0 - bc0:c1 - bc0]).sum())
    union = a.area + b.area - inter
    return float(inter) / float(union) if union else 0.0


def fuse_flip_instances(
    masks_a: Sequence[np.ndarray | WindowMask], scores_a: np.ndarray,
    masks_b: Sequence[np.ndarray | WindowMask], scores_b: np.ndarray,
    iou_thresh: float = 0.2,
) -> tuple[list[np.ndarray | WindowMask], np.ndarray]:
    """Fuse one slice's instances from the plain pass (a) and the mirrored pass (b),
    its masks already flipped back.

    Pairs are matched greedily by mask IoU (>= ``iou_thresh``), highest scores first. A
    matched pair keeps the mask of its higher-scoring member and the **mean** of the two
    scores; an instance found in one pass only keeps its mask with **half** its score
    (the other pass scored it ~0). Returns (masks, scores), highest score first; the masks
    are the objects passed in (full arrays or :class:`WindowMask`).
    """
    sa = np.asarray(scores_a, dtype=np.float64)
    sb = np.asarray(scores_b, dtype=np.float64)
    used_b = np.zeros(len(sb), dtype=bool)
    out: list[tuple[float, np.ndarray | WindowMask]] = []
    # IoUs over the windows only: most pairs do not meet.
    win_a = [as_window(m) for m in masks_a]
    win_b = [as_window(m) for m in masks_b]
    for i in np.argsort(-sa, kind="stable"):
        best, best_iou = -1, float(iou_thresh)
        for j in np.flatnonzero(~used_b):
            iou = _window_iou(win_a[i], win_b[j])
            if iou >= best_iou:
                best, best_iou = int(j), iou
        if best >= 0:
            used_b[best] = True
            mask = masks_a[i] if sa[i] >= sb[best] else masks_b[best]
            out.append((0.5 * (sa[i] + sb[best]), mask))
        else:
            out.append((0.5 * sa[i], masks_a[i]))
    out += [(0.5 * sb[j], masks_b[j]) for j in np.flatnonzero(~used_b)]
    out.sort(key=lambda t: -t[0])
    return [m for _, m in out], np.array([sc for sc, _ in out], dtype=np.float32)


def candidate_threshold(cfg: CfgNode) -> float | None:
    """``CMB.INFER.CANDIDATE_THRESH`` when it lies strictly between 0 and the operating
    threshold ``SCORE_THRESH`` (candidates.csv is written), else None."""
    op = float(cfg.CMB.INFER.SCORE_THRESH)
    cand = float(cfg.CMB.INFER.CANDIDATE_THRESH)
    return cand if 0 < cand < op else None


def slice_floors(cfg: CfgNode) -> tuple[float, float | None]:
    """Lowest slice-instance score the lesions and the candidates (None: none written)
    read. Without the mirrored pass these are their own thresholds. With it, fused scores
    are means of two passes and an instance under a pass's floor counts as absent (score
    0): the lesions use ``TTA_PASS_THRESH`` (half of ``SCORE_THRESH`` when 0), the
    candidates half of ``CANDIDATE_THRESH`` (or the lesions' floor if lower), each fused
    from the passes separately, so that the candidate threshold never changes lesions.csv."""
    op = float(cfg.CMB.INFER.SCORE_THRESH)
    cand = candidate_threshold(cfg)
    if not cfg.CMB.INFER.TTA_HFLIP:
        return op, cand
    pass_thresh = float(cfg.CMB.INFER.TTA_PASS_THRESH)
    if not 0 <= pass_thresh <= op:
        raise ValueError(f"CMB.INFER.TTA_PASS_THRESH must lie in [0, SCORE_THRESH "
                         f"= {op}], got {pass_thresh}")
    lesion = pass_thresh if pass_thresh > 0 else 0.5 * op
    return lesion, (min(lesion, 0.5 * cand) if cand is not None else None)


class MirroredPassTTA(torch.nn.Module):
    """A Detectron2 model run as :class:`VolumePredictor` runs it with
    ``CMB.INFER.TTA_HFLIP``, for slice-level COCO evaluation (``TEST.AUG.ENABLED``,
    :meth:`detection.engine.Trainer.test_with_TTA`): each image also mirrored left-right,
    its instances flipped back and the two passes fused by :func:`fuse_flip_instances`
    (mean score of a matched pair, half the score of an instance seen in one pass), each
    pass's instances under the lowest floor of :func:`slice_floors` left out. Inference
    only; the boxes are those of the kept member of each pair."""

    def __init__(self, cfg: CfgNode, model: torch.nn.Module):
        super().__init__()
        self.model = getattr(model, "module", model)  # not through a DDP wrapper
        tta_cfg = cfg.clone()
        tta_cfg.defrost()
        tta_cfg.CMB.INFER.TTA_HFLIP = True
        self.floor = min(f for f in slice_floors(tta_cfg) if f is not None)

    def _pass(self, inputs: list[dict], mirrored: bool) -> list[Instances]:
        if mirrored:
            inputs = [dict(x, image=x["image"].flip(-1)) for x in inputs]
        outs = [o["instances"].to("cpu") for o in self.model.inference(inputs)]
        outs = [inst[inst.scores >= self.floor] for inst in outs]
        if mirrored:
            for inst in outs:
                w = inst.image_size[1]
                box = inst.pred_boxes.tensor.clone()
                inst.pred_boxes.tensor[:, 0] = w - box[:, 2]
                inst.pred_boxes.tensor[:, 2] = w - box[:, 0]
                inst.pred_masks = inst.pred_masks.flip(-1)
        return outs

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        """``[{"instances": Instances}]`` per input, as ``GeneralizedRCNN`` at test time."""
        if self.training:
            raise RuntimeError("MirroredPassTTA is for inference only")
        with torch.no_grad():
            plain = self._pass(batched_inputs, mirrored=False)
            mirror = self._pass(batched_inputs, mirrored=True)
        results = []
        for a, b in zip(plain, mirror):
            masks_a = [m.numpy().astype(bool) for m in a.pred_masks]
            masks_b = [m.numpy().astype(bool) for m in b.pred_masks]
            masks, scores = fuse_flip_instances(masks_a, a.scores.numpy(),
                                                masks_b, b.scores.numpy())
            # Each fused instance keeps the box and class of the member whose mask it kept.
            source = {id(m): (a, i) for i, m in enumerate(masks_a)}
            source.update({id(m): (b, i) for i, m in enumerate(masks_b)})
            fused = Instances(a.image_size)
            idx = [source[id(m)] for m in masks]
            fused.pred_boxes = Boxes(torch.stack([inst.pred_boxes.tensor[i] for inst, i in idx])
                                     if idx else torch.zeros((0, 4)))
            fused.pred_classes = torch.as_tensor([int(inst.pred_classes[i]) for inst, i in idx],
                                                 dtype=torch.int64)
            fused.scores = torch.as_tensor(scores, dtype=torch.float32)
            fused.pred_masks = (torch.as_tensor(np.stack(masks)) if masks
                                else torch.zeros((0, *a.image_size), dtype=torch.bool))
            results.append({"instances": fused})
        return results


class VolumePredictor:
    """Run a trained config + weights over whole SWI volumes (see the module docstring)."""

    def __init__(self, cfg: CfgNode, weights: str | None = None,
                 region_fn: RegionFn | None = None):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        DetectionCheckpointer(self.model).load(weights or cfg.MODEL.WEIGHTS)
        # Instances under INFER.SCORE_THRESH are dropped before 3D merging, so the ROI
        # heads need not score-filter lower: greedy NMS only lets a higher-scoring box
        # suppress a lower one, so the kept boxes >= the threshold are the same, and the
        # mask head no longer runs on the discarded low-score boxes.
        predictor = getattr(getattr(self.model, "roi_heads", None), "box_predictor", None)
        self.tta_hflip = bool(cfg.CMB.INFER.TTA_HFLIP)
        op = float(cfg.CMB.INFER.SCORE_THRESH)
        self.candidate_thresh = candidate_threshold(cfg)
        self._lesion_floor, self._candidate_floor = slice_floors(cfg)
        self._raw_thresh = min(f for f in (self._lesion_floor, self._candidate_floor)
                               if f is not None)
        if predictor is not None and hasattr(predictor, "test_score_thresh"):
            # A pass floor under the model's own one just finds no instances below it;
            # an output threshold under it loses detections.
            lowest_out = self.candidate_thresh or op
            if float(predictor.test_score_thresh) > lowest_out + 1e-9:
                logger.warning(
                    "MODEL.ROI_HEADS.SCORE_THRESH_TEST %.3f is above the lowest score kept "
                    "(%.3f): slice detections between the two are lost",
                    float(predictor.test_score_thresh), lowest_out)
            predictor.test_score_thresh = max(float(predictor.test_score_thresh),
                                              self._raw_thresh)
        if self.model.device.type == "cpu":
            # oneDNN convolutions run ~1.5x faster on channels-last tensors on CPU.
            self.model.to(memory_format=torch.channels_last)
        self.zoom = inference_zoom(cfg)
        self.mask_thresh = mask_threshold(cfg)
        spacing = float(cfg.CMB.TARGET_SPACING)
        if self.zoom != 1.0:
            logger.info("test-time zoom %.3g: slices at %.4g mm instead of %.4g mm",
                        self.zoom, spacing / self.zoom, spacing)
        self.params = export_params(cfg, zoom=self.zoom)
        self.region_fn = region_fn
        self.batch_size = max(1, int(cfg.CMB.INFER.BATCH_SIZE))
        self.input_format = cfg.INPUT.FORMAT
        self._plane_cache: tuple | None = None

    # ------------------------------------------------------------------ model
    def _to_input(self, rgb: np.ndarray) -> dict:
        img = rgb[:, :, ::-1] if self.input_format == "BGR" else rgb
        h, w = img.shape[:2]
        return {"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))),
                "height": h, "width": w}

    def _slice_instances(self, inst: Instances, shape: tuple[int, int]) -> tuple[list, np.ndarray]:
        """Masks (:class:`WindowMask`, pasted inside their boxes) and scores of one
        slice's raw output."""
        h, w = shape
        # Nothing under the lowest score kept (candidate / operating threshold, halved
        # with the flip) reaches a lesion or a candidate: never paste it.
        inst = inst[inst.scores >= self._raw_thresh]
        boxes = inst.pred_boxes.tensor.numpy()
        scores = inst.scores.numpy()
        probs = inst.pred_masks[:, 0].numpy() if len(inst) else np.zeros((0, 1, 1))
        masks = []
        for box, prob in zip(boxes, probs):
            rs, cs, m = paste_mask_in_box(prob, box, h, w, threshold=self.mask_thresh)
            masks.append(WindowMask(rs.start, cs.start, m, (h, w)))
        return masks, scores

    @torch.inference_mode()
    def detect_passes(self, prep: PreparedVolume, slices: Iterable[int] | None = None,
                      progress: bool = False) -> list[SlicePasses]:
        """Each slice's raw instances ``(z, (masks, scores), mirrored or None)`` over
        ``slices`` (default: the brain slices), batched; masks (:class:`WindowMask`) in
        export layout, the mirrored pass's flipped back."""
        zs = list(prep.slice_indices if slices is None else slices)
        shape = tuple(prep.images.shape[1:])
        out: list[SlicePasses] = []
        it = range(0, len(zs), self.batch_size)
        if progress:
            import tqdm

            it = tqdm.tqdm(it, desc="slice batches", leave=False)
        for start in it:
            batch = zs[start:start + self.batch_size]
            rgbs = [prep.rgb(z) for z in batch]
            raw = self.model.inference([self._to_input(x) for x in rgbs], do_postprocess=False)
            if self.tta_hflip:
                flipped = self.model.inference(
                    [self._to_input(x[:, ::-1]) for x in rgbs], do_postprocess=False)
            for k, (z, inst) in enumerate(zip(batch, raw)):
                plain = self._slice_instances(inst.to("cpu"), shape)
                mirrored = None
                if self.tta_hflip:
                    fm, fs = self._slice_instances(flipped[k].to("cpu"), shape)
                    mirrored = ([m.flip_lr() for m in fm], fs)
                out.append((z, plain, mirrored))
        return out

    @staticmethod
    def fuse(passes: Sequence[SlicePasses], floor: float
             ) -> list[tuple[int, list[np.ndarray], np.ndarray]]:
        """Slice detections ``(z, masks, scores)`` from :meth:`detect_passes`: each pass's
        instances scoring >= ``floor``, the two passes fused by :func:`fuse_flip_instances`
        when there is a mirrored one."""
        out = []
        for z, (masks, scores), mirrored in passes:
            keep = np.flatnonzero(np.asarray(scores) >= floor)
            masks, scores = [masks[i] for i in keep], np.asarray(scores)[keep]
            if mirrored is not None:
                fkeep = np.flatnonzero(np.asarray(mirrored[1]) >= floor)
                masks, scores = fuse_flip_instances(
                    masks, scores, [mirrored[0][i] for i in fkeep],
                    np.asarray(mirrored[1])[fkeep])
            out.append((z, masks, scores))
        return out

    def detect(self, prep: PreparedVolume, slices: Iterable[int] | None = None,
               progress: bool = False) -> list[tuple[int, list[np.ndarray], np.ndarray]]:
        """Slice detections ``(z, masks in export layout, scores)`` for the lesions over
        ``slices`` (default: the brain slices): :meth:`detect_passes` then :meth:`fuse` at
        the lesions' floor."""
        return self.fuse(self.detect_passes(prep, slices, progress), self._lesion_floor)

    # ------------------------------------------------------------------ 3D
    def _merge(self, detections, volume: Volume, brain_ras: np.ndarray, thresh: float,
               patient_id: str):
        """Slice detections scoring >= ``thresh`` -> 3D lesions, shape-filtered."""
        nx, ny, nz = volume.data.shape
        infer = self.cfg.CMB.INFER
        per_slice: list[SliceInstances] = []
        for z, masks, scores in detections:
            keep = [i for i, s in enumerate(scores) if s >= thresh]  # merge drops the rest
            if not keep:
                continue
            planes = np.stack([image_mask_to_ras_plane(as_full(masks[i]), nx, ny)
                               for i in keep])
            per_slice.append((z, planes, np.asarray(scores)[keep]))
        merged = merge_slice_instances(per_slice, (nx, ny, nz), slice_axis=2,
                                       score_thresh=thresh)
        plane = self._mirror_plane(volume, brain_ras) if merged.n else None
        rej = reject_implausible(
            merged, volume.affine, max_slices=int(infer.MAX_SLICES),
            max_diameter_mm=float(infer.MAX_DIAMETER_MM),
            max_elongation=float(infer.MAX_ELONGATION),
            brain_mask=brain_ras, min_brain_fraction=float(infer.MIN_BRAIN_FRACTION),
            image=volume.data, min_parenchyma_surround=float(infer.MIN_PARENCHYMA_SURROUND),
            surround_ring_mm=tuple(float(r) for r in infer.SURROUND_RING_MM),
            max_mirror_ratio=float(infer.MAX_MIRROR_RATIO) if plane is not None else 0.0,
            mirror_search_mm=float(infer.MIRROR_SEARCH_MM),
            mirror_plane=plane,
        )
        table = lesion_table(rej.lesions.labels, volume.affine, rej.lesions, brain_ras,
                             self.region_fn, patient_id=patient_id)
        return rej, table

    def _mirror_plane(self, volume: Volume, brain_ras: np.ndarray) -> Plane | None:
        """The volume's mid-sagittal plane when the mirror rule is on (estimated once per
        volume: lesions and candidates share it); None when it is off or the brain mask
        is too small to find one (warned)."""
        if float(self.cfg.CMB.INFER.MAX_MIRROR_RATIO) <= 0 or not np.any(brain_ras):
            return None
        cached = self._plane_cache
        # The cache holds the arrays themselves: a freed volume's id() can be reused.
        if cached is None or cached[0] is not volume.data or cached[1] is not brain_ras:
            try:
                plane = midsagittal_plane(volume.data, brain_ras, volume.affine)
            except ValueError as exc:
                logger.warning("%s: no mid-sagittal plane (%s); the bilateral-mimic rule "
                               "(CMB.INFER.MAX_MIRROR_RATIO) is not applied to this volume",
                               volume.path, exc)
                plane = None
            self._plane_cache = (volume.data, brain_ras, plane)
        return self._plane_cache[2]

    def to_lesions(self, prep: PreparedVolume, detections, volume: Volume,
                   brain_ras: np.ndarray, patient_id: str = ""):
        """Slice detections -> 3D lesions on the RAS grid, shape-filtered, with a table."""
        rej, table = self._merge(detections, volume, brain_ras,
                                 float(self.cfg.CMB.INFER.SCORE_THRESH), patient_id)
        return rej.lesions.labels, table, rej.rejected

    def candidates(self, detections, volume: Volume, brain_ras: np.ndarray,
                   patient_id: str = "") -> pd.DataFrame | None:
        """The candidates table (``CANDIDATE_THRESH``), or None when that is off."""
        if self.candidate_thresh is None:
            return None
        return self._merge(detections, volume, brain_ras, self.candidate_thresh,
                           patient_id)[1]

    def __call__(self, swi: str | os.PathLike, brain_mask: str | os.PathLike | None = None,
                 patient_id: str = "", progress: bool = False) -> PatientPrediction:
        """Predict one patient's lesions from an SWI NIfTI (brain mask computed if absent)."""
        t0 = time.perf_counter()
        case = load_case(swi, None, brain_mask, nonfinite=self.params.nonfinite)
        prep = prepare_case(case, self.params)
        passes = self.detect_passes(prep, progress=progress)
        detections = self.fuse(passes, self._lesion_floor)
        labels, table, rejected = self.to_lesions(prep, detections, case.swi, case.brain,
                                                  patient_id)
        cands = None
        if self._candidate_floor is not None:
            if self._candidate_floor != self._lesion_floor:
                detections = self.fuse(passes, self._candidate_floor)
            cands = self.candidates(detections, case.swi, case.brain, patient_id)
        dt = time.perf_counter() - t0
        logger.info("%s: %d lesions (%d rejected) from %d slices in %.1f s",
                    patient_id or swi, len(table), len(rejected), len(prep.slice_indices), dt)
        return PatientPrediction(patient_id, case.swi, labels, table, rejected, case.brain,
                                 len(prep.slice_indices), dt, cands)


def empty_lesion_table() -> pd.DataFrame:
    """An empty ``lesions.csv`` frame with the contract's columns."""
    return pd.DataFrame(columns=LESION_COLUMNS)
