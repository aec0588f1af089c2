"""Export a cohort of SWI volumes as 2.5D axial slices + COCO instance annotations.

Layout written under ``out`` (docs/CONTRACTS.md)::

    images/<patient_id>/<slice:04d>.png   8-bit RGB: R = slice z-k, G = z, B = z+k
    annotations/{fold{k}_train,fold{k}_val,dev,external}.json
    splits.json                           external patients + label-stratified folds
    export_meta.json                      parameters + per-patient geometry
    patients/<patient_id>.json            per-patient fragment + up-to-date stamp

Geometry. Volumes are reoriented to canonical RAS (no resampling), then every axial
slice ``z`` is laid out as an image with rows running anterior -> posterior and
columns right-ward (``A[z, r, c] = V_ras[c, Y-1-r, z]``) and resampled in plane to
``target_spacing`` mm (images: bilinear; lesion masks: nearest neighbour with
pixel-centre alignment, implemented with exact integer index maps). For pixel
``(col, row)`` of slice ``z`` (integer indices = pixel centres)
``export_meta.json["patients"][pid]["pixel_to_original_voxel"] @ [col, row, z, 1]``
gives the voxel coordinates in the input file, and ``pixel_to_world`` the scanner
coordinates in mm. :func:`pixel_to_voxel` and :func:`export_to_original` do this.

Lesions: a CMB mask with instance ids keeps them; a binary mask gets 26-connected 3D
components. One COCO annotation per lesion per slice (RLE), ``lesion_id`` = the id.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_util
from scipy import ndimage

from ..fileio import write_json_atomic
from .manifest import LABELS, check_grids, read_cohort
from .volume import (
    LESION_CONNECTIVITY,
    Case,
    CohortError,
    NonFinitePolicy,
    correct_bias,
    load_case,
    ras_to_original,
    to_uint8,
)
from .volume import normalize_intensity as _normalize

__all__ = [
    "EXPORT_VERSION",
    "DEFAULT_CONTEXT_OFFSET",
    "DEFAULT_TARGET_SPACING",
    "ExportParams",
    "ExportSummary",
    "PreparedVolume",
    "prepare_volume",
    "prepare_case",
    "export_coco",
    "make_splits",
    "nearest_index",
    "inplane_shape",
    "pixel_to_ras_matrix",
    "pixel_to_voxel",
    "pixel_to_world",
    "export_to_original",
    "rebuild_volume_mask",
    "load_export_meta",
]

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1
# Keep in sync with cfg.CMB.CONTEXT_OFFSET / cfg.CMB.TARGET_SPACING (detection/config.py).
DEFAULT_CONTEXT_OFFSET = 1
DEFAULT_TARGET_SPACING = 0.5
CATEGORIES = [{"id": 1, "name": "cmb", "supercategory": "lesion"}]
# zlib level 1 + the "sub" filter + RLE strategy: 2.5-5x faster than level 1 alone on SWI
# slices, files ~3% larger (benchmarks/bench_export.py "png_write"); older OpenCV: level 1.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
if hasattr(cv2, "IMWRITE_PNG_FILTER") and hasattr(cv2, "IMWRITE_PNG_STRATEGY_RLE"):
    _PNG_PARAMS += [
        cv2.IMWRITE_PNG_FILTER,
        cv2.IMWRITE_PNG_FILTER_SUB,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_RLE,
    ]


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ExportParams:
    """Everything that changes the per-patient outputs (part of the up-to-date stamp)."""

    context_offset: int = DEFAULT_CONTEXT_OFFSET
    target_spacing: float = DEFAULT_TARGET_SPACING  # mm in plane; 0 = native spacing
    slices: str = "brain"  # "brain" (slices with brain or lesion voxels) | "all"
    percentiles: tuple[float, float] = (1.0, 99.0)
    nonfinite: NonFinitePolicy = "error"
    connectivity: int = LESION_CONNECTIVITY
    # >= 0: voxels farther than this (mm) from the brain mask are set to 0 (skull strip);
    # < 0 keeps the whole head.
    brain_margin_mm: float = -1.0
    # > 0: divide out a smooth intensity field (polynomial of this degree fitted to the
    # brain's log intensity) before the percentile scaling; 0 = off.
    bias_degree: int = 0

    def __post_init__(self) -> None:
        if self.context_offset < 0:
            raise ValueError(f"context_offset must be >= 0, got {self.context_offset}")
        if self.target_spacing < 0:
            raise ValueError(f"target_spacing must be >= 0, got {self.target_spacing}")
        if self.slices not in ("brain", "all"):
            raise ValueError(f"slices must be 'brain' or 'all', got {self.slices!r}")
        if self.nonfinite not in ("error", "zero"):
            raise ValueError(f"nonfinite must be 'error' or 'zero', got {self.nonfinite!r}")
        lo, hi = (float(v) for v in self.percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got "
                             f"{tuple(self.percentiles)}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d


# --------------------------------------------------------------------------- geometry


def inplane_shape(nx: int, ny: int, sx: float, sy: float, target: float) -> tuple[int, int]:
    """Image ``(height, width)`` of an axial slice of ``nx`` x ``ny`` voxels after resampling.

    Rows follow RAS y (``ny`` voxels of ``sy`` mm), columns RAS x. ``target <= 0``
    keeps the native grid.
    """
    if target <= 0:
        return int(ny), int(nx)
    return max(1, int(round(ny * sy / target))), max(1, int(round(nx * sx / target)))


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index for pixel-centre-aligned nearest resampling.

    ``floor((i + 0.5) * n_in / n_out)`` computed in integers (exact).
    """
    i = np.arange(n_out, dtype=np.int64)
    return ((2 * i + 1) * n_in) // (2 * n_out)


def _inverse_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """For each source index, an output index mapped to it (exact when ``n_out >= n_in``)."""
    s = np.arange(n_in, dtype=np.int64)
    return np.minimum(((2 * s + 1) * n_out) // (2 * n_in), n_out - 1)


def pixel_to_ras_matrix(nx: int, ny: int, height: int, width: int) -> np.ndarray:
    """4x4 matrix mapping ``[col, row, slice, 1]`` to continuous RAS voxel ``[x, y, z, 1]``."""
    fx, fy = nx / width, ny / height
    return np.array(
        [
            [fx, 0.0, 0.0, 0.5 * fx - 0.5],
            [0.0, -fy, 0.0, ny - 0.5 - 0.5 * fy],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def _from_image_layout(arr: np.ndarray) -> np.ndarray:
    """Image layout ``(Z, Y, X)`` (anterior row first) -> RAS ``(X, Y, Z)``."""
    return arr[:, ::-1, :].transpose(2, 1, 0)


def _resample_images(vol_ras: np.ndarray, height: int, width: int) -> np.ndarray:
    """Axial slices of a RAS uint8 volume in image layout ``(Z, H, W)``, resampled in plane
    (bilinear; area averaging when shrinking; pixel centres aligned as in
    :func:`pixel_to_ras_matrix`)."""
    nx, ny, nz = vol_ras.shape
    stack = vol_ras.transpose(2, 1, 0)  # (Z, Y, X), C-contiguous when the volume is F-ordered
    out = np.empty((nz, height, width), dtype=vol_ras.dtype)
    if (ny, nx) == (height, width):
        out[:] = stack[:, ::-1, :]
        return out
    interp = cv2.INTER_LINEAR if height >= ny and width >= nx else cv2.INTER_AREA
    for k in range(nz):
        # Centre-aligned resampling commutes with the row flip, so flip the (cheap) output.
        res = cv2.resize(np.ascontiguousarray(stack[k]), (width, height), interpolation=interp)
        out[k] = res[::-1]
    return out


def _resample_labels(
    lesions_ras: np.ndarray, height: int, width: int, slices: Sequence[int] | None = None
) -> np.ndarray:
    """Lesion ids in image layout ``(Z, H, W)`` with nearest-neighbour in-plane resampling
    (exact integer index maps, see :func:`nearest_index`). Only ``slices`` (default: the
    slices holding a lesion) are filled; the others are 0."""
    nx, ny, nz = lesions_ras.shape
    out = np.zeros((nz, height, width), dtype=np.int32)
    rows = nearest_index(ny, height)
    cols = nearest_index(nx, width)
    if slices is None:
        slices = np.flatnonzero(lesions_ras.any(axis=(0, 1)))
    for z in slices:
        lay = lesions_ras[:, :, z].T[::-1]  # (Y, X), anterior row first
        out[z] = lay[rows][:, cols]
    return out


# --------------------------------------------------------------------------- one volume


@dataclass
class PreparedVolume:
    """A volume ready for 2D detection: normalised, resampled slices in image layout."""

    images: np.ndarray  # uint8 (Z, H, W): one grey slice per axial index
    labels: np.ndarray | None  # int32 (Z, H, W) lesion ids, or None without a mask
    slice_indices: list[int]  # slices selected for export (see ExportParams.slices)
    meta: dict[str, Any]  # geometry (see module docstring) and provenance
    context_offset: int = DEFAULT_CONTEXT_OFFSET

    def rgb(self, z: int) -> np.ndarray:
        """2.5D RGB image ``(H, W, 3)`` of slice ``z``: slices z-k, z, z+k clamped to the volume."""
        zmax = self.images.shape[0] - 1
        k = self.context_offset
        return np.stack(
            [self.images[max(z - k, 0)], self.images[z], self.images[min(z + k, zmax)]], axis=-1
        )


def prepare_volume(
    swi: str | Path,
    cmb_mask: str | Path | None = None,
    brain_mask: str | Path | None = None,
    params: ExportParams | None = None,
) -> PreparedVolume:
    """Load, validate, normalise and resample one patient exactly as the export does
    (:func:`~detection.data.volume.load_case` + :func:`prepare_case`)."""
    params = params or ExportParams()
    case = load_case(
        swi,
        cmb_mask or None,
        brain_mask or None,
        nonfinite=params.nonfinite,
        connectivity=params.connectivity,
    )
    prep = prepare_case(case, params)
    prep.meta["cmb_mask"] = str(Path(cmb_mask).resolve()) if cmb_mask else ""
    prep.meta["brain_mask"] = str(Path(brain_mask).resolve()) if brain_mask else ""
    return prep


def brain_with_margin(brain: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """The brain mask grown by ``margin_mm`` (Euclidean, in mm on the voxel grid). An
    empty mask keeps everything (nothing to strip against)."""
    brain = np.asarray(brain, dtype=bool)
    if not brain.any():
        return np.ones_like(brain)
    if margin_mm <= 0:
        return brain.copy()
    dist = ndimage.distance_transform_edt(~brain, sampling=[float(s) for s in spacing])
    return dist <= margin_mm


def prepare_case(case: Case, params: ExportParams | None = None) -> PreparedVolume:
    """Normalise and resample a loaded case into export-layout slices (the case is not
    modified). The entry point for volume inference: same slices as training."""
    params = params or ExportParams()
    vol = case.swi
    data = vol.data
    if params.bias_degree > 0:
        data = correct_bias(data, case.brain, vol.spacing, params.bias_degree)
    norm, lo, hi = _normalize(data, case.brain, params.percentiles)
    del data
    grey = to_uint8(norm)
    del norm
    if params.brain_margin_mm >= 0:
        grey[~brain_with_margin(case.brain, vol.spacing, params.brain_margin_mm)] = 0
    nx, ny, nz = grey.shape
    sx, sy, sz = vol.spacing
    height, width = inplane_shape(nx, ny, sx, sy, params.target_spacing)
    images = _resample_images(grey, height, width)
    del grey
    labels = None
    lesion_slices = np.zeros(nz, dtype=bool)
    lesion_ids: list[int] = []
    if case.lesions is not None:
        lesion_slices = case.lesions.any(axis=(0, 1))
        labels = _resample_labels(case.lesions, height, width, np.flatnonzero(lesion_slices))
        lesion_ids = [int(v) for v in np.unique(case.lesions[case.lesions > 0])]
    if params.slices == "all":
        selected = np.ones(nz, dtype=bool)
    else:
        selected = case.brain.any(axis=(0, 1)) | lesion_slices
    to_ras = pixel_to_ras_matrix(nx, ny, height, width)
    to_orig = np.linalg.inv(vol.orig_affine) @ vol.affine
    meta = {
        "swi": str(Path(vol.path).resolve()),
        "cmb_mask": "",
        "brain_mask": "",
        "original": {
            "shape": list(vol.orig_shape),
            "affine": vol.orig_affine.tolist(),
            "spacing": [float(s) for s in np.sqrt((vol.orig_affine[:3, :3] ** 2).sum(axis=0))],
            "axcodes": "".join(vol.orig_axcodes),
            "ornt": vol.ornt.tolist(),
        },
        "ras": {"shape": [nx, ny, nz], "affine": vol.affine.tolist(), "spacing": [sx, sy, sz]},
        "image": {
            "height": height,
            "width": width,
            "n_slices": nz,
            "pixel_spacing": [sy * ny / height, sx * nx / width],  # (row, col) mm
            "slice_thickness": sz,
            "rows": "anterior -> posterior (RAS y reversed)",
            "cols": "RAS x (towards the patient's right)",
        },
        "pixel_to_ras_voxel": to_ras.tolist(),
        "pixel_to_original_voxel": (to_orig @ to_ras).tolist(),
        "pixel_to_world": (vol.affine @ to_ras).tolist(),
        "slices": [int(z) for z in np.flatnonzero(selected)],
        "intensity": {"percentiles": list(params.percentiles), "low": lo, "high": hi},
        "n_nonfinite": vol.n_nonfinite,
        "brain_mask_source": case.brain_source,
        "mask_kind": case.mask_kind,
        "lesion_ids": lesion_ids,
    }
    return PreparedVolume(
        images=images,
        labels=labels,
        slice_indices=meta["slices"],
        meta=meta,
        context_offset=params.context_offset,
    )


def export_to_original(arr: np.ndarray, patient_meta: dict[str, Any]) -> np.ndarray:
    """Map a ``(Z, H, W)`` array in export layout (e.g. predicted lesion ids per slice) to
    the input file's voxel grid (nearest neighbour; exact inverse of the export when the
    target spacing is not coarser than the native spacing)."""
    nx, ny, nz = patient_meta["ras"]["shape"]
    height, width = patient_meta["image"]["height"], patient_meta["image"]["width"]
    if tuple(arr.shape[:3]) != (nz, height, width):
        raise ValueError(f"array shape {arr.shape} is not (Z, H, W) = {(nz, height, width)}")
    rows = _inverse_nearest_index(ny, height)
    cols = _inverse_nearest_index(nx, width)
    ras = _from_image_layout(arr[:, rows][:, :, cols])
    ornt = np.asarray(patient_meta["original"]["ornt"], dtype=float)
    return np.ascontiguousarray(ras_to_original(ras, ornt))


def pixel_to_voxel(patient_meta: dict[str, Any], cols: Any, rows: Any, slices: Any) -> np.ndarray:
    """``(N, 3)`` continuous voxel coordinates in the input file for export pixels.

    ``cols``/``rows`` are pixel indices (centre convention; subtract 0.5 from Detectron2
    box coordinates, which count pixel edges), ``slices`` the axial slice indices.
    """
    pts = np.stack(
        np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (cols, rows, slices))), -1
    )
    pts = pts.reshape(-1, 3)
    m = np.asarray(patient_meta["pixel_to_original_voxel"])
    return pts @ m[:3, :3].T + m[:3, 3]


def pixel_to_world(patient_meta: dict[str, Any], cols: Any, rows: Any, slices: Any) -> np.ndarray:
    """``(N, 3)`` scanner (world, RAS mm) coordinates of export pixels."""
    pts = np.stack(
        np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (cols, rows, slices))), -1
    )
    pts = pts.reshape(-1, 3)
    m = np.asarray(patient_meta["pixel_to_world"])
    return pts @ m[:3, :3].T + m[:3, 3]


# --------------------------------------------------------------------------- per patient


def _file_stamp(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp(job: dict[str, Any]) -> dict[str, Any]:
    inputs = {c: _file_stamp(job[c]) for c in ("swi", "cmb_mask", "brain_mask") if job.get(c)}
    return {"version": EXPORT_VERSION, "params": job["params"], "inputs": inputs}


def _up_to_date(frag_path: Path, img_dir: Path, stamp: dict[str, Any]) -> bool:
    if not frag_path.is_file() or not img_dir.is_dir():
        return False
    try:
        with open(frag_path) as f:
            frag = json.load(f)
    except (OSError, ValueError):
        return False
    if frag.get("stamp") != stamp:
        return False
    expected = {Path(im["file_name"]).name for im in frag.get("images", [])}
    return expected <= set(os.listdir(img_dir))


def _path_or_empty(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _job_up_to_date(job: dict[str, Any]) -> bool:
    """Whether a patient's outputs match its inputs' sizes/mtimes and the parameters."""
    out, pid = Path(job["out"]), job["patient_id"]
    try:
        stamp = _stamp(job)
    except OSError:
        return False
    return _up_to_date(out / "patients" / f"{pid}.json", out / "images" / pid, stamp)


def _encode(binary: np.ndarray) -> dict[str, Any]:
    return mask_util.encode(np.asfortranarray(binary.astype(np.uint8)))


def _slice_annotations(lab: np.ndarray, z: int) -> list[dict[str, Any]]:
    anns = []
    for lid in np.unique(lab[lab > 0]):
        rle = _encode(lab == lid)
        bbox = [float(v) for v in mask_util.toBbox(rle)]
        area = float(mask_util.area(rle))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append(
            {
                "slice_index": z,
                "lesion_id": int(lid),
                "segmentation": rle,
                "bbox": bbox,
                "area": area,
            }
        )
    return anns


def _export_patient(job: dict[str, Any]) -> dict[str, Any]:
    """Export one patient (runs in a worker). Never raises: returns a status dict."""
    pid = job["patient_id"]
    out = Path(job["out"])
    t0 = time.perf_counter()
    with _capture_warnings() as warnings:
        try:
            stamp = _stamp(job)
            params = ExportParams(
                **{**job["params"], "percentiles": tuple(job["params"]["percentiles"])}
            )
            prep = prepare_volume(job["swi"], job.get("cmb_mask"), job.get("brain_mask"), params)
            n = _write_patient(prep, pid, out, stamp)
        except CohortError as exc:
            return {"patient_id": pid, "status": "error", "message": str(exc), "warnings": warnings}
        except Exception as exc:  # report, never kill the pool
            logger.debug("patient %s failed", pid, exc_info=True)
            msg = f"{type(exc).__name__}: {exc}"
            return {"patient_id": pid, "status": "error", "message": msg, "warnings": warnings}
    return {
        "patient_id": pid,
        "status": "exported",
        "n_slices": n,
        "seconds": time.perf_counter() - t0,
        "warnings": warnings,
    }


def _write_patient(prep: PreparedVolume, pid: str, out: Path, stamp: dict[str, Any]) -> int:
    """Write PNGs to a temp folder, swap it in, then write the fragment (the commit marker)."""
    images_root = out / "images"
    final = images_root / pid
    tmp = images_root / f".{pid}.tmp-{uuid.uuid4().hex[:8]}"
    old = images_root / f".{pid}.old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    images, annotations = [], []
    height, width = prep.images.shape[1:]
    k = prep.context_offset
    zmax = prep.images.shape[0] - 1
    try:
        for z in prep.slice_indices:
            name = f"{z:04d}.png"
            # cv2 writes BGR: B = z+k, G = z, R = z-k, so the PNG reads RGB = (z-k, z, z+k).
            bgr = cv2.merge(
                [prep.images[min(z + k, zmax)], prep.images[z], prep.images[max(z - k, 0)]]
            )
            if not cv2.imwrite(str(tmp / name), bgr, _PNG_PARAMS):
                raise OSError(f"cannot write {tmp / name}")
            images.append(
                {
                    "file_name": f"images/{pid}/{name}",
                    "height": height,
                    "width": width,
                    "slice_index": z,
                }
            )
            if prep.labels is not None:
                lab = prep.labels[z]
                if lab.any():
                    annotations.extend(_slice_annotations(lab, z))
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    frag = {"stamp": stamp, "meta": prep.meta, "images": images, "annotations": annotations}
    write_json_atomic(out / "patients" / f"{pid}.json", frag, indent=None)
    return len(images)


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextmanager
def _capture_warnings() -> Iterator[list[str]]:
    """Collect warnings of ``detection.data`` (re-logged by the parent with the patient id)."""
    sink: list[str] = []
    log = logging.getLogger("detection.data")
    handler = _ListHandler(sink)
    prev = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield sink
    finally:
        log.removeHandler(handler)
        log.propagate = prev


# --------------------------------------------------------------------------- splits


def make_splits(
    cohort: pd.DataFrame,
    folds: int = 5,
    external_centers: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out external centre(s) + patient-level folds of the rest, stratified by label.

    Within each label the patients are shuffled (``seed``), ordered by centre, and
    dealt round-robin, continuing across labels, so fold sizes differ by at most one
    and each label (and roughly each centre) is spread evenly. ``folds`` = 0 or 1: no folds.
    """
    ext = {str(c) for c in external_centers}
    unknown = ext - set(cohort["center"])
    if unknown:
        raise CohortError(
            f"external centre(s) {sorted(unknown)} not in the cohort "
            f"(centres: {sorted(set(cohort['center']))})"
        )
    is_ext = cohort["center"].isin(ext)
    external = cohort.loc[is_ext, "patient_id"].tolist()
    dev_df = cohort.loc[~is_ext]
    dev = dev_df["patient_id"].tolist()
    if not dev:
        raise CohortError("no development patients left after holding out the external centre(s)")
    fold_lists: list[dict[str, Any]] = []
    if folds >= 2:
        if len(dev) < folds:
            raise CohortError(f"{len(dev)} development patient(s) cannot fill {folds} folds")
        rng = np.random.default_rng(seed)
        assign: dict[str, int] = {}
        cursor = 0
        order = [lab for lab in LABELS if lab in set(dev_df["label"])]
        order += sorted(set(dev_df["label"]) - set(order))
        for lab in order:
            grp = dev_df[dev_df["label"] == lab]
            perm = rng.permutation(len(grp))
            shuffled = grp.iloc[perm]
            shuffled = shuffled.assign(_r=np.arange(len(shuffled))).sort_values(
                ["center", "_r"], kind="stable"
            )
            for pid in shuffled["patient_id"]:
                assign[pid] = cursor % folds
                cursor += 1
        for k in range(folds):
            val = [p for p in dev if assign[p] == k]
            train = [p for p in dev if assign[p] != k]
            fold_lists.append({"fold": k, "train": train, "val": val})
    return {
        "seed": seed,
        "n_folds": len(fold_lists),
        "external_centers": sorted(ext),
        "external": external,
        "dev": dev,
        "folds": fold_lists,
    }


# --------------------------------------------------------------------------- export


@dataclass
class ExportSummary:
    """What :func:`export_coco` did."""

    out: Path
    n_patients: int
    exported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    n_images: int = 0  # slices in the export (all patients)
    n_written: int = 0  # slices written by this run
    n_annotations: int = 0
    seconds: float = 0.0
    splits: dict[str, Any] = field(default_factory=dict)

    @property
    def slices_per_second(self) -> float:
        """Slices written by this run per wall-clock second."""
        return self.n_written / self.seconds if self.seconds > 0 else 0.0


def _cleanup_temps(out: Path) -> None:
    """Remove temp folders/files left by an interrupted run."""
    for sub in ("images", "patients", "annotations", "."):
        d = out / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _init_worker() -> None:
    """One OpenCV thread per worker process (the pool already uses the cores)."""
    cv2.setNumThreads(1)


def _run_jobs(jobs: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(total=len(jobs), desc="export", unit="patient", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_export_patient(job))
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")  # no fork of a parent that may hold torch/OpenCV threads
            with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
                for res in pool.imap_unordered(_export_patient, jobs, chunksize=1):
                    results.append(res)
                    bar.update(1)
    finally:
        bar.close()
    return results


def _coco(images: list[dict], annotations: list[dict], info: dict[str, Any]) -> dict[str, Any]:
    return {
        "info": info,
        "licenses": [],
        "categories": CATEGORIES,
        "images": images,
        "annotations": annotations,
    }


def export_coco(
    manifest: str | Path | pd.DataFrame,
    out: str | Path,
    *,
    context_offset: int = DEFAULT_CONTEXT_OFFSET,
    target_spacing: float = DEFAULT_TARGET_SPACING,
    slices: str = "brain",
    folds: int = 5,
    external_centers: Sequence[str] = (),
    workers: int = 1,
    seed: int = 0,
    nonfinite: NonFinitePolicy = "error",
    labels_csv: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    brain_margin_mm: float = -1.0,
    bias_degree: int = 0,
    percentiles: Sequence[float] = (1.0, 99.0),
) -> ExportSummary:
    """Export a cohort (manifest CSV, nnU-Net folder, or a DataFrame from
    :func:`~detection.data.manifest.read_cohort`) to ``out``.

    Patients whose outputs are up to date (same input sizes/mtimes and parameters) are
    skipped. If any patient fails, the others are still exported, the split files are
    not (re)written, and one :class:`CohortError` lists every failure.
    """
    t0 = time.perf_counter()
    params = ExportParams(
        context_offset=int(context_offset),
        target_spacing=float(target_spacing),
        slices=slices,
        nonfinite=nonfinite,
        brain_margin_mm=float(brain_margin_mm),
        bias_degree=int(bias_degree),
        percentiles=tuple(float(v) for v in percentiles),
    )
    if isinstance(manifest, pd.DataFrame):
        cohort = manifest.reset_index(drop=True)
        source = "cohort"
    else:
        cohort = read_cohort(manifest, labels_csv)
        source = str(manifest)
    check_grids(cohort, source=source)
    splits = make_splits(cohort, folds, external_centers, seed)  # fail fast on bad split args
    out = Path(out)
    for sub in ("images", "patients", "annotations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _cleanup_temps(out)

    jobs = [
        {
            "patient_id": r["patient_id"],
            "swi": r["swi"],
            "cmb_mask": _path_or_empty(r.get("cmb_mask")),
            "brain_mask": _path_or_empty(r.get("brain_mask")),
            "out": str(out),
            "params": params.as_dict(),
        }
        for r in cohort.to_dict("records")
    ]
    summary = ExportSummary(out=out, n_patients=len(jobs), splits=splits)
    stale = []
    for job in jobs:
        if not force and _job_up_to_date(job):
            summary.skipped.append(job["patient_id"])
        else:
            stale.append(job)
    # Largest inputs first: better load balance across workers.
    stale.sort(key=lambda j: -os.path.getsize(j["swi"]) if os.path.exists(j["swi"]) else 0)
    results = _run_jobs(stale, workers, progress)
    failures = []
    for res in sorted(results, key=lambda r: r["patient_id"]):
        for w in res.get("warnings", []):
            logger.warning("%s: %s", res["patient_id"], w)
        if res["status"] == "exported":
            summary.exported.append(res["patient_id"])
            summary.n_written += res["n_slices"]
        else:
            failures.append(f"{res['patient_id']}: {res['message']}")
    if failures:
        raise CohortError(
            f"export to {out} failed for {len(failures)} of {len(jobs)} patient(s) "
            f"(the others are exported; split files not written):\n  " + "\n  ".join(failures)
        )
    _assemble(cohort, out, params, splits, summary)
    summary.seconds = time.perf_counter() - t0
    logger.info(
        "exported %d patient(s), skipped %d up to date; %d slices written in %.1fs (%.0f slices/s)",
        len(summary.exported),
        len(summary.skipped),
        summary.n_written,
        summary.seconds,
        summary.slices_per_second,
    )
    return summary


def _assemble(
    cohort: pd.DataFrame,
    out: Path,
    params: ExportParams,
    splits: dict[str, Any],
    summary: ExportSummary,
) -> None:
    """Merge the per-patient fragments into the split COCO files, splits.json, export_meta.json."""
    per_patient_images: dict[str, list[dict]] = {}
    per_patient_anns: dict[str, list[dict]] = {}
    patients_meta: dict[str, Any] = {}
    img_id = 0
    ann_id = 0
    for r in cohort.to_dict("records"):
        pid = r["patient_id"]
        with open(out / "patients" / f"{pid}.json") as f:
            frag = json.load(f)
        by_slice = {}
        imgs = []
        for im in frag["images"]:
            img_id += 1
            rec = {
                "id": img_id,
                "file_name": im["file_name"],
                "height": im["height"],
                "width": im["width"],
                "patient_id": pid,
                "center": r["center"],
                "label": r.get("label", ""),
                "slice_index": im["slice_index"],
            }
            by_slice[im["slice_index"]] = img_id
            imgs.append(rec)
        anns = []
        for a in frag["annotations"]:
            ann_id += 1
            anns.append(
                {
                    "id": ann_id,
                    "image_id": by_slice[a["slice_index"]],
                    "category_id": 1,
                    "segmentation": a["segmentation"],
                    "area": a["area"],
                    "bbox": a["bbox"],
                    "iscrowd": 0,
                    "lesion_id": a["lesion_id"],
                    "patient_id": pid,
                    "slice_index": a["slice_index"],
                }
            )
        per_patient_images[pid] = imgs
        per_patient_anns[pid] = anns
        age = r.get("age")
        patients_meta[pid] = {
            "patient_id": pid,
            "center": r["center"],
            "label": r.get("label", ""),
            "age": None if age is None or pd.isna(age) else float(age),
            **frag["meta"],
        }
    summary.n_images = img_id
    summary.n_annotations = ann_id
    info = {
        "description": "cmb-csvd SWI cerebral microbleeds, 2.5D axial slices",
        "version": EXPORT_VERSION,
        "params": params.as_dict(),
    }

    def subset(pids: list[str]) -> dict[str, Any]:
        return _coco(
            [im for p in pids for im in per_patient_images[p]],
            [a for p in pids for a in per_patient_anns[p]],
            info,
        )

    files = {"dev": splits["dev"], "external": splits["external"]}
    for f in splits["folds"]:
        files[f"fold{f['fold']}_train"] = f["train"]
        files[f"fold{f['fold']}_val"] = f["val"]
    ann_dir = out / "annotations"
    stale = {p.stem for p in ann_dir.glob("fold*_*.json")} - set(files)
    for name in stale:  # e.g. fewer folds than last time
        (ann_dir / f"{name}.json").unlink()
    for name, pids in files.items():
        write_json_atomic(ann_dir / f"{name}.json", subset(pids), indent=None)
    write_json_atomic(out / "splits.json", splits, indent=1)
    meta = {
        "version": EXPORT_VERSION,
        "params": params.as_dict(),
        "lesion_connectivity": params.connectivity,
        "png": {
            "file_name": "images/<patient_id>/<slice:04d>.png",
            "channels": ["slice z-k", "slice z", "slice z+k"],
            "format": "8-bit RGB; brain intensity percentiles mapped to 0..255",
            "layout": (
                "slice z, row r, col c shows RAS voxel x = (c + 0.5) * X / W - 0.5, "
                "y = Y - 1 - ((r + 0.5) * Y / H - 0.5), z (matrix pixel_to_ras_voxel): "
                "rows run anterior -> posterior, columns towards the patient's right"
            ),
        },
        "coordinates": (
            "pixel_to_original_voxel @ [col, row, slice, 1] = voxel in the input file; "
            "pixel_to_world @ [...] = scanner RAS mm; integer pixel indices are pixel centres"
        ),
        "splits": "splits.json",
        "annotations": {name: f"annotations/{name}.json" for name in files},
        "patients": patients_meta,
    }
    write_json_atomic(out / "export_meta.json", meta, indent=1)


# --------------------------------------------------------------------------- reading back


def load_export_meta(root: str | Path) -> dict[str, Any]:
    """Read ``<root>/export_meta.json``."""
    with open(Path(root) / "export_meta.json") as f:
        return json.load(f)


def rebuild_volume_mask(
    coco_json: str | Path | dict[str, Any],
    patient_id: str,
    space: str = "original",
    meta: dict[str, Any] | None = None,
) -> np.ndarray:
    """Rebuild a patient's 3D lesion-id mask from COCO annotations.

    ``space="export"``: ``(Z, H, W)`` in export layout (after resampling).
    ``space="original"``: the input file's voxel grid and orientation.
    ``meta`` defaults to ``export_meta.json`` two levels above ``coco_json``.
    """
    if isinstance(coco_json, dict):
        data = coco_json
        if meta is None:
            raise ValueError("meta is required when coco_json is a dict")
    else:
        path = Path(coco_json)
        with open(path) as f:
            data = json.load(f)
        if meta is None:
            meta = load_export_meta(path.parent.parent)
    pmeta = meta["patients"][patient_id]
    nz = pmeta["ras"]["shape"][2]
    height, width = pmeta["image"]["height"], pmeta["image"]["width"]
    vol = np.zeros((nz, height, width), dtype=np.int32)
    slice_of = {
        im["id"]: im["slice_index"] for im in data["images"] if im.get("patient_id") == patient_id
    }
    for a in data["annotations"]:
        z = slice_of.get(a["image_id"])
        if z is None:
            continue
        m = mask_util.decode(a["segmentation"]).astype(bool)
        vol[z][m] = a["lesion_id"]
    if space == "export":
        return vol
    if space != "original":
        raise ValueError(f"space must be 'export' or 'original', got {space!r}")
    return export_to_original(vol, pmeta)
