"""3D lesions from 2D slice detections: merging, shape rejection, lesion table, MARS regions.

Pure numpy/scipy/pandas (no Detectron2), so the MIL side and tests can use it cheaply.
All volumes are on the patient's (RAS-canonical) voxel grid; ``affine`` maps voxel
indices to world millimetres (RAS). Axial slices run along ``slice_axis`` (2 in RAS).

Rules (stated once, used everywhere)
------------------------------------
* **Merging** (:func:`merge_slice_instances`): slice instances scoring at least
  ``score_thresh`` are painted into one binary volume (instances on the same slice that
  overlap are simply unioned: Mask R-CNN's NMS leaves few such pairs and those are
  duplicates of one bleed), then 3D connected components are taken with the
  ``connectivity`` neighbourhood. Default **10**: 8-connectivity in-plane (a slice mask
  with diagonal contacts stays one piece) plus the 2 face neighbours through-plane, so
  slices join only where their masks overlap in-plane. Slices of one bleed always
  overlap; corner-only contacts across slices are more often two neighbouring foci or an
  oblique vein, and the rule does not depend on slice thickness. 6, 18 and 26 are
  available. A lesion's **score** is the max over the slice instances it contains
  (``max_score``, the detection confidence used for thresholds and FROC); the mean over
  those instances (``mean_score``) is kept too. An instance touching several components
  counts for each.
* **Rejection** (:func:`reject_implausible`), thresholds = ``cfg.CMB.INFER`` defaults:
  ``n_slices > max_slices`` (6; tubular through many slices: vein), largest in-plane
  diameter ``> max_diameter_mm`` (10 mm; CMBs are 2-10 mm, measured like a radiologist
  on the axial slice), elongation ``> max_elongation`` (3). Elongation is
  ``sqrt(l1 / l2)``, major over *intermediate* principal axis of the lesion's voxels in
  mm, with partial-volume allowances (through-plane extent counted as n_slices - 1
  slices, in-plane voxels as boxes twice their width) so that a small bleed seen on two
  thick slices is not called tubular. Major/intermediate measures tubularity (vein);
  major/minor would also flag flat lesions, which thick and missed slices produce.
  ``max_slices`` counts slices: with thin slices (< 1.5 mm) raise it so that a 10 mm
  bleed still fits. With a brain mask, a candidate with less than
  ``min_brain_fraction`` (0.5) of its voxels inside the mask is rejected as
  ``outside brain``: CMBs lie in the parenchyma, and the dark gap between the brain and
  the scalp (CSF, bone) is where a slice detector fires on a scanner it was not trained
  on. With the SWI too, a candidate is rejected as ``not surrounded by parenchyma``
  when less than ``min_parenchyma_surround`` (0.5 in ``cfg.CMB.INFER``; 0 = off) of the
  in-plane ring 2-5 mm beyond its mask (the part in the brain) is not darker than
  halfway from its core to the brain median (:func:`parenchyma_surround`): a CMB is at
  least half surrounded by brain parenchyma (Greenberg et al., Lancet Neurol 2009), a
  detection on part of an iron-rich nucleus is not. With ``max_mirror_ratio`` > 0 too, a
  candidate with a twin at least that dark at its mirror image across the mid-sagittal
  plane is rejected as a ``bilateral mimic`` (:mod:`detection.symmetry`): iron-rich
  nuclei and pallidal calcification are symmetric, a bleed is not.
* **Regions without registration** (:func:`assign_regions_geometry`): see that function.
* **Regions with an atlas** (:func:`assign_regions_atlas`): affine registration of the
  brain mask to the MNI ICBM152 2009a brain mask, then an MNI-space atlas look-up.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy import optimize

from .symmetry import (
    Plane,
    block_mean,
    lesion_boxes,
    midsagittal_plane,
    mirror_ratio,
    ring_inputs,
)

__all__ = [
    "REGIONS",
    "MARS_LABELS",
    "MergedLesions",
    "Rejection",
    "RegionFn",
    "merge_slice_instances",
    "connectivity_structure",
    "lesion_shapes",
    "parenchyma_surround",
    "reject_implausible",
    "lesion_table",
    "census",
    "BrainFrame",
    "brain_frame",
    "assign_regions_geometry",
    "estimate_brain_mask",
    "mni_template",
    "register_to_mni",
    "read_atlas",
    "atlas_lookup",
    "AtlasRegionAssigner",
    "assign_regions_atlas",
    "LESION_COLUMNS",
]

logger = logging.getLogger(__name__)

#: MARS groups, in the order used by :func:`census`.
REGIONS = ("lobar", "deep", "infratentorial")
UNKNOWN = "unknown"

#: MARS atlas labels (``../shared/data/README.md``): label -> (subregion, group).
MARS_LABELS: dict[int, tuple[str, str]] = {
    1: ("brainstem", "infratentorial"),
    2: ("cerebellum", "infratentorial"),
    3: ("basal ganglia", "deep"),
    4: ("thalamus", "deep"),
    5: ("internal capsule", "deep"),
    6: ("external capsule", "deep"),
    7: ("corpus callosum", "deep"),
    8: ("deep/periventricular white matter", "deep"),
    9: ("frontal", "lobar"),
    10: ("parietal", "lobar"),
    11: ("temporal", "lobar"),
    12: ("occipital", "lobar"),
    13: ("insula", "lobar"),
}

#: Columns of :func:`lesion_table` (DESIGN.md contract 3, ``lesions.csv``).
LESION_COLUMNS = [
    "patient_id", "lesion_id", "i", "j", "k", "x_mm", "y_mm", "z_mm", "n_voxels",
    "volume_mm3", "diameter_mm", "max_inplane_mm", "n_slices", "slice_min", "slice_max",
    "max_score", "mean_score", "n_instances", "elongation", "region", "subregion",
]

#: ``region_fn(centres_world [n, 3] mm, brain_mask or None, affine) -> (regions, subregions)``.
RegionFn = Callable[[np.ndarray, "np.ndarray | None", np.ndarray], tuple[np.ndarray, np.ndarray]]


# ============================================================================ merging


@dataclass
class MergedLesions:
    """3D lesions: ``labels`` int32 volume (0 = background, 1..n) and per-lesion arrays.

    ``max_score[i]``, ``mean_score[i]`` and ``n_instances[i]`` describe lesion ``i + 1``.
    """

    labels: np.ndarray
    max_score: np.ndarray
    mean_score: np.ndarray
    n_instances: np.ndarray

    @property
    def n(self) -> int:
        """Number of lesions."""
        return int(len(self.max_score))

    def scores(self) -> dict[int, float]:
        """Lesion id -> max score."""
        return {i + 1: float(s) for i, s in enumerate(self.max_score)}

    def subset(self, ids: Sequence[int]) -> MergedLesions:
        """Keep the lesions ``ids`` (original ids), relabelled 1..len(ids) in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        lut = np.zeros(self.n + 1, dtype=np.int32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        return MergedLesions(
            labels=lut[self.labels],
            max_score=self.max_score[ids - 1].copy(),
            mean_score=self.mean_score[ids - 1].copy(),
            n_instances=self.n_instances[ids - 1].copy(),
        )


def connectivity_structure(connectivity: int = 10, slice_axis: int = 2) -> np.ndarray:
    """3x3x3 neighbourhood for 6, 10 (8 in-plane + 2 through-plane), 18 or 26-connectivity."""
    if connectivity == 6:
        return ndi.generate_binary_structure(3, 1)
    if connectivity == 18:
        return ndi.generate_binary_structure(3, 2)
    if connectivity == 26:
        return ndi.generate_binary_structure(3, 3)
    if connectivity == 10:
        st = ndi.generate_binary_structure(3, 1)
        idx = [slice(None)] * 3
        idx[slice_axis] = 1
        st[tuple(idx)] = True  # full 3x3 in the slice plane
        return st
    raise ValueError(f"connectivity must be 6, 10, 18 or 26, got {connectivity}")


def merge_slice_instances(
    instances: Iterable[tuple[int, np.ndarray, np.ndarray]],
    shape: Sequence[int],
    *,
    slice_axis: int = 2,
    score_thresh: float = 0.5,
    connectivity: int = 10,
) -> MergedLesions:
    """Merge per-slice instance masks into 3D lesions (rules in the module docstring).

    ``instances``: ``(slice_index, masks [n, H, W] bool, scores [n])`` per slice, where
    ``(H, W)`` is ``shape`` without ``slice_axis``. Instances below ``score_thresh`` are
    dropped. Returns int32 labels (components numbered in raster order) with per-lesion
    max/mean instance score and instance count.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be 3D, got {shape}")
    plane = tuple(s for a, s in enumerate(shape) if a != slice_axis)
    fg = np.zeros(shape, dtype=bool)
    kept: list[tuple[int, float, tuple[np.ndarray, np.ndarray]]] = []
    for z, masks, scores in instances:
        masks = np.asarray(masks, dtype=bool)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if masks.size == 0 and scores.size == 0:
            continue
        if masks.ndim == 2:
            masks = masks[None]
        if masks.shape[1:] != plane or len(masks) != len(scores):
            raise ValueError(
                f"slice {z}: masks {masks.shape} / scores {scores.shape} do not match the "
                f"slice plane {plane}"
            )
        if not 0 <= int(z) < shape[slice_axis]:
            raise ValueError(f"slice index {z} outside 0..{shape[slice_axis] - 1}")
        view = fg[_plane_index(int(z), slice_axis)]  # basic indexing: a view into fg
        for m, s in zip(masks, scores):
            if s < score_thresh or not m.any():
                continue
            view |= m
            kept.append((int(z), float(s), np.nonzero(m)))
    labels, n = ndi.label(fg, structure=connectivity_structure(connectivity, slice_axis))
    labels = labels.astype(np.int32, copy=False)
    inst_scores: list[list[float]] = [[] for _ in range(n)]
    for z, s, (a, b) in kept:
        for lid in np.unique(labels[_plane_index(z, slice_axis)][a, b]):
            if lid > 0:
                inst_scores[lid - 1].append(s)
    max_s = np.array([max(v) if v else np.nan for v in inst_scores], dtype=np.float64)
    mean_s = np.array([np.mean(v) if v else np.nan for v in inst_scores], dtype=np.float64)
    n_inst = np.array([len(v) for v in inst_scores], dtype=np.int64)
    logger.debug("merged %d slice instances into %d 3D lesions", len(kept), n)
    return MergedLesions(labels=labels, max_score=max_s, mean_score=mean_s, n_instances=n_inst)


def _plane_index(z: int, axis: int) -> tuple:
    idx: list = [slice(None)] * 3
    idx[axis] = z
    return tuple(idx)


# ============================================================================ shapes


def _as_affine(affine_or_spacing: np.ndarray | Sequence[float]) -> np.ndarray:
    a = np.asarray(affine_or_spacing, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    if a.shape == (3,):
        return np.diag([*a, 1.0])
    raise ValueError(f"expected a 4x4 affine or 3 voxel spacings, got shape {a.shape}")


_ANGLES = np.linspace(0.0, np.pi, 12, endpoint=False)


def _inplane_feret(vox: np.ndarray, lin: np.ndarray, slice_axis: int) -> float:
    """Largest in-plane diameter (mm) over the lesion's slices, 12 directions (error < 1%)."""
    ax = [a for a in range(3) if a != slice_axis]
    ca, cb = lin[:, ax[0]], lin[:, ax[1]]
    e1 = ca / np.linalg.norm(ca)
    e2 = cb - (cb @ e1) * e1
    e2 /= np.linalg.norm(e2)
    dirs = np.cos(_ANGLES)[:, None] * e1 + np.sin(_ANGLES)[:, None] * e2  # [12, 3]
    footprint = np.abs(dirs @ ca) + np.abs(dirs @ cb)  # one voxel's width along each dir
    proj = (vox[:, ax] @ np.stack([ca, cb])) @ dirs.T  # [n, 12], world offsets
    best = 0.0
    zs = vox[:, slice_axis]
    for z in np.unique(zs):
        p = proj[zs == z]
        best = max(best, float(np.max(p.max(0) - p.min(0) + footprint)))
    return best


def _elongation(vox: np.ndarray, lin: np.ndarray, slice_axis: int) -> float:
    """sqrt(major / intermediate principal variance) with partial-volume allowances.

    Voxel frame scaled by the voxel sizes (eigenvalues are rotation invariant). A round
    focus straddling a slice boundary shows on one slice more than its size implies,
    and one partly filling a voxel may be up to a voxel wider than the voxels marked:
    the through-plane extent is counted as (n_slices - 1) slice thicknesses (slice
    coordinates shrunk by (s - 1) / s, boxes of that height) and each voxel in-plane as
    a box twice its width. So only clearly tubular shapes score high.
    """
    sp = np.sqrt((lin**2).sum(0))
    x = (vox - vox.mean(0)) * sp
    s = len(np.unique(vox[:, slice_axis]))
    shrink = (s - 1) / s
    x[:, slice_axis] *= shrink
    box = (2.0 * sp) ** 2 / 12.0
    box[slice_axis] = (shrink * sp[slice_axis]) ** 2 / 12.0
    cov = (x.T @ x) / len(x) + np.diag(box)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    return float(np.sqrt(ev[0] / max(ev[1], 1e-12)))


def lesion_shapes(
    labels: np.ndarray, affine: np.ndarray | Sequence[float], *, slice_axis: int = 2
) -> pd.DataFrame:
    """Per-lesion geometry of an instance label volume, one row per id present.

    Columns: ``lesion_id, i, j, k`` (centre of mass, voxels), ``x_mm, y_mm, z_mm`` (world),
    ``n_voxels, volume_mm3, diameter_mm`` (equivalent sphere), ``max_inplane_mm``
    (largest in-plane diameter), ``n_slices, slice_min, slice_max`` (along
    ``slice_axis``), ``elongation`` (sqrt of major / intermediate principal variance,
    with the partial-volume allowances of :func:`_elongation`).
    """
    aff = _as_affine(affine)
    lin = aff[:3, :3]
    vox_vol = abs(float(np.linalg.det(lin)))
    rows = []
    labels = np.asarray(labels)
    for lid, bbox in enumerate(ndi.find_objects(labels), start=1):
        if bbox is None:
            continue
        sub = labels[bbox] == lid
        vox = np.argwhere(sub).astype(np.float64) + [s.start for s in bbox]
        n = len(vox)
        com = vox.mean(0)
        world = com @ lin.T + aff[:3, 3]
        elong = _elongation(vox, lin, slice_axis)
        zs = vox[:, slice_axis].astype(np.int64)
        vol = n * vox_vol
        rows.append({
            "lesion_id": lid, "i": com[0], "j": com[1], "k": com[2],
            "x_mm": world[0], "y_mm": world[1], "z_mm": world[2],
            "n_voxels": n, "volume_mm3": vol,
            "diameter_mm": float((6.0 * vol / np.pi) ** (1.0 / 3.0)),
            "max_inplane_mm": _inplane_feret(vox, lin, slice_axis),
            "n_slices": int(len(np.unique(zs))), "slice_min": int(zs.min()),
            "slice_max": int(zs.max()), "elongation": elong,
        })
    cols = ["lesion_id", "i", "j", "k", "x_mm", "y_mm", "z_mm", "n_voxels", "volume_mm3",
            "diameter_mm", "max_inplane_mm", "n_slices", "slice_min", "slice_max", "elongation"]
    return pd.DataFrame(rows, columns=cols)


def parenchyma_surround(
    labels: np.ndarray,
    image: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray | Sequence[float],
    *,
    ring_mm: tuple[float, float] = (2.0, 5.0),
    slice_axis: int = 2,
) -> dict[int, float]:
    """Share of the tissue around each lesion that is brain parenchyma, ``{id: share}``.

    A CMB is "at least half surrounded by brain parenchyma" (Greenberg et al., Lancet
    Neurol 2009); a detection on part of a larger dark structure (iron-rich nuclei,
    sinus, a vein running along the slice) is not. On every slice holding the lesion, its
    ring is the in-plane band ``ring_mm[0] < d <= ring_mm[1]`` mm from the lesion's mask
    on that slice (beyond the blooming halo), within ``brain_mask``: what lies outside the
    brain is left to the brain-fraction rule, so that a cortical bleed next to the brain's
    surface keeps its share. A ring voxel counts as parenchyma when it is not darker than
    halfway between the lesion's core (the 10th percentile of its voxels) and the median
    of the brain. Lesions with no ring voxel in the brain get NaN.
    """
    labels, image, brain, (lo, hi) = ring_inputs(labels, image, brain_mask, ring_mm)
    aff = _as_affine(affine)
    ax = [a for a in range(3) if a != slice_axis]
    sp = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    pad = [int(np.ceil(hi / sp[a])) + 1 if a != slice_axis else 0 for a in range(3)]
    brain_median = float(np.median(image[brain])) if brain.any() else float("nan")
    out: dict[int, float] = {}
    for lid, box, les in lesion_boxes(labels, pad):
        img, brn = image[box], brain[box]
        core = float(np.percentile(img[les], 10))
        dark_below = core + 0.5 * (brain_median - core)
        n_ring = n_paren = 0
        for z in np.flatnonzero(les.any(axis=tuple(ax))):
            sl = [slice(None)] * 3
            sl[slice_axis] = z
            sl = tuple(sl)
            dist = ndi.distance_transform_edt(~les[sl], sampling=sp[ax])
            ring = (dist > lo) & (dist <= hi) & brn[sl]
            n_ring += int(ring.sum())
            n_paren += int((ring & (img[sl] >= dark_below)).sum())
        out[lid] = n_paren / n_ring if n_ring else float("nan")
    return out


# ============================================================================ rejection


@dataclass
class Rejection:
    """Result of :func:`reject_implausible`.

    ``lesions``: kept lesions relabelled 1..m (scores carried over); ``kept_ids``: the
    original id of each kept lesion; ``rejected``: one row per rejected lesion with its
    original ``lesion_id``, shape measures, ``max_score`` and ``reason`` (``"; "``-joined).
    """

    lesions: MergedLesions
    kept_ids: np.ndarray
    rejected: pd.DataFrame = field(default_factory=pd.DataFrame)


def reject_implausible(
    lesions: MergedLesions | np.ndarray,
    affine: np.ndarray | Sequence[float],
    *,
    max_slices: int = 6,
    max_diameter_mm: float = 10.0,
    max_elongation: float = 3.0,
    slice_axis: int = 2,
    brain_mask: np.ndarray | None = None,
    min_brain_fraction: float = 0.5,
    image: np.ndarray | None = None,
    min_parenchyma_surround: float = 0.0,
    surround_ring_mm: tuple[float, float] = (2.0, 5.0),
    max_mirror_ratio: float = 0.0,
    mirror_search_mm: float = 3.0,
    mirror_plane: Plane | None = None,
) -> Rejection:
    """Drop 3D candidates whose shape or place contradicts a CMB (rules in the module
    docstring).

    ``lesions`` is a :class:`MergedLesions` or a bare label volume (scores then NaN);
    ``affine`` a 4x4 voxel-to-world matrix or 3 voxel spacings (mm). A limit set to
    ``None``-like ``inf`` disables that test; ``brain_mask`` (same grid as the labels)
    enables the ``min_brain_fraction`` test, and with ``image`` (the SWI on that grid)
    too the ``min_parenchyma_surround`` test (:func:`parenchyma_surround` over
    ``surround_ring_mm``; 0 disables it) and the ``max_mirror_ratio`` test (a lesion
    with an equally dark twin across the mid-sagittal plane,
    :func:`detection.symmetry.mirror_ratio` >= the limit, is a bilateral mimic such as
    an iron-rich nucleus or pallidal calcification; 0 disables it). Every rejection is
    logged at INFO. ``mirror_plane`` (default: estimated from ``image`` and
    ``brain_mask`` by :func:`detection.symmetry.midsagittal_plane`) saves that step
    when one volume is filtered more than once.
    """
    if not isinstance(lesions, MergedLesions):
        labels = np.asarray(lesions).astype(np.int32, copy=False)
        n = int(labels.max(initial=0))
        nan = np.full(n, np.nan)
        lesions = MergedLesions(labels, nan, nan.copy(), np.zeros(n, dtype=np.int64))
    shapes = lesion_shapes(lesions.labels, affine, slice_axis=slice_axis)
    in_brain: dict[int, float] = {}
    if brain_mask is not None and len(shapes):
        brain = np.asarray(brain_mask)
        if brain.shape != lesions.labels.shape:
            raise ValueError(f"brain mask shape {brain.shape} differs from the label volume "
                             f"{lesions.labels.shape}")
        ids = shapes["lesion_id"].to_numpy()
        inside = ndi.sum(brain > 0, lesions.labels, ids)
        in_brain = {int(i): float(v) / float(n) for i, v, n in
                    zip(ids, inside, shapes["n_voxels"].to_numpy(), strict=True)}
    surround: dict[int, float] = {}
    if (brain_mask is not None and image is not None and min_parenchyma_surround > 0
            and len(shapes)):
        surround = parenchyma_surround(lesions.labels, image, brain_mask, affine,
                                       ring_mm=surround_ring_mm, slice_axis=slice_axis)
    mirror: dict[int, float] = {}
    if (brain_mask is not None and image is not None and max_mirror_ratio > 0
            and len(shapes)):
        aff = _as_affine(affine)
        plane = (mirror_plane if mirror_plane is not None
                 else midsagittal_plane(image, brain_mask, aff))
        mirror = mirror_ratio(lesions.labels, image, brain_mask, aff, plane,
                              search_mm=mirror_search_mm, ring_mm=surround_ring_mm)
    kept, rej = [], []
    for row in shapes.itertuples(index=False):
        reasons = []
        frac = in_brain.get(int(row.lesion_id), 1.0)
        if frac < min_brain_fraction:
            reasons.append(f"outside brain: {frac:.0%} of voxels in the brain mask "
                           f"< {min_brain_fraction:.0%}")
        share = surround.get(int(row.lesion_id), float("nan"))
        if share < min_parenchyma_surround:  # NaN (no ring) never rejects
            reasons.append(
                f"not surrounded by parenchyma: {share:.0%} of the "
                f"{surround_ring_mm[0]:g}-{surround_ring_mm[1]:g} mm ring (in the brain) is "
                f"parenchyma < {min_parenchyma_surround:.0%}")
        twin = mirror.get(int(row.lesion_id), float("nan"))
        if twin >= max_mirror_ratio:  # NaN (near the midline, no ring) never rejects
            reasons.append(f"bilateral mimic: a twin across the midline {twin:.0%} as dark "
                           f">= {max_mirror_ratio:.0%}")
        if row.n_slices > max_slices:
            reasons.append(f"tubular: spans {row.n_slices} slices > {max_slices}")
        if row.max_inplane_mm > max_diameter_mm:
            reasons.append(f"too large: diameter {row.max_inplane_mm:.1f} mm > {max_diameter_mm:g}")
        if row.elongation > max_elongation:
            reasons.append(f"elongated: axis ratio {row.elongation:.2f} > {max_elongation:g}")
        if reasons:
            rec = row._asdict()
            rec["max_score"] = float(lesions.max_score[row.lesion_id - 1])
            rec["reason"] = "; ".join(reasons)
            rej.append(rec)
            logger.info("rejected lesion %d (%s)", row.lesion_id, rec["reason"])
        else:
            kept.append(row.lesion_id)
    rejected = pd.DataFrame(rej, columns=[*shapes.columns, "max_score", "reason"])
    return Rejection(lesions=lesions.subset(kept), kept_ids=np.asarray(kept, dtype=np.int64),
                     rejected=rejected)


# ============================================================================ table / census


def lesion_table(
    labels: np.ndarray,
    affine: np.ndarray,
    scores: MergedLesions | Mapping[int, float] | None = None,
    brain_mask: np.ndarray | None = None,
    region_fn: RegionFn | None = None,
    *,
    patient_id: str = "",
    slice_axis: int = 2,
) -> pd.DataFrame:
    """One row per 3D lesion of ``labels`` (columns :data:`LESION_COLUMNS`).

    ``scores``: a :class:`MergedLesions` (max and mean score) or ``{lesion_id: score}``
    (used as both); missing scores are NaN. ``region_fn`` defaults to
    :func:`assign_regions_geometry` (needs ``brain_mask``; without one the region is
    ``"unknown"``); pass an :class:`AtlasRegionAssigner` for atlas regions.
    """
    affine = np.asarray(affine, dtype=np.float64)
    df = lesion_shapes(labels, affine, slice_axis=slice_axis)
    ids = df["lesion_id"].to_numpy()
    if isinstance(scores, MergedLesions):
        df["max_score"] = scores.max_score[ids - 1] if len(ids) else []
        df["mean_score"] = scores.mean_score[ids - 1] if len(ids) else []
        df["n_instances"] = scores.n_instances[ids - 1] if len(ids) else []
    else:
        sc = {} if scores is None else {int(k): float(v) for k, v in scores.items()}
        df["max_score"] = [sc.get(int(i), np.nan) for i in ids]
        df["mean_score"] = df["max_score"]
        df["n_instances"] = 0
    centres = df[["x_mm", "y_mm", "z_mm"]].to_numpy(dtype=np.float64)
    if region_fn is None:
        region_fn = assign_regions_geometry
    if region_fn is assign_regions_geometry and brain_mask is None:
        if len(df):
            logger.warning("no brain mask: lesion regions set to %r", UNKNOWN)
        regions, subs = np.full(len(df), UNKNOWN, object), np.full(len(df), "", object)
    elif len(df):
        regions, subs = region_fn(centres, brain_mask, affine)
    else:
        regions, subs = np.array([], object), np.array([], object)
    df["region"] = list(regions)
    df["subregion"] = list(subs)
    df["patient_id"] = patient_id
    return df[LESION_COLUMNS].reset_index(drop=True)


def census(df: pd.DataFrame, by: str | None = None) -> pd.DataFrame | dict[str, int]:
    """Lesion counts per MARS region (``lobar, deep, infratentorial``, ``unknown`` if any,
    ``total``). With ``by`` (e.g. ``"patient_id"``) a DataFrame with one row per group."""
    def _one(d: pd.DataFrame) -> dict[str, int]:
        vc = d["region"].value_counts() if len(d) else pd.Series(dtype=int)
        out = {r: int(vc.get(r, 0)) for r in REGIONS}
        other = int(len(d) - sum(out.values()))
        if other:
            out[UNKNOWN] = other
        out["total"] = int(len(d))
        return out

    if by is None:
        return _one(df)
    rows = {key: _one(g) for key, g in df.groupby(by, sort=True)}
    return pd.DataFrame.from_dict(rows, orient="index").fillna(0).astype(int).rename_axis(by)


# ============================================================================ geometric regions


@dataclass(frozen=True)
class BrainFrame:
    """Brain extent in world mm: mid-sagittal x, half-width, AP centre, AP half-length, vertex z."""

    cx: float
    hx: float
    cy: float
    hy: float
    ztop: float

    def normalise(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(|x - cx| / hx, (y - cy) / hy, (z - ztop) / hy) for world points [n, 3]."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        return (np.abs(xyz[:, 0] - self.cx) / self.hx, (xyz[:, 1] - self.cy) / self.hy,
                (xyz[:, 2] - self.ztop) / self.hy)


def brain_frame(brain_mask: np.ndarray, affine: np.ndarray) -> BrainFrame:
    """:class:`BrainFrame` from the largest connected component of ``brain_mask``."""
    mask = np.asarray(brain_mask) > 0
    if not mask.any():
        raise ValueError("brain mask is empty")
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    # extreme world coordinates are reached on the mask's boundary voxels
    edge = mask & ~ndi.binary_erosion(mask)
    aff = np.asarray(affine, dtype=np.float64)
    w = np.argwhere(edge) @ aff[:3, :3].T + aff[:3, 3]
    lo, hi = w.min(0), w.max(0)
    half_vox = 0.5 * np.abs(aff[:3, :3]).sum(1)  # extend to the voxels' outer faces
    lo, hi = lo - half_vox, hi + half_vox
    return BrainFrame(cx=float((lo[0] + hi[0]) / 2), hx=float((hi[0] - lo[0]) / 2),
                      cy=float((lo[1] + hi[1]) / 2), hy=float((hi[1] - lo[1]) / 2),
                      ztop=float(hi[2]))


#: Parameters of the geometric rule (fitted once on the MARS atlas in MNI space, rounded).
GEOMETRY_RULE = {
    "tentorium_w0": -1.21, "tentorium_slope": -0.03, "cerebellum_v": -0.17,
    "brainstem_u": 0.28, "midbrain_u": 0.31, "midbrain_w": -1.0, "midbrain_v0": -0.69,
    "midbrain_v1": 0.0, "deep_au": 0.73, "deep_av": 0.64, "deep_v0": 0.04,
    "deep_aw": 0.43, "deep_w0": -0.74,
}


def assign_regions_geometry(
    centres_world: np.ndarray,
    brain_mask: np.ndarray | None,
    affine: np.ndarray,
    *,
    frame: BrainFrame | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MARS group of world points from brain geometry alone (no registration).

    Frame (world RAS, head assumed roughly aligned with the scanner axes): from the
    brain mask's extent, ``u = |x - cx| / hx`` (lateral), ``v = (y - cy) / hy``
    (anterior), ``w = (z - z_top) / hy`` (depth below the vertex in AP half-lengths;
    the vertex and AP length are stable where the mask's inferior cut is not).

    * infratentorial: below the tentorium plane ``w < -1.21 - 0.03 v`` and either
      posterior (``v < -0.17``, cerebellum) or medial (``u < 0.28``, brainstem); or in
      the midbrain column ``u < 0.31, w < -1.0, -0.69 < v < 0`` (the lateral-anterior
      part below the plane is temporal lobe);
    * deep: inside the central ellipsoid ``(u/0.73)^2 + ((v-0.04)/0.64)^2 +
      ((w+0.74)/0.43)^2 < 1`` (basal ganglia, thalami, capsules, periventricular WM);
    * lobar otherwise.

    Constants fitted once on the MARS atlas (mean of accuracy and balanced accuracy).
    Agreement with the atlas over its brain voxels: accuracy 0.84, per-group recall
    0.97 / 0.73 / 0.84 (infratentorial / deep / lobar); 0.80-0.82 with the head rotated
    ~10 degrees and rescaled. On the synthetic cohort's ground truth (356 lesions, 45
    patients, not used for fitting): accuracy 0.82, recall 0.84 / 0.95 / 0.77; the
    main error is lobar lesions called deep. Use the atlas path for finer regions.
    Returns ``(regions, subregions)``; subregions are ``""`` (unknown without an atlas).
    """
    if frame is None:
        if brain_mask is None:
            raise ValueError("assign_regions_geometry needs a brain mask (or a frame)")
        frame = brain_frame(brain_mask, affine)
    u, v, w = frame.normalise(centres_world)
    p = GEOMETRY_RULE
    infra = (w < p["tentorium_w0"] + p["tentorium_slope"] * v) & (
        (v < p["cerebellum_v"]) | (u < p["brainstem_u"]))
    infra |= ((u < p["midbrain_u"]) & (w < p["midbrain_w"]) & (v > p["midbrain_v0"])
              & (v < p["midbrain_v1"]))
    deep = ((u / p["deep_au"]) ** 2 + ((v - p["deep_v0"]) / p["deep_av"]) ** 2
            + ((w - p["deep_w0"]) / p["deep_aw"]) ** 2) < 1.0
    regions = np.where(infra, "infratentorial", np.where(deep, "deep", "lobar")).astype(object)
    return regions, np.full(len(regions), "", dtype=object)


# ============================================================================ atlas regions


def estimate_brain_mask(image: np.ndarray) -> np.ndarray:
    """Crude brain mask of a head image: Otsu threshold of the smoothed image, largest
    component, closing, hole filling. Prefer a real brain mask when one exists."""
    img = ndi.gaussian_filter(np.asarray(image, dtype=np.float32), 1.0)
    vals = img[img > 0] if (img > 0).any() else img.ravel()
    hist, edges = np.histogram(vals, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    thr = centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))]
    mask = img > thr
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    mask = ndi.binary_closing(mask, iterations=3)
    return ndi.binary_fill_holes(mask)


def _nilearn_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("nilearn is not installed: the MNI template ships in its wheel")
    return Path(spec.origin).parent / "datasets" / "data"


@functools.lru_cache(maxsize=2)
def mni_template(voxel_mm: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """ICBM152 2009a brain mask (GM + WM >= 50%, holes filled) from the nilearn wheel,
    block-averaged to ``voxel_mm`` mm: ``(mask float32 in [0, 1], affine)``."""
    import nibabel as nib

    d = _nilearn_data_dir()
    gm = nib.load(d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm = nib.load(d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    prob = (np.asarray(gm.dataobj, np.float32) + np.asarray(wm.dataobj, np.float32)) / 255.0
    mask = _fill_brain(prob >= 0.5)
    return block_mean(mask.astype(np.float32), np.asarray(gm.affine, np.float64), voxel_mm)


def _fill_brain(mask: np.ndarray) -> np.ndarray:
    """Largest component, closed (3 voxels) and hole-filled (ventricles join the brain)."""
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    pad = 4
    m = ndi.binary_closing(np.pad(mask, pad), iterations=3)[pad:-pad, pad:-pad, pad:-pad]
    return ndi.binary_fill_holes(m | mask)


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _moments(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = mask.astype(np.float64)
    idx = np.indices(mask.shape).reshape(3, -1).T
    wt = w.ravel()
    sel = wt > 0
    pts = idx[sel] @ affine[:3, :3].T + affine[:3, 3]
    wt = wt[sel]
    c = (pts * wt[:, None]).sum(0) / wt.sum()
    var = ((pts - c) ** 2 * wt[:, None]).sum(0) / wt.sum()
    return c, var


def register_to_mni(
    brain_mask: np.ndarray,
    affine: np.ndarray,
    *,
    template_mm: int = 2,
    levels: Sequence[tuple[float, int]] = ((6.0, 4), (3.0, 2)),
    maxiter: int = 2000,
) -> np.ndarray:
    """Affine (12-parameter) registration of a patient's brain mask to the MNI brain mask.

    Brain masks rather than intensities, because SWI contrast has no counterpart among
    the shipped templates and a mask's outline pins an affine well. Initialisation by
    moments (centroids, per-axis spreads), then Powell on the squared difference of the
    Gaussian-smoothed masks, coarse to fine (``levels``: (sigma mm, sampling step in
    template voxels)). Returns the 4x4 matrix mapping patient world mm to MNI mm.
    """
    tmask, taff = mni_template(template_mm)
    aff = np.asarray(affine, dtype=np.float64)
    pm, paff = block_mean((np.asarray(brain_mask) > 0).astype(np.float32), aff,
                           float(template_mm))
    pm = np.maximum(pm, _fill_brain(pm >= 0.5).astype(np.float32))  # ventricles etc. in
    c_f, var_f = _moments(tmask, taff)
    c_m, var_m = _moments(pm, paff)
    s0 = np.log(np.sqrt(var_m / var_f))
    inv_paff = np.linalg.inv(paff)

    def matrix(p: np.ndarray) -> np.ndarray:
        """MNI world -> patient world."""
        t, ang, logs, sh = p[:3] * 10.0, p[3:6] * 0.2, s0 + p[6:9] * 0.1, p[9:12] * 0.1
        shear = np.array([[1, sh[0], sh[1]], [0, 1, sh[2]], [0, 0, 1]])
        lin = _rotation(ang) @ np.diag(np.exp(logs)) @ shear
        m = np.eye(4)
        m[:3, :3] = lin
        m[:3, 3] = c_m + t - lin @ c_f
        return m

    p = np.zeros(12)
    sp_t = np.sqrt((taff[:3, :3] ** 2).sum(0))
    sp_p = np.sqrt((paff[:3, :3] ** 2).sum(0))
    for level, (sigma, step) in enumerate(levels):
        fixed = ndi.gaussian_filter(tmask, sigma / sp_t)
        moving = ndi.gaussian_filter(pm, sigma / sp_p)
        sub = fixed[::step, ::step, ::step]
        if level == 0:  # everything near the brain: a wide capture range
            keep = ndi.binary_dilation(sub > 1e-3, iterations=3)
        else:  # the outline band only: interior and exterior points are uninformative
            keep = (sub > 0.02) & (sub < 0.98)
        grid = np.indices(fixed.shape)[:, ::step, ::step, ::step][:, keep]
        fvals = sub[keep]
        pts_f = taff[:3, :3] @ grid + taff[:3, 3:4]  # MNI world [3, n]

        def cost(q: np.ndarray, fvals=fvals, pts_f=pts_f, moving=moving) -> float:
            m = inv_paff @ matrix(q)
            vox = m[:3, :3] @ pts_f + m[:3, 3:4]
            mv = ndi.map_coordinates(moving, vox, order=1, mode="constant", cval=0.0)
            return float(np.mean((mv - fvals) ** 2))

        res = optimize.minimize(cost, p, method="Powell",
                                options={"maxfev": maxiter, "xtol": 1e-2, "ftol": 1e-6})
        p = res.x
        logger.debug("register_to_mni sigma=%.1f: %d points, cost %.5f after %d evaluations",
                     sigma, len(fvals), res.fun, res.nfev)
    return np.linalg.inv(matrix(p))


@functools.lru_cache(maxsize=4)
def read_atlas(path: str, sqrt_encoded: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Integer labels and affine of an MNI atlas. The MARS map stores squared labels
    (``label = rint(sqrt(value))``); pass ``sqrt_encoded=False`` for plain label maps."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float64)
    lab = np.rint(np.sqrt(np.clip(data, 0, None))) if sqrt_encoded else np.rint(data)
    return lab.astype(np.int16), np.asarray(img.affine, dtype=np.float64)


def atlas_lookup(
    mni_points: np.ndarray, atlas: np.ndarray, atlas_affine: np.ndarray, search_mm: float = 6.0
) -> np.ndarray:
    """Atlas label at each MNI point (nearest voxel); a point on label 0 takes the nearest
    non-zero label within ``search_mm`` (0 when none)."""
    pts = np.atleast_2d(np.asarray(mni_points, dtype=np.float64))
    inv = np.linalg.inv(atlas_affine)
    vox = pts @ inv[:3, :3].T + inv[:3, 3]
    sp = np.sqrt((atlas_affine[:3, :3] ** 2).sum(0))
    r = np.ceil(search_mm / sp).astype(int)
    out = np.zeros(len(pts), dtype=np.int64)
    shape = np.array(atlas.shape)
    for n, v in enumerate(vox):
        c = np.rint(v).astype(int)
        if np.all((c >= 0) & (c < shape)) and atlas[tuple(c)] > 0:
            out[n] = atlas[tuple(c)]
            continue
        lo = np.maximum(c - r, 0)
        hi = np.minimum(c + r + 1, shape)
        if np.any(hi <= lo):
            continue
        patch = atlas[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        nz = np.argwhere(patch > 0)
        if not len(nz):
            continue
        d = np.sqrt(((((nz + lo) - v) * sp) ** 2).sum(1))
        if d.min() <= search_mm:
            out[n] = patch[tuple(nz[int(np.argmin(d))])]
    return out


def _mask_key(brain_mask: np.ndarray, affine: np.ndarray) -> str:
    """Fingerprint of a brain mask on its grid (which patient a registration belongs to)."""
    import hashlib

    m = np.asarray(brain_mask) > 0
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(m.shape).encode())
    h.update(np.asarray(affine, dtype=np.float64).tobytes())
    h.update(np.packbits(m).tobytes())
    return h.hexdigest()


class AtlasRegionAssigner:
    """Atlas regions; callable as a ``region_fn`` of :func:`lesion_table`.

    One instance may serve a whole cohort: a call registers the patient to MNI
    (:func:`register_to_mni`) unless the brain mask is the one already registered
    (fingerprint of mask and affine), maps lesion centres into MNI, looks up the atlas
    label and returns ``(MARS group, subregion name)``. Labels missing from ``labels``
    give ``"unknown"``. ``fit`` registers explicitly; :attr:`matrix` maps patient world
    mm to MNI mm.
    """

    def __init__(self, atlas: str | Path, labels: Mapping[int, tuple[str, str]] = MARS_LABELS,
                 sqrt_encoded: bool = True) -> None:
        self.atlas_path = str(atlas)
        if not Path(self.atlas_path).is_file():
            raise FileNotFoundError(f"atlas not found: {self.atlas_path}")
        self.labels = dict(labels)
        self.sqrt_encoded = sqrt_encoded
        self.matrix: np.ndarray | None = None
        self._key: str | None = None

    def fit(self, brain_mask: np.ndarray, affine: np.ndarray) -> AtlasRegionAssigner:
        """Register the patient's brain mask to MNI; stores :attr:`matrix` (patient -> MNI)."""
        self.matrix = register_to_mni(brain_mask, affine)
        self._key = _mask_key(brain_mask, affine)
        return self

    def __call__(self, centres_world: np.ndarray, brain_mask: np.ndarray | None,
                 affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(regions, subregions) of lesion centres (world mm); registers when needed."""
        if brain_mask is not None:
            if self._key != _mask_key(brain_mask, affine):
                self.fit(brain_mask, affine)
        elif self.matrix is None:
            raise ValueError("atlas regions need a brain mask to register the patient")
        pts = np.atleast_2d(np.asarray(centres_world, dtype=np.float64))
        mni = pts @ self.matrix[:3, :3].T + self.matrix[:3, 3]
        atlas, aaff = read_atlas(self.atlas_path, self.sqrt_encoded)
        labs = atlas_lookup(mni, atlas, aaff)
        regions = np.array([self.labels.get(int(v), ("", UNKNOWN))[1] for v in labs], object)
        subs = np.array([self.labels.get(int(v), (UNKNOWN, ""))[0] for v in labs], object)
        return regions, subs


def assign_regions_atlas(
    centres_world: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    atlas: str | Path,
    *,
    labels: Mapping[int, tuple[str, str]] = MARS_LABELS,
    sqrt_encoded: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One-shot atlas regions: register ``brain_mask`` to MNI, look up ``atlas`` at the
    lesion centres. Returns ``(regions, subregions)``. Without a brain mask, build one
    with :func:`estimate_brain_mask` from the image first."""
    return AtlasRegionAssigner(atlas, labels, sqrt_encoded).fit(brain_mask, affine)(
        centres_world, brain_mask, affine)
