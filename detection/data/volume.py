"""SWI volume and mask I/O: validation, canonical RAS reorientation, brain mask, normalisation.

Conventions
-----------
* Every volume is validated on load: 3D, or 4D holding a single volume; a finite,
  invertible affine; non-finite voxels are reported (``nonfinite="error"`` raises,
  ``"zero"`` replaces them by 0 and logs a warning with their count).
* Masks must lie on the SWI's grid (same shape, affine within ``affine_tol``) and be
  integer valued and >= 0.
* Processing happens in canonical RAS voxel order (axis 0 = left->Right,
  1 = posterior->Anterior, 2 = inferior->Superior, so axis 2 is axial). Only axis
  permutations and flips are applied (no resampling), so :meth:`Volume.to_original`
  maps a RAS-processed array back to the input voxel grid exactly.
* Problems raise :class:`CohortError` (a ``ValueError``) whose message names the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt2axcodes,
    ornt_transform,
)
from scipy import ndimage

__all__ = [
    "CohortError",
    "NonFinitePolicy",
    "Volume",
    "Case",
    "load_nifti",
    "load_swi",
    "load_mask",
    "load_case",
    "reorient_to_ras",
    "ras_to_original",
    "compute_brain_mask",
    "otsu_threshold",
    "correct_bias",
    "normalize_intensity",
    "to_uint8",
    "label_lesions",
    "LESION_CONNECTIVITY",
]

logger = logging.getLogger(__name__)

NonFinitePolicy = Literal["error", "zero"]

#: 3D connectivity used to turn a binary CMB mask into lesions (26 = faces, edges, corners).
LESION_CONNECTIVITY = 26

_RAS = axcodes2ornt(("R", "A", "S"))


class CohortError(ValueError):
    """Bad cohort input (manifest, NIfTI file, mask); the message names the file and problem."""


# --------------------------------------------------------------------------- loading


def load_nifti(
    path: str | Path, what: str = "image"
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI file as a 3D array (as stored, no reorientation) with its affine.

    A 4D file is accepted only when it holds a single volume (trailing singleton axes
    are dropped). ``what`` names the file's role in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{what} {path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for unreadable headers
        raise CohortError(
            f"{what} {path}: not a readable NIfTI ({type(exc).__name__}: {exc})"
        ) from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise CohortError(f"{what} {path}: expected a 3D volume, got shape {shape}")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise CohortError(
            f"{what} {path}: expected a 3D volume (or 4D with a single volume), got shape {shape} "
            f"({int(np.prod(extra))} volumes)"
        )
    if min(shape[:3]) < 1:
        raise CohortError(f"{what} {path}: empty volume, shape {shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CohortError(f"{what} {path}: invalid (non-finite or singular) affine")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip, short file, ...
        raise CohortError(
            f"{what} {path}: corrupt NIfTI, cannot read voxel data ({type(exc).__name__}: {exc})"
        ) from exc
    data = data.reshape(shape[:3])
    return data, affine, img.header


def reorient_to_ras(
    data: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder/flip axes to the closest canonical RAS orientation (no resampling).

    Returns ``(data_ras, affine_ras, ornt)`` where ``ornt`` is the input's
    :func:`nibabel.orientations.io_orientation`, needed by :func:`ras_to_original`.
    """
    ornt = io_orientation(affine)
    if np.array_equal(ornt, _RAS):
        return data, affine.copy(), ornt
    data_ras = apply_orientation(data, ornt)
    affine_ras = affine @ inv_ornt_aff(ornt, data.shape[:3])
    return data_ras, affine_ras, ornt


def ras_to_original(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Map an array in canonical RAS voxel order back to the original voxel order."""
    if np.array_equal(ornt, _RAS):
        return arr
    return apply_orientation(arr, ornt_transform(_RAS, ornt))


@dataclass
class Volume:
    """An SWI volume in canonical RAS voxel order plus what is needed to write results back."""

    path: Path
    data: np.ndarray  # float32, RAS voxel order (X, Y, Z), axis 2 = axial; memory order as read
    affine: np.ndarray  # RAS voxel -> world (mm)
    orig_affine: np.ndarray  # input voxel -> world (mm)
    orig_shape: tuple[int, int, int]
    ornt: np.ndarray  # io_orientation(orig_affine)
    header: nib.Nifti1Header | None = None
    n_nonfinite: int = 0

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the RAS axes."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def orig_axcodes(self) -> tuple[str, str, str]:
        """Axis codes of the input file (e.g. ``('L', 'P', 'S')``)."""
        return tuple(ornt2axcodes(self.ornt))

    def to_original(self, arr: np.ndarray) -> np.ndarray:
        """Map an array of shape ``data.shape`` (RAS order) back to the input voxel grid."""
        if tuple(arr.shape[:3]) != tuple(self.data.shape):
            raise ValueError(
                f"array shape {arr.shape} does not match the RAS volume {self.data.shape}"
            )
        return np.ascontiguousarray(ras_to_original(arr, self.ornt))

    def to_nifti(self, arr: np.ndarray, dtype: np.dtype | type | None = None) -> nib.Nifti1Image:
        """Wrap a RAS-processed array as a NIfTI on the input grid and affine."""
        out = self.to_original(arr)
        if dtype is not None:
            out = out.astype(dtype)
        img = nib.Nifti1Image(out, self.orig_affine)
        img.set_qform(self.orig_affine, code=1)
        img.set_sform(self.orig_affine, code=1)
        return img


def load_swi(path: str | Path, nonfinite: NonFinitePolicy = "error") -> Volume:
    """Load and validate an SWI volume, reoriented to canonical RAS (float32)."""
    path = Path(path)
    raw, affine, header = load_nifti(path, "SWI")
    data = np.asarray(raw, dtype=np.float32)
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        if nonfinite == "error":
            raise CohortError(
                f"SWI {path}: {n_bad} non-finite voxel(s) (NaN/inf) of {data.size}; "
                "fix the file or export with --nonfinite zero to replace them by 0"
            )
        if nonfinite != "zero":
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}")
        logger.warning("SWI %s: %d non-finite voxel(s) replaced by 0", path, n_bad)
        data = np.where(bad, np.float32(0), data)
    data_ras, affine_ras, ornt = reorient_to_ras(data, affine)
    return Volume(
        path=path,
        data=data_ras,
        affine=affine_ras,
        orig_affine=affine,
        orig_shape=tuple(int(s) for s in data.shape),
        ornt=ornt,
        header=header,
        n_nonfinite=n_bad,
    )


def load_mask(
    path: str | Path,
    reference: Volume,
    what: str = "CMB mask",
    affine_tol: float = 1e-3,
) -> np.ndarray:
    """Load a label mask on ``reference``'s grid, validated and reoriented to RAS (int32)."""
    path = Path(path)
    raw, affine, _ = load_nifti(path, what)
    if tuple(raw.shape) != tuple(reference.orig_shape):
        raise CohortError(
            f"{what} {path}: shape {tuple(raw.shape)} differs from the SWI's "
            f"{reference.orig_shape} ({reference.path})"
        )
    if not np.allclose(affine, reference.orig_affine, rtol=0.0, atol=affine_tol):
        diff = float(np.abs(affine - reference.orig_affine).max())
        raise CohortError(
            f"{what} {path}: affine differs from the SWI's ({reference.path}) by up to {diff:.4g} "
            f"(tolerance {affine_tol:g}); the mask is not on the same grid"
        )
    if raw.dtype.kind == "b":
        data = raw.astype(np.int32)
    elif raw.dtype.kind in "iu":
        if raw.dtype.kind == "i" and raw.size and raw.min() < 0:
            raise CohortError(f"{what} {path}: negative labels (min {int(raw.min())})")
        data = raw.astype(np.int32)
    else:
        fdata = np.asarray(raw, dtype=np.float64)
        n_bad = int((~np.isfinite(fdata)).sum())
        if n_bad:
            raise CohortError(
                f"{what} {path}: {n_bad} non-finite voxel(s) (NaN/inf) in a label mask"
            )
        frac = fdata != np.round(fdata)
        if frac.any():
            example = float(fdata[frac][0])
            raise CohortError(
                f"{what} {path}: not integer valued ({int(frac.sum())} voxel(s), "
                f"e.g. {example:g}); a mask holds 0 = background and integer lesion ids"
            )
        if fdata.size and fdata.min() < 0:
            raise CohortError(f"{what} {path}: negative labels (min {fdata.min():g})")
        data = fdata.astype(np.int32)
    data_ras, _, _ = reorient_to_ras(data, affine)
    return data_ras


# --------------------------------------------------------------------------- brain mask


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (histogram based)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centers)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def compute_brain_mask(
    data: np.ndarray, spacing: tuple[float, float, float] | None = None
) -> np.ndarray:
    """A coarse head/brain mask: Otsu on the smoothed volume, largest component, holes filled.

    Not a skull stripper: for real cohorts pass a brain mask (manifest column
    ``brain_mask``) from a dedicated tool when one is available.
    """
    data = np.asarray(data, dtype=np.float32)
    if spacing is None:
        sigma: float | tuple[float, ...] = 1.0
    else:
        sigma = tuple(max(0.5, 1.0 / max(float(s), 1e-3)) for s in spacing)  # ~1 mm
    smooth = ndimage.gaussian_filter(data, sigma=sigma)
    thr = otsu_threshold(smooth[::2, ::2, :].ravel() if smooth.size > 1e6 else smooth.ravel())
    fg = smooth > thr
    if not fg.any():
        return np.zeros(data.shape, dtype=bool)
    fg = ndimage.binary_opening(fg, structure=ndimage.generate_binary_structure(3, 1))
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(data.shape, dtype=bool)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
    fg = ndimage.binary_fill_holes(fg)
    # Dark structures (CMBs, veins) touching the surface in 3D are still holes per axial slice.
    for z in range(fg.shape[2]):
        if fg[:, :, z].any():
            fg[:, :, z] = ndimage.binary_fill_holes(fg[:, :, z])
    return fg


# --------------------------------------------------------------------------- intensities


def normalize_intensity(
    data: np.ndarray,
    brain_mask: np.ndarray | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> tuple[np.ndarray, float, float]:
    """Map the brain's ``percentiles`` (low, high) to 0..1 and clip (float32).

    Percentiles are taken inside ``brain_mask`` (all voxels when it is None or empty),
    which makes the scaling robust to centre differences in background and gain.
    Returns ``(normalised, low_value, high_value)``.
    """
    data = np.asarray(data, dtype=np.float32)
    sample = data[brain_mask] if brain_mask is not None and brain_mask.any() else data.ravel()
    if brain_mask is not None and not brain_mask.any():
        logger.warning("empty brain mask: intensity percentiles taken over the whole volume")
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if not hi > lo:
        logger.warning("constant intensities (%g): normalised volume is all zeros", lo)
        return np.zeros(data.shape, dtype=np.float32), lo, hi
    out = (data - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out, lo, hi


def correct_bias(
    data: np.ndarray,
    brain_mask: np.ndarray,
    spacing: tuple[float, float, float],
    degree: int = 2,
) -> np.ndarray:
    """Divide out a smooth multiplicative intensity field (receive-coil shading).

    The log intensity of the brain is fitted with a polynomial in x, y, z (mm) of total
    ``degree`` (2: 10 terms; 3: 20 terms): least squares on up to 60 000 brain voxels, three
    rounds that keep the voxels within the 15th-85th percentile of the residual, so that
    bright CSF and dark veins, nuclei and bleeds (all much smaller than the field's
    scale) do not pull the fit. A polynomial has no edge bias, unlike a Gaussian
    smoothing of the masked brain. The field is scaled to a median of 1 in the brain.
    ``degree`` <= 0 or an empty mask returns an unchanged copy. Returns float32.
    """
    data = np.asarray(data, dtype=np.float32)
    brain = np.asarray(brain_mask, dtype=bool)
    degree = int(degree)
    if degree <= 0 or not brain.any():
        return data.copy()
    sp = np.asarray(spacing, dtype=np.float64)
    idx = np.argwhere(brain & (data > 0))
    if len(idx) < 100:
        return data.copy()
    rng = np.random.default_rng(0)
    if len(idx) > 60000:
        idx = idx[rng.choice(len(idx), 60000, replace=False)]
    lo, hi = idx.min(0), idx.max(0)
    centre, half = (lo + hi) / 2.0 * sp, np.maximum((hi - lo) / 2.0 * sp, 1.0)
    # monomials x^i y^j z^k of total degree <= degree, the constant first
    powers = [(i, j, d - i - j) for d in range(degree + 1) for i in range(d + 1)
              for j in range(d + 1 - i)]
    u = (idx * sp - centre) / half
    a = np.stack([u[:, 0] ** i * u[:, 1] ** j * u[:, 2] ** k for i, j, k in powers], axis=1)
    y = np.log(data[tuple(idx.T)].astype(np.float64))
    keep = np.ones(len(y), dtype=bool)
    coef = np.zeros(a.shape[1])
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(a[keep], y[keep], rcond=None)
        res = y - a @ coef
        q0, q1 = np.percentile(res, [15, 85])
        keep = (res >= q0) & (res <= q1)
    # evaluate the polynomial on the full grid as sums of separable outer products
    grid = [(((np.arange(n, dtype=np.float64) * sp[ax]) - centre[ax]) / half[ax])
            .astype(np.float32) for ax, n in enumerate(data.shape)]
    full = np.zeros(data.shape, dtype=np.float32)
    for c, (i, j, k) in zip(coef, powers, strict=True):
        full += (np.float32(c) * (grid[0] ** i)[:, None, None] * (grid[1] ** j)[None, :, None]
                 * (grid[2] ** k)[None, None, :])
    full -= np.float32(np.median(a @ coef))
    np.clip(full, -3.0, 3.0, out=full)
    return data * np.exp(-full)


def to_uint8(norm: np.ndarray) -> np.ndarray:
    """Scale a 0..1 array to 8 bits (rounded)."""
    out = np.asarray(norm, dtype=np.float32) * np.float32(255.0)
    out += np.float32(0.5)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


# --------------------------------------------------------------------------- lesions


def label_lesions(
    mask: np.ndarray, connectivity: int = LESION_CONNECTIVITY
) -> tuple[np.ndarray, str]:
    """Lesion ids for a CMB mask.

    A mask with two or more distinct nonzero values holds instance ids and is kept as
    is (``kind="instance"``). A mask with a single nonzero value is binary: its
    ``connectivity``-connected 3D components (6, 18 or 26) become lesions 1..n in scan
    order (``kind="binary-cc26"``). An all-zero mask gives ``kind="empty"``.
    """
    mask = np.asarray(mask)
    nz = mask[mask > 0]
    if nz.size == 0:
        return np.zeros(mask.shape, dtype=np.int32), "empty"
    if nz.min() != nz.max():
        return mask.astype(np.int32, copy=False), "instance"
    rank = {6: 1, 18: 2, 26: 3}.get(connectivity)
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    labels, _ = ndimage.label(mask > 0, structure=ndimage.generate_binary_structure(3, rank))
    return labels.astype(np.int32, copy=False), f"binary-cc{connectivity}"


# --------------------------------------------------------------------------- a case


@dataclass
class Case:
    """One patient's SWI (RAS), lesion ids and brain mask, all on the same RAS grid."""

    swi: Volume
    lesions: np.ndarray | None  # int32 lesion ids (RAS) or None when no mask was given
    brain: np.ndarray  # bool (RAS)
    mask_kind: str = "none"  # instance | binary-cc26 | empty | none
    brain_source: str = "computed"  # given | computed
    info: dict = field(default_factory=dict)


def load_case(
    swi: str | Path,
    cmb_mask: str | Path | None = None,
    brain_mask: str | Path | None = None,
    nonfinite: NonFinitePolicy = "error",
    affine_tol: float = 1e-3,
    connectivity: int = LESION_CONNECTIVITY,
) -> Case:
    """Load an SWI with its optional CMB mask and brain mask (computed when not given).

    A binary CMB mask is split into lesions with ``connectivity`` (see :func:`label_lesions`).
    """
    vol = load_swi(swi, nonfinite=nonfinite)
    lesions, kind = None, "none"
    if cmb_mask:
        raw = load_mask(cmb_mask, vol, "CMB mask", affine_tol=affine_tol)
        lesions, kind = label_lesions(raw, connectivity)
    if brain_mask:
        brain = load_mask(brain_mask, vol, "brain mask", affine_tol=affine_tol) > 0
        source = "given"
    else:
        brain = compute_brain_mask(vol.data, vol.spacing)
        source = "computed"
    return Case(swi=vol, lesions=lesions, brain=brain, mask_kind=kind, brain_source=source)
