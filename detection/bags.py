"""Lesion bags for the MIL classifier (DESIGN.md contract 4), from detector outputs.

Pure numpy/scipy/nibabel/pandas plus :mod:`mil.bagio` (the format); no Detectron2.

One bag per patient: a 2.5D crop and a named feature vector per 3D lesion, with the
lesion ids of ``lesions.csv`` so MIL attention maps back to its rows. Everything is
computed on the canonical RAS voxel grid (axis 0 = left->Right, 1 = posterior->Anterior,
2 = inferior->Superior, axial slices along axis 2), so crops are oriented the same way
for every scanner.

Instance features (:data:`FEATURE_NAMES`, in this order; MIL addresses them by name)
-----------------------------------------------------------------------------------
``score``
    ``max_score`` of ``lesions.csv`` (detector confidence; 1.0 in ground-truth mode).
``volume_mm3``, ``diameter_mm``, ``elongation``, ``n_slices``
    Copied from ``lesions.csv`` (see :func:`detection.lesions.lesion_shapes`).
``contrast``
    ``(mean(SWI in lesion) - mean(SWI in shell)) / sd_brain``; the shell is the voxels
    within ``shell_mm`` (3 mm; at least one voxel in-plane) of the lesion, inside the
    brain mask, excluding every lesion's voxels; ``sd_brain`` is the robust SD
    (1.4826 x MAD) of the raw SWI inside the brain mask, lesions excluded. Negative =
    darker than the surroundings (a CMB is strongly negative). 0 when the shell is
    empty.
``region_lobar``, ``region_deep``, ``region_infratentorial``
    One-hot of ``lesions.csv``'s ``region`` (all zero for ``unknown``).
``depth_mm``
    Euclidean distance transform of the brain mask (voxel spacing in mm) at the voxel
    nearest the lesion's centre of mass: distance to the nearest non-brain voxel
    centre, 0 outside the mask.
``pos_lr``, ``pos_ap``, ``pos_si``
    Lesion centre of mass (world RAS mm) relative to the brain mask's bounding box:
    ``(c - box_centre) / box_half_size`` per axis, so -1..1 inside the box (not
    clipped). **Signed**: ``pos_lr`` -1 = patient's left edge, +1 = right edge;
    ``pos_ap`` +1 = anterior; ``pos_si`` +1 = superior (vertex).

Crops
-----
:func:`lesion_crops`: ``[N, 3, S, S]`` float32 from the brain-percentile normalised
volume (0..1, :func:`detection.data.volume.normalize_intensity`), channels = axial
slices ``z - k, z, z + k`` (clamped to the volume) where ``z`` is the slice nearest the
lesion centre; each channel is resampled bilinearly (order 1) on a ``size_mm`` x
``size_mm`` square centred on the in-plane centre of mass, ``S = size_px`` pixels;
``crop[c, u, v]``: ``u`` runs along RAS axis 0 (left->right), ``v`` along axis 1
(posterior->anterior). Outside the volume reads 0.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from mil import FEATURE_NAMES as MIL_FEATURE_NAMES
from mil.bagio import save_bag, write_index

from .data.volume import (
    CohortError,
    Volume,
    compute_brain_mask,
    label_lesions,
    load_mask,
    load_swi,
    normalize_intensity,
    reorient_to_ras,
)
from .fileio import write_json_atomic
from .lesions import lesion_table

__all__ = [
    "FEATURE_NAMES",
    "BAG_SOURCES",
    "BagSource",
    "lesion_centres",
    "lesion_features",
    "lesion_crops",
    "write_patient_bag",
    "write_bags",
]

logger = logging.getLogger(__name__)

#: Instance feature columns written by :func:`lesion_features`: the bag contract's names,
#: defined once in :mod:`mil` (detection may import mil; never the reverse).
FEATURE_NAMES: tuple[str, ...] = MIL_FEATURE_NAMES

BagSource = Literal["in-fold", "out-of-fold", "ground-truth"]
BAG_SOURCES: tuple[str, ...] = ("in-fold", "out-of-fold", "ground-truth")

PRED_NAME = "cmb_pred.nii.gz"
TABLE_NAME = "lesions.csv"
META_NAME = "bags_meta.json"
_TABLE_REQUIRED = ("lesion_id", "max_score", "volume_mm3", "diameter_mm", "elongation",
                   "n_slices", "region")
_REGIONS = ("lobar", "deep", "infratentorial")


# ============================================================================ helpers


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))


def lesion_centres(labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Centre of mass (voxel coordinates, float64 [N, 3]) of each lesion id in ``labels``."""
    ids = [int(i) for i in ids]
    out = np.zeros((len(ids), 3), dtype=np.float64)
    if not ids:
        return out
    labels = np.asarray(labels)
    boxes = ndi.find_objects(labels.astype(np.int32, copy=False), max_label=max(ids))
    missing = []
    for n, lid in enumerate(ids):
        box = boxes[lid - 1] if lid >= 1 else None
        if box is None:
            missing.append(lid)
            continue
        out[n] = np.argwhere(labels[box] == lid).mean(0) + [b.start for b in box]
    if missing:
        raise ValueError(f"lesion id(s) {missing[:10]} not present in the label volume")
    return out


def _present_ids(labels: np.ndarray) -> set[int]:
    lab = np.asarray(labels).ravel()
    if lab.size and lab.min() < 0:
        raise ValueError("negative lesion labels")
    counts = np.bincount(lab.astype(np.int64, copy=False))
    return {int(i) for i in np.nonzero(counts)[0] if i > 0}


def _depth(brain: np.ndarray, centres: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from the voxel nearest each centre to the nearest non-brain
    voxel centre (= the brain mask's EDT there; 0 outside the mask), via a k-d tree of the
    background voxels touching the brain (26-neighbourhood) instead of a full EDT."""
    from scipy.spatial import cKDTree

    shape = np.array(brain.shape)
    vox = np.clip(np.rint(centres).astype(int), 0, shape - 1)
    inside = brain[vox[:, 0], vox[:, 1], vox[:, 2]]
    out = np.zeros(len(vox), dtype=np.float64)
    if not inside.any():
        return out
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = brain[sl]
    rim = ~sub & ndi.binary_dilation(sub, structure=np.ones((3, 3, 3), bool))
    pts = np.argwhere(rim) + lo
    if len(pts):
        tree = cKDTree(pts * spacing)
        d, _ = tree.query(vox[inside] * spacing)
        out[inside] = d
    else:  # the brain fills the whole array: distance to the array's outer voxel layer
        v = vox[inside]
        out[inside] = np.min(np.concatenate([(v + 1) * spacing, (shape - v) * spacing], 1), 1)
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _brain_box(brain: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, half size) in world mm of the brain's largest component, to voxel faces."""
    mask = _largest_component(brain)
    idx = np.argwhere(mask)
    lo_v, hi_v = idx.min(0), idx.max(0)
    aff = np.asarray(affine, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (lo_v[0] - 0.5, hi_v[0] + 0.5)
                        for b in (lo_v[1] - 0.5, hi_v[1] + 0.5)
                        for c in (lo_v[2] - 0.5, hi_v[2] + 0.5)])
    w = corners @ aff[:3, :3].T + aff[:3, 3]
    lo, hi = w.min(0), w.max(0)
    return (lo + hi) / 2.0, np.maximum((hi - lo) / 2.0, 1e-6)


def _ellipsoid(radius_vox: np.ndarray) -> np.ndarray:
    r = [int(x) for x in radius_vox]
    grids = np.ogrid[tuple(slice(-x, x + 1) for x in r)]
    d = sum((g / max(x, 1e-9)) ** 2 if x > 0 else (g != 0) * 2.0 for g, x in zip(grids, r))
    return d <= 1.0


def _robust_sd(values: np.ndarray) -> float:
    if values.size < 2:
        return 0.0
    med = np.median(values)
    sd = 1.4826 * float(np.median(np.abs(values - med)))
    if sd <= 1e-12:
        sd = float(np.std(values))
    return sd


def _contrast(
    swi: np.ndarray, labels: np.ndarray, brain: np.ndarray, ids: Sequence[int],
    spacing: np.ndarray, shell_mm: float,
) -> np.ndarray:
    """Lesion-vs-shell contrast in units of the brain's robust SD (module docstring)."""
    lesion_any = labels > 0
    sd = _robust_sd(swi[brain & ~lesion_any]) if brain.any() else 0.0
    if sd <= 1e-12:
        sd = _robust_sd(swi[~lesion_any])
    if sd <= 1e-12:
        logger.warning("contrast: flat image (SD 0); contrast reported in raw intensity units")
        sd = 1.0
    rad = np.round(shell_mm / spacing).astype(int)
    rad[:2] = np.maximum(rad[:2], 1)
    rad = np.maximum(rad, 0)
    struct = _ellipsoid(rad)
    boxes = ndi.find_objects(labels)
    out = np.zeros(len(ids), dtype=np.float64)
    shape = np.array(labels.shape)
    for n, lid in enumerate(ids):
        box = boxes[lid - 1] if lid - 1 < len(boxes) else None
        if box is None:
            continue
        lo = np.maximum([s.start for s in box] - rad, 0)
        hi = np.minimum([s.stop for s in box] + rad, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        les = labels[sl] == lid
        grown = ndi.binary_dilation(les, structure=struct)
        shell = grown & ~lesion_any[sl] & brain[sl]
        sub = swi[sl]
        if not shell.any():
            logger.debug("lesion %d: empty contrast shell", lid)
            continue
        out[n] = (float(sub[les].mean()) - float(sub[shell].mean())) / sd
    return out


def _region_onehot(regions: Sequence[Any]) -> np.ndarray:
    reg = np.array([str(r).strip().lower() for r in regions], dtype=object)
    return np.stack([(reg == r).astype(np.float64) for r in _REGIONS], axis=1).reshape(
        len(reg), len(_REGIONS))


def _numeric(table: pd.DataFrame, col: str) -> np.ndarray:
    vals = pd.to_numeric(table[col], errors="coerce").to_numpy(np.float64)
    if not np.all(np.isfinite(vals)):
        raise CohortError(f"lesion table: column {col!r} has missing or non-numeric values")
    return vals


def _check_table(table: pd.DataFrame, where: str) -> None:
    missing = [c for c in _TABLE_REQUIRED if c not in table.columns]
    if missing:
        raise CohortError(f"{where}: missing column(s) {missing} (has {list(table.columns)})")
    ids = table["lesion_id"]
    if ids.duplicated().any():
        raise CohortError(f"{where}: duplicate lesion_id {sorted(set(ids[ids.duplicated()]))}")


def _check_ids(table_ids: Sequence[int], labels: np.ndarray, where: str) -> None:
    present = _present_ids(labels)
    listed = set(int(v) for v in table_ids)
    if present != listed:
        only_tab = sorted(listed - present)[:10]
        only_vol = sorted(present - listed)[:10]
        raise CohortError(
            f"{where}: lesion ids do not match the prediction's labels "
            f"(in the table only: {only_tab}; in the label volume only: {only_vol})"
        )


# ============================================================================ features / crops


def lesion_features(
    swi_ras: np.ndarray,
    labels_ras: np.ndarray,
    affine: np.ndarray,
    table: pd.DataFrame,
    brain_mask: np.ndarray | None,
    *,
    shell_mm: float = 3.0,
) -> tuple[np.ndarray, list[str]]:
    """Named instance features, one row per ``table`` row (definitions: module docstring).

    Args:
        swi_ras: raw SWI intensities on the RAS grid.
        labels_ras: lesion ids on the same grid (ids = ``table.lesion_id``).
        affine: RAS voxel -> world (mm).
        table: ``lesions.csv`` rows (needs ``lesion_id, max_score, volume_mm3,
            diameter_mm, elongation, n_slices, region``).
        brain_mask: bool brain mask on the grid; computed from ``swi_ras`` when None.
        shell_mm: thickness of the contrast shell.

    Returns:
        ``(features float32 [N, 13], feature_names)`` with names :data:`FEATURE_NAMES`.
    """
    names = list(FEATURE_NAMES)
    _check_table(table, "lesion table")
    n = len(table)
    if n == 0:
        return np.zeros((0, len(names)), dtype=np.float32), names
    swi = np.asarray(swi_ras, dtype=np.float32)
    labels = np.asarray(labels_ras)
    if labels.shape != swi.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the SWI's {swi.shape}")
    labels = labels.astype(np.int32, copy=False)
    aff = np.asarray(affine, dtype=np.float64)
    spacing = _spacing(aff)
    brain = (compute_brain_mask(swi, tuple(spacing)) if brain_mask is None
             else np.asarray(brain_mask) > 0)
    if brain.shape != swi.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from the SWI's {swi.shape}")
    ids = [int(i) for i in table["lesion_id"]]
    _check_ids(ids, labels, "lesion table")
    centres = lesion_centres(labels, ids)
    world = centres @ aff[:3, :3].T + aff[:3, 3]

    score = pd.to_numeric(table["max_score"], errors="coerce").to_numpy(np.float64)
    if np.isnan(score).any():
        logger.warning("%d lesion(s) without a score: score set to 1.0", int(np.isnan(score).sum()))
        score = np.where(np.isnan(score), 1.0, score)
    contrast = _contrast(swi, labels, brain, ids, spacing, shell_mm)
    if brain.any():
        depth = _depth(brain, centres, spacing)
        c, h = _brain_box(brain, aff)
        pos = (world - c) / h
    else:
        logger.warning("empty brain mask: depth 0 and positions relative to the whole volume")
        depth = np.zeros(n)
        c, h = _brain_box(np.ones(swi.shape, dtype=bool), aff)
        pos = (world - c) / h
    cols = {
        "score": score,
        "volume_mm3": _numeric(table, "volume_mm3"),
        "diameter_mm": _numeric(table, "diameter_mm"),
        "elongation": _numeric(table, "elongation"),
        "contrast": contrast,
        "n_slices": _numeric(table, "n_slices"),
        "depth_mm": depth,
        "pos_lr": pos[:, 0],
        "pos_ap": pos[:, 1],
        "pos_si": pos[:, 2],
    }
    onehot = _region_onehot(table["region"].tolist())
    for j, r in enumerate(_REGIONS):
        cols[f"region_{r}"] = onehot[:, j]
    feats = np.stack([np.asarray(cols[k], dtype=np.float64) for k in names], axis=1)
    return feats.astype(np.float32), names


def lesion_crops(
    swi_ras_normalised: np.ndarray,
    centres_vox: np.ndarray,
    affine: np.ndarray,
    size_mm: float = 16.0,
    size_px: int = 32,
    context_offset: int = 1,
) -> np.ndarray:
    """2.5D patches of fixed physical size around lesion centres: float32 ``[N, 3, S, S]``.

    ``centres_vox``: ``[N, 3]`` RAS voxel coordinates (sub-voxel allowed). Channels are
    axial slices ``z - k, z, z + k`` (``k = context_offset``, clamped) with ``z`` the
    slice nearest the centre; in plane, ``size_px`` pixels of ``size_mm / size_px`` mm
    sampled bilinearly around the centre (``crop[c, u, v]``, ``u`` along axis 0,
    ``v`` along axis 1; 0 outside the volume).
    """
    vol = np.asarray(swi_ras_normalised, dtype=np.float32)
    centres = np.asarray(centres_vox, dtype=np.float64).reshape(-1, 3)
    s = int(size_px)
    if s < 1 or size_mm <= 0:
        raise ValueError(f"size_px must be >= 1 and size_mm > 0, got {size_px}, {size_mm}")
    k = int(context_offset)
    if k < 0:
        raise ValueError(f"context_offset must be >= 0, got {context_offset}")
    out = np.zeros((len(centres), 3, s, s), dtype=np.float32)
    if not len(centres):
        return out
    sp = _spacing(affine)
    offs = (np.arange(s, dtype=np.float64) + 0.5 - s / 2.0) * (float(size_mm) / s)
    du, dv = np.meshgrid(offs / sp[0], offs / sp[1], indexing="ij")
    nz = vol.shape[2]
    for n, (ci, cj, ck) in enumerate(centres):
        z = int(np.clip(np.rint(ck), 0, nz - 1))
        coords = np.stack([ci + du, cj + dv])
        for c, zz in enumerate((z - k, z, z + k)):
            plane = vol[:, :, int(np.clip(zz, 0, nz - 1))]
            out[n, c] = ndi.map_coordinates(plane, coords, order=1, mode="constant", cval=0.0)
    return out


# ============================================================================ one patient


def _as_ras(
    swi: Volume | nib.spatialimages.SpatialImage,
    labels: np.ndarray,
    brain_mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(swi, labels, brain, affine) on the RAS grid; arrays of a nibabel image are reoriented."""
    if isinstance(swi, Volume):
        return swi.data, np.asarray(labels), brain_mask, swi.affine
    data = np.asarray(swi.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3])
    aff = np.asarray(swi.affine, dtype=np.float64)
    data_ras, aff_ras, _ = reorient_to_ras(data, aff)
    lab = np.asarray(labels)
    if lab.shape != data.shape:
        raise ValueError(f"labels shape {lab.shape} differs from the SWI's {data.shape}")
    lab_ras = reorient_to_ras(lab, aff)[0]
    brain_ras = None
    if brain_mask is not None:
        bm = np.asarray(brain_mask)
        if bm.shape != data.shape:
            raise ValueError(f"brain mask shape {bm.shape} differs from the SWI's {data.shape}")
        brain_ras = reorient_to_ras(bm, aff)[0]
    return data_ras, lab_ras, brain_ras, aff_ras


def write_patient_bag(
    out_path: str | os.PathLike,
    patient_id: str,
    swi: Volume | nib.spatialimages.SpatialImage,
    labels: np.ndarray,
    table: pd.DataFrame,
    brain_mask: np.ndarray | None = None,
    *,
    crop_mm: float = 16.0,
    crop_px: int = 32,
    context_offset: int = 1,
    percentiles: tuple[float, float] = (1.0, 99.0),
    shell_mm: float = 3.0,
) -> tuple[Path, int]:
    """Compute features and crops for one patient and write its bag (``mil.bagio``).

    ``swi`` is a :class:`~detection.data.volume.Volume` (then ``labels`` and
    ``brain_mask`` are on its RAS grid) or a nibabel image (then they are on the image's
    stored grid and are reoriented with it). Bag rows follow ``table`` and its
    ``lesion_id`` column; an empty table gives an empty bag. Returns ``(path, n)``.
    """
    data, labels_ras, brain, aff = _as_ras(swi, labels, brain_mask)
    if labels_ras.shape != data.shape:
        raise ValueError(f"labels shape {labels_ras.shape} differs from the SWI's {data.shape}")
    brain = (compute_brain_mask(data, tuple(_spacing(aff))) if brain is None
             else np.asarray(brain) > 0)
    feats, names = lesion_features(data, labels_ras, aff, table, brain, shell_mm=shell_mm)
    ids = table["lesion_id"].to_numpy(np.int64) if len(table) else np.zeros(0, np.int64)
    if len(ids):
        norm, _, _ = normalize_intensity(data, brain, percentiles)
        centres = lesion_centres(labels_ras, ids)
        crops = lesion_crops(norm, centres, aff, crop_mm, crop_px, context_offset)
    else:
        crops = np.zeros((0, 3, int(crop_px), int(crop_px)), dtype=np.float32)
    path = save_bag(out_path, crops, feats, names, ids, str(patient_id))
    logger.debug("bag %s: %d lesion(s) -> %s", patient_id, len(ids), path)
    return path, int(len(ids))


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CohortError(f"lesion table {path}: file not found")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values={"max_score": ["", "nan", "NaN"]})
    except pd.errors.EmptyDataError:
        raise CohortError(f"lesion table {path}: empty file (no header)") from None
    except Exception as exc:
        raise CohortError(
            f"lesion table {path}: cannot parse ({type(exc).__name__}: {exc})"
        ) from exc
    _check_table(df, f"lesion table {path}")
    if len(df):
        try:
            df["lesion_id"] = df["lesion_id"].astype(np.int64)
        except (TypeError, ValueError) as exc:
            raise CohortError(f"lesion table {path}: non-integer lesion_id ({exc})") from exc
    return df


def _patient_job(job: dict[str, Any]) -> dict[str, Any]:
    """Write one patient's bag (runs in a worker). Never raises: returns a status dict."""
    pid = job["patient_id"]
    try:
        vol = load_swi(job["swi"], nonfinite=job["nonfinite"])
        brain = None
        if job.get("brain_mask"):
            brain = load_mask(job["brain_mask"], vol, "brain mask", job["affine_tol"]) > 0
        if job["source"] == "ground-truth":
            if not job.get("cmb_mask"):
                raise CohortError(
                    f"patient {pid!r}: ground-truth bags need a cmb_mask in the manifest"
                )
            raw = load_mask(job["cmb_mask"], vol, "CMB mask", job["affine_tol"])
            labels, _ = label_lesions(raw)
            if brain is None:
                brain = compute_brain_mask(vol.data, vol.spacing)
            ids = sorted(_present_ids(labels))
            table = lesion_table(labels, vol.affine, {i: 1.0 for i in ids}, brain,
                                 patient_id=pid)
        else:
            pdir = Path(job["pred_dir"]) / pid
            pred = pdir / PRED_NAME
            labels = load_mask(pred, vol, "prediction", job["affine_tol"])
            table_path = pdir / TABLE_NAME
            table = _read_table(table_path)
            _check_ids(table["lesion_id"].tolist(), labels,
                       f"lesion table {table_path} vs prediction {pred}")
        path, n = write_patient_bag(
            job["out_path"], pid, vol, labels, table, brain,
            crop_mm=job["crop_mm"], crop_px=job["crop_px"],
            context_offset=job["context_offset"], shell_mm=job["shell_mm"],
        )
    except CohortError as exc:
        return {"patient_id": pid, "status": "error", "message": str(exc)}
    except Exception as exc:  # report, never kill the pool
        logger.debug("patient %s failed", pid, exc_info=True)
        return {"patient_id": pid, "status": "error", "message": f"{type(exc).__name__}: {exc}"}
    return {"patient_id": pid, "status": "ok", "path": str(path), "n_instances": n}


# ============================================================================ cohort


def _run(jobs: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc="bags", unit="patient", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_patient_job(job))
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for res in pool.imap_unordered(_patient_job, jobs, chunksize=1):
                    results.append(res)
                    bar.update(1)
    finally:
        bar.close()
    return results


def write_bags(
    pred_dir: str | os.PathLike | None,
    manifest_df: pd.DataFrame | str | os.PathLike,
    out_dir: str | os.PathLike,
    source: BagSource = "in-fold",
    workers: int = 1,
    progress: bool = True,
    *,
    crop_mm: float = 16.0,
    crop_px: int = 32,
    context_offset: int = 1,
    shell_mm: float = 3.0,
    nonfinite: Literal["error", "zero"] = "error",
    affine_tol: float = 1e-3,
) -> Path:
    """Write one bag per manifest patient and ``<out_dir>/index.csv``; return the index path.

    Per patient: ``<pred_dir>/<patient_id>/cmb_pred.nii.gz`` (instance labels on the SWI's
    grid and affine) and ``lesions.csv`` (ids must match the labels), the manifest's
    ``swi`` and ``brain_mask`` (computed when absent). ``source="ground-truth"`` ignores
    ``pred_dir`` and builds bags from the manifest's ``cmb_mask`` (binary masks split
    into 26-connected components), score 1.0. Patients without lesions get empty bags.

    ``manifest_df``: a validated manifest (``detection.data.manifest.read_cohort``,
    absolute paths) or a path to one. Index columns: ``patient_id, center, label,
    n_instances, path`` (+ ``age`` when the manifest has it) + ``bag_source``. Writes
    ``bags_meta.json`` (parameters). If any patient fails the others' bags are written,
    the index is not, and one :class:`CohortError` lists the failures.
    """
    if source not in BAG_SOURCES:
        raise ValueError(f"source must be one of {BAG_SOURCES}, got {source!r}")
    if source != "ground-truth":
        if pred_dir is None:
            raise ValueError(f"source={source!r} needs a prediction folder (pred_dir)")
        if not Path(pred_dir).is_dir():
            raise CohortError(f"prediction folder {pred_dir}: not a directory")
    if isinstance(manifest_df, pd.DataFrame):
        cohort = manifest_df.reset_index(drop=True)
    else:
        from .data.manifest import read_cohort

        cohort = read_cohort(manifest_df)
    for col in ("patient_id", "center", "swi"):
        if col not in cohort.columns:
            raise CohortError(f"manifest: missing column {col!r}")
    if cohort["patient_id"].astype(str).duplicated().any():
        raise CohortError("manifest: duplicate patient_id")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for r in cohort.to_dict("records"):
        pid = str(r["patient_id"])
        jobs.append({
            "patient_id": pid,
            "swi": str(r["swi"]),
            "cmb_mask": _path_or_empty(r.get("cmb_mask")),
            "brain_mask": _path_or_empty(r.get("brain_mask")),
            "pred_dir": None if pred_dir is None else str(pred_dir),
            "out_path": str(out / f"{pid}.npz"),
            "source": source,
            "crop_mm": float(crop_mm),
            "crop_px": int(crop_px),
            "context_offset": int(context_offset),
            "shell_mm": float(shell_mm),
            "nonfinite": nonfinite,
            "affine_tol": float(affine_tol),
        })
    results = {r["patient_id"]: r for r in _run(jobs, int(workers), progress)}
    failures = [f"{pid}: {r['message']}" for pid, r in sorted(results.items())
                if r["status"] != "ok"]
    if failures:
        raise CohortError(
            f"bags in {out} failed for {len(failures)} of {len(jobs)} patient(s) "
            "(the others are written; index not written):\n  " + "\n  ".join(failures)
        )
    has_age = "age" in cohort.columns
    entries = []
    for r in cohort.to_dict("records"):
        pid = str(r["patient_id"])
        label = r.get("label")
        e: dict[str, Any] = {
            "patient_id": pid,
            "center": str(r["center"]),
            "label": "" if label is None or pd.isna(label) else str(label),
            "n_instances": results[pid]["n_instances"],
            "path": results[pid]["path"],
        }
        if has_age:
            age = pd.to_numeric(pd.Series([r.get("age")]), errors="coerce").iloc[0]
            e["age"] = float(age) if pd.notna(age) else np.nan
        e["bag_source"] = source
        entries.append(e)
    index = write_index(out / "index.csv", entries)
    write_json_atomic(out / META_NAME, {
        "source": source,
        "pred_dir": None if pred_dir is None else str(Path(pred_dir).resolve()),
        "feature_names": list(FEATURE_NAMES),
        "crop_mm": float(crop_mm), "crop_px": int(crop_px),
        "context_offset": int(context_offset), "shell_mm": float(shell_mm),
        "n_patients": len(entries),
        "n_instances": int(sum(e["n_instances"] for e in entries)),
    })
    logger.info("wrote %d bag(s) (%d lesion(s), source %s) and %s", len(entries),
                sum(e["n_instances"] for e in entries), source, index)
    return index


def _path_or_empty(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v).strip()
