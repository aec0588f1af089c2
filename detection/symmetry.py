"""Left-right symmetry of the brain: the mid-sagittal plane and bilateral CMB mimics.

Iron-rich nuclei (globus pallidus, red nucleus, substantia nigra, dentate) and pallidal
calcification are dark on SWI and sit at mirror-image places in the two hemispheres; a
slice detector at a new scanner fires on them, often on one side only. A radiologist
tells them from a microbleed by looking across the midline: a bleed has no twin there.
This module measures that twin.

* :func:`midsagittal_plane` estimates the plane by reflecting the brain-masked image
  across candidate planes and maximising the correlation of the image with its
  reflection (normal tilted by yaw and roll from the world x axis, offset along it;
  Nelder-Mead, coarse to fine). No registration or template is needed.
* :func:`mirror_ratio` compares each lesion's darkness with the darkness found at its
  mirror image: ``(ref' - core') / (ref - core)``, where ``core`` is the mean grey level
  over the lesion's voxels, ``ref`` the median over the ring ``ring_mm`` around it (in
  the brain), and the primed values the same over the reflected voxels, the reflected
  lesion shifted to its darkest place within ``search_mm`` (for the plane's error and
  the anatomy's own asymmetry). Near 0: nothing dark across the midline (a bleed);
  near 1: an equally dark twin (a bilateral structure).

Pure numpy / scipy, like :mod:`detection.lesions`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy import optimize

__all__ = ["Plane", "block_mean", "lesion_boxes", "midsagittal_plane", "mirror_ratio",
           "ring_inputs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plane:
    """A plane ``normal . w = offset`` in world mm (``normal`` a unit vector)."""

    normal: np.ndarray
    offset: float

    def distance(self, pts: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of world points ``[n, 3]`` from the plane."""
        return np.asarray(pts, dtype=np.float64) @ self.normal - self.offset

    def reflect(self, pts: np.ndarray) -> np.ndarray:
        """Mirror images of world points ``[n, 3]`` across the plane."""
        pts = np.asarray(pts, dtype=np.float64)
        return pts - 2.0 * self.distance(pts)[:, None] * self.normal[None, :]


def _normal(yaw: float, roll: float) -> np.ndarray:
    """World x axis turned by ``yaw`` about z, then by ``roll`` about y (radians)."""
    n = np.array([np.cos(roll), 0.0, -np.sin(roll)])
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([c * n[0] - s * n[1], s * n[0] + c * n[1], n[2]])


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def block_mean(vol: np.ndarray, affine: np.ndarray, target_mm: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Average ``vol`` over integer blocks so voxels are about ``target_mm``; new affine."""
    f = np.maximum(1, np.round(target_mm / _spacing(affine))).astype(int)
    if np.all(f == 1):
        return vol.astype(np.float32), np.asarray(affine, dtype=np.float64)
    shp = (np.array(vol.shape) // f) * f
    v = vol[: shp[0], : shp[1], : shp[2]].astype(np.float32)
    v = v.reshape(shp[0] // f[0], f[0], shp[1] // f[1], f[1], shp[2] // f[2], f[2])
    new = np.array(affine, dtype=np.float64)
    new[:3, 3] = new[:3, :3] @ ((f - 1) / 2.0) + new[:3, 3]
    new[:3, :3] = new[:3, :3] * f
    return v.mean(axis=(1, 3, 5)), new


def midsagittal_plane(
    image: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    *,
    levels_mm: Sequence[float] = (4.0, 2.0),
    step_mm: float = 3.0,
    max_angle_deg: float = 20.0,
    background_mm: float = 10.0,
    work_mm: float = 2.0,
) -> Plane:
    """The plane across which the brain-masked ``image`` best matches its reflection.

    ``image`` and ``brain_mask`` share a voxel grid with voxel-to-world ``affine`` (RAS,
    so the world x axis runs left-right). The grey levels are clipped to the brain's
    1st-99th percentiles, averaged over blocks of about ``work_mm``, divided by their
    local brain average (Gaussian of ``background_mm``: a bias field is not symmetric),
    set to zero outside the brain (so the brain's outline counts too) and smoothed with
    each Gaussian of ``levels_mm`` in turn; the correlation is taken over brain voxels
    on a grid of ``step_mm`` (or the level's smoothing if coarser), maximised by
    Nelder-Mead from the plane ``x = centroid``; yaw and roll stay within
    ``max_angle_deg``. An empty or too small brain mask raises ValueError.
    """
    image = np.asarray(image, dtype=np.float32)
    brain = np.asarray(brain_mask) > 0
    if image.shape != brain.shape:
        raise ValueError(f"image {image.shape} and brain mask {brain.shape} differ in shape")
    if not brain.any():
        raise ValueError("the brain mask is empty: no mid-sagittal plane to estimate")
    aff = np.asarray(affine, dtype=np.float64)
    lo, hi = np.percentile(image[brain], [1, 99])
    vol = np.where(brain, np.clip(image, lo, hi), 0.0).astype(np.float32)
    # Everything below runs on ~work_mm voxels (block means): seconds, not tens of them.
    vol, _ = block_mean(vol, aff, work_mm)
    wbrain, aff = block_mean(brain.astype(np.float32), aff, work_mm)
    sp = _spacing(aff)
    # Divide out the slow intensity drift (coil bias fields are not symmetric): the grey
    # level over its brain-masked average within ``background_mm``.
    w = ndi.gaussian_filter(wbrain, background_mm / sp)
    slow = ndi.gaussian_filter(vol, background_mm / sp) / np.maximum(w, 1e-3)
    inside = wbrain >= 0.5
    vol = np.where(inside, vol / np.maximum(slow, 1e-6 * (hi - lo) + 1e-12), 0.0)
    vol = vol.astype(np.float32)
    inv = np.linalg.inv(aff)

    def grid_points(step: float) -> tuple[np.ndarray, np.ndarray]:
        stride = np.maximum(1, np.round(step / sp)).astype(int)
        sub = np.zeros_like(inside)
        sub[::stride[0], ::stride[1], ::stride[2]] = True
        vox = np.argwhere(inside & sub).astype(np.float64)
        if len(vox) < 10:
            raise ValueError(f"the brain mask is too small ({int(brain.sum())} voxels) to "
                             "find a mid-sagittal plane")
        return vox, vox @ aff[:3, :3].T + aff[:3, 3]

    limit = np.deg2rad(max_angle_deg)
    p = np.array([0.0, 0.0, float(grid_points(step_mm)[1][:, 0].mean())])
    for sigma in levels_mm:
        vox, pts = grid_points(max(step_mm, sigma))
        smooth = ndi.gaussian_filter(vol, sigma / sp)
        ref = ndi.map_coordinates(smooth, vox.T, order=1)
        ref = ref - ref.mean()
        ref_norm = float(np.sqrt((ref ** 2).sum())) or 1.0

        def cost(q: np.ndarray, smooth=smooth, ref=ref, ref_norm=ref_norm, pts=pts) -> float:
            if abs(q[0]) > limit or abs(q[1]) > limit:
                return 1.0
            n = _normal(q[0], q[1])
            lin = inv[:3, :3] @ (np.eye(3) - 2.0 * np.outer(n, n))  # reflect, then to voxels
            mv = lin @ pts.T + (inv[:3, :3] @ (2.0 * q[2] * n) + inv[:3, 3])[:, None]
            val = ndi.map_coordinates(smooth, mv, order=1, mode="constant", cval=0.0)
            val = val - val.mean()
            den = ref_norm * float(np.sqrt((val ** 2).sum()))
            return -float((ref * val).sum() / den) if den > 0 else 1.0

        start = np.array([p, p + [np.deg2rad(3.0), 0, 0], p + [0, np.deg2rad(3.0), 0],
                          p + [0, 0, 2.0 * sigma]])
        res = optimize.minimize(cost, p, method="Nelder-Mead",
                                options={"initial_simplex": start, "xatol": 2e-3,
                                         "fatol": 1e-4, "maxfev": 300})
        p = res.x
        logger.debug("mid-sagittal plane at %.1f mm smoothing: yaw %.2f deg, roll %.2f deg, "
                     "offset %.2f mm, correlation %.3f", sigma, np.rad2deg(p[0]),
                     np.rad2deg(p[1]), p[2], -res.fun)
    return Plane(_normal(p[0], p[1]), float(p[2]))


def ring_inputs(labels: np.ndarray, image: np.ndarray, brain_mask: np.ndarray,
                ring_mm: tuple[float, float]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """Arrays and ring limits of a per-lesion ring measure, checked: the image and brain
    mask on the label volume's grid, ``0 <= inner < outer`` mm."""
    labels = np.asarray(labels)
    image = np.asarray(image)
    brain = np.asarray(brain_mask) > 0
    if image.shape != labels.shape or brain.shape != labels.shape:
        raise ValueError(f"image {image.shape} and brain mask {brain.shape} must be on the "
                         f"label volume's grid {labels.shape}")
    lo, hi = (float(r) for r in ring_mm)
    if not 0.0 <= lo < hi:
        raise ValueError(f"ring_mm must satisfy 0 <= inner < outer, got {ring_mm}")
    return labels, image, brain, (lo, hi)


def lesion_boxes(labels: np.ndarray, pad: Sequence[int]
                 ) -> Iterator[tuple[int, tuple[slice, ...], np.ndarray]]:
    """``(id, box, mask in the box)`` for each lesion id present in ``labels``, its
    bounding box grown by ``pad`` voxels per axis (clipped to the volume)."""
    for lid, bbox in enumerate(ndi.find_objects(labels), start=1):
        if bbox is None:
            continue
        box = tuple(slice(max(s.start - int(p), 0), min(s.stop + int(p), n))
                    for s, p, n in zip(bbox, pad, labels.shape, strict=True))
        yield lid, box, labels[box] == lid


def _ball_offsets(radius_mm: float, step_mm: float = 1.0) -> np.ndarray:
    r = int(np.floor(radius_mm / step_mm))
    g = np.arange(-r, r + 1) * step_mm
    off = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return off[np.linalg.norm(off, axis=1) <= radius_mm + 1e-9]


def mirror_ratio(
    labels: np.ndarray,
    image: np.ndarray,
    brain_mask: np.ndarray,
    affine: np.ndarray,
    plane: Plane,
    *,
    search_mm: float = 3.0,
    ring_mm: tuple[float, float] = (2.0, 5.0),
    self_mm: float = 1.5,
    min_plane_distance_mm: float = 1.0,
) -> dict[int, float]:
    """Darkness at each lesion's mirror image over its own darkness, ``{id: ratio}``.

    See the module docstring. Where the search around the mirror image reaches the
    lesion itself (within ``self_mm`` plus half the largest voxel side of its voxels:
    bleeds near the midline), those places count as not dark, so only a separate twin
    scores. Lesions lying within
    ``min_plane_distance_mm`` of the plane (on the midline: their mirror image is
    themselves), without a ring in the brain, or not darker than their ring get NaN.
    """
    labels, image, brain, (lo, hi) = ring_inputs(labels, image, brain_mask, ring_mm)
    image = image.astype(np.float32, copy=False)
    near = float(min_plane_distance_mm)
    aff = np.asarray(affine, dtype=np.float64)
    inv = np.linalg.inv(aff)
    sp = _spacing(aff)
    # interpolation reaches half a voxel further than the nearest voxel centre
    reach = float(self_mm) + 0.5 * float(sp.max())
    pad = np.ceil(hi / sp).astype(int) + 1
    shifts = _ball_offsets(search_mm)

    def to_voxels(world: np.ndarray) -> np.ndarray:
        return world @ inv[:3, :3].T + inv[:3, 3]

    def to_world(vox: np.ndarray) -> np.ndarray:
        return vox @ aff[:3, :3].T + aff[:3, 3]

    def sample(vox: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(image, vox.T, order=1, mode="nearest")

    out: dict[int, float] = {}
    for lid, box, les in lesion_boxes(labels, pad):
        origin = np.array([s.start for s in box], dtype=np.float64)
        dist = ndi.distance_transform_edt(~les, sampling=sp)
        ring = (dist > lo) & (dist <= hi) & brain[box]
        les_w = to_world(np.argwhere(les) + origin)
        if not ring.any() or np.abs(plane.distance(les_w)).max() < near:
            out[lid] = float("nan")
            continue
        ring_w = to_world(np.argwhere(ring) + origin)
        img = image[box]
        own = float(np.median(img[ring])) - float(img[les].mean())
        if own <= 0:
            out[lid] = float("nan")
            continue
        twin_ref = float(np.median(sample(to_voxels(plane.reflect(ring_w)))))
        twin = plane.reflect(les_w)
        moved = to_voxels((twin[None, :, :] + shifts[:, None, :]).reshape(-1, 3))
        vals = sample(moved)
        # Near the midline the search reaches the lesion itself: its own voxels (and
        # those within ``reach``) count as not dark, so only a separate twin scores.
        mv = np.rint(moved - origin).astype(np.int64)
        ok = np.all((mv >= 0) & (mv < np.array(les.shape)), axis=1)
        own_zone = dist <= reach
        hit = np.zeros(len(mv), dtype=bool)
        hit[ok] = own_zone[tuple(mv[ok].T)]
        vals[hit] = twin_ref
        means = vals.reshape(len(shifts), len(twin)).mean(axis=1)
        out[lid] = (twin_ref - float(means.min())) / own
    return out
