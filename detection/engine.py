"""Training engine: a Detectron2 ``DefaultTrainer`` tuned for microbleeds on SWI slices.

- :class:`CMBDatasetMapper` (``@configurable``) reads the exported 2.5D PNG slices and
  applies augmentation suited to SWI: left-right flips, small rotations and rescales,
  intensity / contrast jitter, and crops that keep a lesion in view.
- :class:`Trainer` overrides ``build_evaluator`` (COCOEvaluator without the C++
  fast implementation, which the registry build lacks, on slice instances with
  overlapping ones fused and as the model gives them; :mod:`.evaluation.slices`),
  ``build_train_loader`` (the mapper above plus oversampling of slices that contain
  CMBs), ``build_test_loader``
  (the same mapper, for the test-time ``CMB.INFER.ZOOM``) and adds a hook that
  keeps the best checkpoint by ``cfg.CMB.BEST_METRIC`` (segm AP50 by default).
- :func:`setup_cfg` builds the config the way every tool here does.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode, configurable, get_cfg
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.structures import BitMasks, BoxMode
from detectron2.utils import comm

from .compat import fill_empty_extension
from .config import EXPORT_PARAM_KEYS, add_cmb_config, export_params, inference_zoom
from .distributed import ddp_for
from .evaluation.slices import build_slice_evaluators

logger = logging.getLogger(__name__)

__all__ = [
    "CMBDatasetMapper",
    "ClippedSGD",
    "IntensityJitter",
    "IntensityTransform",
    "LesionAwareCrop",
    "NoiseBlur",
    "NoiseBlurTransform",
    "RandomScale",
    "SliceMix",
    "SliceMixTransform",
    "Trainer",
    "Zoom",
    "build_cmb_augmentations",
    "bloom_lesions",
    "fade_lesions",
    "positive_repeat_factors",
    "scale_lesions",
    "setup_cfg",
]


def _as_dtype_of(out: np.ndarray, like: np.ndarray, rounded: bool = False) -> np.ndarray:
    """``out`` (float) back in ``like``'s dtype: 8-bit images are clipped to 0-255
    (rounded first when ``rounded``, truncated otherwise); other dtypes are cast."""
    if like.dtype == np.uint8:
        return np.clip(np.rint(out) if rounded else out, 0, 255).astype(np.uint8)
    return out.astype(like.dtype)


class _PhotometricTransform(T.Transform):
    """A transform that changes grey levels only: boxes, coordinates and masks stay."""

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Coordinates do not move."""
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """Masks do not change."""
        return segmentation

    def inverse(self) -> T.Transform:
        """Geometric inverse (identity: no geometry)."""
        return T.NoOpTransform()


class IntensityTransform(_PhotometricTransform):
    """``image * contrast + shift`` around the image mean; geometry is untouched."""

    def __init__(self, contrast: float, shift: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Scale the contrast about the mean, add the shift, clip to the input dtype."""
        img_f = img.astype(np.float32)
        mean = float(img_f.mean())
        out = (img_f - mean) * self.contrast + mean + self.shift
        return _as_dtype_of(out, img)


class IntensityJitter(T.Augmentation):
    """Random contrast in ``contrast`` range and additive shift of ``+-brightness*255``.

    SWI intensities differ between scanners and centres even after percentile
    normalisation; this keeps the detector from learning one centre's grey levels.
    """

    def __init__(self, brightness: float = 0.1, contrast: tuple[float, float] = (0.8, 1.2)):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        c = float(np.random.uniform(self.contrast[0], self.contrast[1]))
        s = float(np.random.uniform(-self.brightness, self.brightness)) * 255.0
        return IntensityTransform(c, s)


class NoiseBlurTransform(_PhotometricTransform):
    """Gaussian blur (``sigma`` px) then additive Gaussian noise (``noise_std`` grey
    levels, drawn from ``seed``); geometry is untouched."""

    def __init__(self, sigma: float, noise_std: float, seed: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Blur, add noise, clip to the input dtype."""
        out = img.astype(np.float32)
        if self.sigma > 0:
            out = cv2.GaussianBlur(out, (0, 0), sigmaX=self.sigma, sigmaY=self.sigma)
        if self.noise_std > 0:
            noise = np.random.default_rng(self.seed).normal(0.0, self.noise_std, out.shape[:2])
            out = out + noise[..., None].astype(np.float32) if out.ndim == 3 else out + noise
        return _as_dtype_of(out, img)


class NoiseBlur(T.Augmentation):
    """Random blur up to ``max_sigma`` px and noise up to ``max_noise`` grey levels.

    Centres differ in SNR and slice thickness (partial volume blurs and fades small
    bleeds); this keeps the detector from relying on one scanner's sharpness and noise.
    """

    def __init__(self, max_sigma: float = 1.0, max_noise: float = 8.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return NoiseBlurTransform(
            float(np.random.uniform(0.0, self.max_sigma)),
            float(np.random.uniform(0.0, self.max_noise)),
            int(np.random.randint(0, 2**31 - 1)),
        )


class SliceMixTransform(_PhotometricTransform):
    """Mix the centre channel of a 2.5D slice with its neighbours by ``weight``.

    The centre becomes ``(1 - w) * c + w * (prev + next) / 2`` and each neighbour takes
    ``w / 2`` of the centre, as a slab ``1 + w`` times thicker would. Grey images (one
    channel) are returned unchanged.
    """

    def __init__(self, weight: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Mix the channels; clip to the input dtype."""
        if img.ndim != 3 or img.shape[2] != 3 or self.weight <= 0:
            return img
        w = float(self.weight)
        f = img.astype(np.float32)
        prev, centre, nxt = f[..., 0], f[..., 1], f[..., 2]
        out = np.stack(
            [
                (1 - w / 2) * prev + (w / 2) * centre,
                (1 - w) * centre + (w / 2) * (prev + nxt),
                (1 - w / 2) * nxt + (w / 2) * centre,
            ],
            axis=-1,
        )
        return _as_dtype_of(out, img, rounded=True)


class SliceMix(T.Augmentation):
    """Thicker-slice simulation: :class:`SliceMixTransform` with a weight drawn from
    ``[0, max_weight]``. Thick-slice scanners fade the bleeds that sit in one slice."""

    def __init__(self, max_weight: float = 0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return SliceMixTransform(float(np.random.uniform(0.0, self.max_weight)))


def fade_lesions(
    image: np.ndarray,
    masks: np.ndarray,
    fractions: Sequence[float],
    ring_px: int = 4,
) -> np.ndarray:
    """Fade each lesion towards its local background (weaker blooming, partial volume).

    ``image`` is ``H x W x C`` (uint8 or float), ``masks`` ``N x H x W`` bool and
    ``fractions`` one value in [0, 1] per mask (0 = unchanged, 1 = lesion brought up to
    the background). The background is the per-channel median of a ring ``ring_px``
    wide around the mask; only pixels darker than it are lifted, with a softened mask
    so the lesion edge fades most smoothly. Returns a new image of the same dtype.
    """
    if len(masks) != len(fractions):
        raise ValueError(f"{len(masks)} masks but {len(fractions)} fade fractions")
    out = image.astype(np.float32)
    if out.ndim == 2:
        out = out[..., None]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_px + 1, 2 * ring_px + 1))
    for mask, frac in zip(masks, fractions):
        if frac <= 0 or not mask.any():
            continue
        m8 = mask.astype(np.uint8)
        near = cv2.dilate(m8, np.ones((3, 3), np.uint8)).astype(bool)
        ring = cv2.dilate(m8, kernel).astype(bool) & ~near
        if not ring.any():
            continue
        bg = np.median(out[ring], axis=0)  # (C,)
        soft = cv2.GaussianBlur(near.astype(np.float32), (0, 0), sigmaX=1.0)
        soft = np.clip(soft, 0.0, 1.0)[..., None]
        lift = np.maximum(bg[None, None, :] - out, 0.0)
        out = out + float(min(frac, 1.0)) * soft * lift
    if image.ndim == 2:
        out = out[..., 0]
    return _as_dtype_of(out, image, rounded=True)


def _per_lesion_input(image: np.ndarray, masks: np.ndarray, factors: Sequence[float],
                      what: str) -> np.ndarray:
    """Check one positive factor per mask; ``image`` as float32 ``H x W x C``."""
    if len(masks) != len(factors):
        raise ValueError(f"{len(masks)} masks but {len(factors)} {what}")
    if any(not np.isfinite(f) or f <= 0 for f in factors):
        raise ValueError(f"{what} must be positive, got {list(factors)}")
    out = image.astype(np.float32)
    return out[..., None] if out.ndim == 2 else out


def scale_lesions(
    image: np.ndarray,
    masks: np.ndarray,
    factors: Sequence[float],
    margin_px: int = 3,
    ring_px: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize each lesion's dark blob about its centre, leaving the anatomy in place.

    Blooming (the signal void around a bleed) grows with field strength and echo time,
    so the same bleed looks narrower on a 1.5 T scanner than on the 3 T development
    scanners. A whole-slice rescale cannot teach that, because it shrinks the anatomy
    with the lesion. Here each lesion's signal deficit - how far the pixels near its
    mask lie below the per-channel median of a ring ``ring_px`` wide around them - is
    removed and added back scaled by its factor about the mask's centroid (all 2.5D
    channels alike); erased pixels keep the ring's noise level. "Near" is within
    ``margin_px`` plus the mask's equivalent radius of the mask, since the blooming
    halo reaches about one mask radius beyond it. The mask is scaled the same way
    (nearest neighbour, at least its centre pixel kept).

    ``image`` is ``H x W x C`` (uint8 or float), ``masks`` ``N x H x W`` bool and
    ``factors`` one scale per mask (1 = unchanged). Returns the new image (same dtype)
    and the new masks.
    """
    out = _per_lesion_input(image, masks, factors, "scale factors")
    new_masks = np.array(masks, dtype=bool, copy=True)
    h, w = out.shape[:2]
    for i, (mask, f) in enumerate(zip(masks, factors)):
        if f == 1.0 or not mask.any():
            continue
        m8 = mask.astype(np.uint8)
        near_r = margin_px + int(np.ceil(np.sqrt(m8.sum() / np.pi)))
        near_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * near_r + 1,) * 2)
        ring_r = near_r + ring_px
        ring_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_r + 1,) * 2)
        near = cv2.dilate(m8, near_k).astype(bool)
        ring = cv2.dilate(m8, ring_k).astype(bool) & ~near
        if not ring.any():
            continue
        ring_px_values = out[ring]
        bg = np.median(ring_px_values, axis=0)  # (C,)
        sigma = 1.4826 * np.median(np.abs(ring_px_values - bg), axis=0)  # robust noise SD
        soft = np.clip(cv2.GaussianBlur(near.astype(np.float32), (0, 0), sigmaX=1.0), 0, 1)
        lift = np.maximum(bg[None, None, :] - out, 0.0)
        deficit = soft[..., None] * lift
        # Erase: dark pixels come up to the background less the dark half of its noise
        # (not to a flat grey, which would mark every resized lesion).
        # The slices were resampled, so their noise is smooth over about a pixel.
        grain = cv2.GaussianBlur(np.random.standard_normal(out.shape).astype(np.float32),
                                 (0, 0), sigmaX=0.8)
        grain = grain.reshape(out.shape) / max(float(grain.std()), 1e-6)
        dark_noise = np.abs(grain) * sigma
        erase = soft[..., None] * np.maximum(lift - dark_noise, 0.0)
        ys, xs = np.nonzero(mask)
        cy, cx = float(ys.mean()), float(xs.mean())
        # dst(p) = src(c + (p - c) / f): the forward map is p = f * q + (1 - f) * c.
        warp = np.array([[f, 0.0, (1.0 - f) * cx], [0.0, f, (1.0 - f) * cy]])
        moved = cv2.warpAffine(deficit, warp, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if moved.ndim == 2:
            moved = moved[..., None]
        out = out + erase - moved
        m_new = cv2.warpAffine(m8, warp, (w, h), flags=cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
        if not m_new.any():
            m_new[int(round(cy)), int(round(cx))] = True
        new_masks[i] = m_new
    if image.ndim == 2:
        out = out[..., 0]
    return _as_dtype_of(out, image, rounded=True), new_masks


def bloom_lesions(
    image: np.ndarray,
    masks: np.ndarray,
    factors: Sequence[float],
    center_channel: int | None = 1,
    ring_px: int = 4,
) -> np.ndarray:
    """Reshape the blooming halo around each lesion, keeping the lesion and its mask.

    On SWI a bleed's signal void reaches beyond its true extent (the mask): the halo.
    Its depth and width grow with field strength and echo time, so a 1.5 T scanner
    shows the same bleed with a shallower, narrower halo than a 3 T one, while the core
    stays dark. Here the halo's radial profile ``P(d)`` - the median darkening below a
    background ring at in-plane distance ``d`` (px) from the mask, per channel - becomes
    ``b * P(d / b)`` for a factor ``b``: depth and width both scaled by ``b`` whatever
    the profile's shape (``b`` < 1: weaker blooming, > 1: stronger). The change is a
    smooth radial field added to the image, so the image's own noise stays. In the
    slice the mask belongs to (``center_channel`` of the 2.5D channels; every channel
    when None) the mask's pixels are kept; in the neighbouring slices, which hold the
    halo above and below the bleed, its footprint (``d`` = 0) is reshaped too. Pixels
    farther than about three mask radii from the mask do not change.

    ``image`` is ``H x W x C`` (uint8 or float), ``masks`` ``N x H x W`` bool and
    ``factors`` one positive value per mask (1 = unchanged). Returns a new image of the
    same dtype.
    """
    out = _per_lesion_input(image, masks, factors, "blooming factors")
    n_ch = out.shape[2]
    own = np.zeros(n_ch, dtype=bool)  # channels whose mask pixels stay as they are
    if center_channel is None or n_ch == 1:
        own[:] = True
    else:
        own[center_channel] = True
    for mask, b in zip(masks, factors):
        if b == 1.0 or not mask.any():
            continue
        m8 = mask.astype(np.uint8)
        r_eq = float(np.sqrt(m8.sum() / np.pi))
        reach = max(6.0, 3.0 * r_eq + 2.0)  # halo extent (px) beyond the mask
        dist = cv2.distanceTransform((1 - m8), cv2.DIST_L2, 5)
        ring = (dist > reach) & (dist <= reach + ring_px)
        if not ring.any():
            continue
        bg = np.median(out[ring], axis=0)  # (C,)
        # radial profile: bin 0 = the footprint, bin k = distances in (k - 1, k]
        n_bins = int(np.ceil(reach)) + 1
        bins = np.ceil(dist).astype(np.int64)
        centres = np.maximum(np.arange(n_bins, dtype=np.float64) - 0.5, 0.0)
        near = bins < n_bins
        prof = np.zeros((n_bins, n_ch))
        for k in range(n_bins):
            sel = bins == k
            if sel.any():
                prof[k] = np.maximum(bg - np.median(out[sel], axis=0), 0.0)
        change = np.zeros(out.shape, dtype=np.float32)
        d_near = dist[near].astype(np.float64)
        for c in range(n_ch):
            now = np.interp(d_near, centres, prof[:, c], right=0.0)
            then = float(b) * np.interp(d_near / float(b), centres, prof[:, c], right=0.0)
            change[..., c][near] = now - then
        region = np.where(own[None, None, :], ((dist > 0) & (dist <= reach))[..., None],
                          (dist <= reach)[..., None])
        # Fade the change out towards the edge of the reach so no step is left there.
        taper = np.clip((reach - dist) / 2.0, 0.0, 1.0)[..., None] * region
        out = out + taper * change
    if image.ndim == 2:
        out = out[..., 0]
    return _as_dtype_of(out, image, rounded=True)


def _resize_by(image: np.ndarray, factor: float) -> T.Transform:
    """Isotropic resize of ``image`` by ``factor`` (no-op when the size stays)."""
    h, w = image.shape[:2]
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    if (nh, nw) == (h, w):
        return T.NoOpTransform()
    return T.ResizeTransform(h, w, nh, nw)


class RandomScale(T.Augmentation):
    """Isotropic rescale by a factor drawn from ``scale`` (lesion size jitter)."""

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1)):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return _resize_by(image, float(np.random.uniform(self.scale[0], self.scale[1])))


class Zoom(T.Augmentation):
    """Resize by a fixed ``factor`` (test-time magnification, ``CMB.INFER.ZOOM``)."""

    def __init__(self, factor: float):
        super().__init__()
        if not factor > 0:
            raise ValueError(f"zoom factor must be positive, got {factor}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return _resize_by(image, float(self.factor))


class LesionAwareCrop(T.Augmentation):
    """Square crop of ``crop_size`` px that contains a whole lesion with ``keep_prob``.

    With probability ``keep_prob`` (and when the slice has lesions) the window is
    placed so that a randomly chosen lesion box lies entirely inside it; otherwise
    the window is uniform over the slice. Crops make CPU training affordable and
    balance the tiny lesions against a large background.
    """

    def __init__(self, crop_size: int, keep_prob: float = 0.8):
        super().__init__()
        self._init(locals())

    @staticmethod
    def _window(lo: float, hi: float, size: int, extent: int) -> int:
        """Start of a window of ``size`` in ``[0, extent)`` that contains ``[lo, hi]``."""
        start_min = int(np.ceil(max(0.0, hi - size)))
        start_max = int(np.floor(min(float(extent - size), lo)))
        if start_min > start_max:  # lesion larger than the window: centre on it
            centre = 0.5 * (lo + hi)
            return int(np.clip(round(centre - size / 2), 0, extent - size))
        return int(np.random.randint(start_min, start_max + 1))

    def get_transform(self, image: np.ndarray, boxes: np.ndarray | None = None) -> T.Transform:
        h, w = image.shape[:2]
        cs = int(self.crop_size)
        if cs <= 0 or (h <= cs and w <= cs):
            return T.NoOpTransform()
        ch, cw = min(cs, h), min(cs, w)
        if boxes is not None and len(boxes) and np.random.rand() < self.keep_prob:
            x0b, y0b, x1b, y1b = boxes[np.random.randint(len(boxes))]
            x0 = self._window(x0b, x1b, cw, w)
            y0 = self._window(y0b, y1b, ch, h)
        else:
            x0 = int(np.random.randint(0, w - cw + 1))
            y0 = int(np.random.randint(0, h - ch + 1))
        return T.CropTransform(x0, y0, cw, ch)


def build_cmb_augmentations(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """The augmentation list of ``cfg.CMB.AUG``. At test time slices keep their exported
    pixel spacing, magnified only by ``CMB.INFER.ZOOM`` (the model's outputs are scaled
    back to the slice by Detectron2's postprocessing)."""
    if not is_train:
        zoom = inference_zoom(cfg)
        return [] if zoom == 1.0 else [Zoom(zoom)]
    aug = cfg.CMB.AUG
    augs: list[T.Augmentation] = []
    if tuple(aug.SCALE) != (1.0, 1.0):
        augs.append(RandomScale(tuple(aug.SCALE)))
    if aug.CROP_SIZE > 0:
        augs.append(LesionAwareCrop(int(aug.CROP_SIZE), float(aug.CROP_KEEP_LESION_PROB)))
    if aug.HFLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=True, vertical=False))
    if aug.VFLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=False, vertical=True))
    if aug.ROTATION > 0:
        augs.append(T.RandomRotation([-aug.ROTATION, aug.ROTATION], expand=False))
    if aug.BRIGHTNESS > 0 or tuple(aug.CONTRAST) != (1.0, 1.0):
        augs.append(IntensityJitter(float(aug.BRIGHTNESS), tuple(aug.CONTRAST)))
    if aug.SLICE_MIX > 0:
        augs.append(SliceMix(float(aug.SLICE_MIX)))
    if aug.BLUR_SIGMA > 0 or aug.NOISE_STD > 0:
        augs.append(NoiseBlur(float(aug.BLUR_SIGMA), float(aug.NOISE_STD)))
    return augs


def _factor_range(name: str, value: Sequence[float], prob: float) -> tuple[float, float]:
    """A per-lesion factor range ``(low, high)`` with ``0 < low <= high`` and its
    probability in [0, 1], checked; the range as floats."""
    rng = tuple(float(v) for v in value)
    if len(rng) != 2 or not 0.0 < rng[0] <= rng[1]:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {rng}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"{name}_prob must be in [0, 1], got {prob}")
    return rng


def _draw_per_lesion(n: int, prob: float, low: float, high: float,
                     neutral: float) -> np.ndarray | None:
    """Each of ``n`` lesions is chosen with ``prob`` and gets a value drawn uniformly from
    ``[low, high]``; the others get ``neutral``. None when no lesion is chosen."""
    chosen = np.random.rand(n) < prob
    if not chosen.any():
        return None
    return np.where(chosen, np.random.uniform(low, high, n), neutral)


class CMBDatasetMapper:
    """Map a COCO-style dataset dict to the model's input (image tensor + instances).

    Differences from Detectron2's ``DatasetMapper``: lesion-aware crops get the boxes,
    masks are always bitmasks (the export writes RLE), and after the geometric
    transforms the boxes are recomputed from the masks (a rotated box would be loose)
    and instances that left the crop are dropped. After the geometric transforms, with
    ``lesion_scale`` other than ``(1, 1)`` each lesion is, with probability
    ``lesion_scale_prob``, resized about its centre by a factor drawn from that range
    (:func:`scale_lesions`; its mask and box follow). With ``lesion_fade`` > 0 each
    lesion is, with probability ``lesion_fade_prob``, faded towards its surroundings
    (:func:`fade_lesions`); its mask is kept. With ``bloom`` other than ``(1, 1)``
    each lesion's blooming halo is, with probability ``bloom_prob``, reshaped by a
    factor drawn from that range (:func:`bloom_lesions`); its mask is kept.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str,
        lesion_fade: float = 0.0,
        lesion_fade_prob: float = 0.5,
        lesion_scale: tuple[float, float] = (1.0, 1.0),
        lesion_scale_prob: float = 0.5,
        bloom: tuple[float, float] = (1.0, 1.0),
        bloom_prob: float = 0.5,
    ):
        lesion_scale = _factor_range("lesion_scale", lesion_scale, lesion_scale_prob)
        bloom = _factor_range("bloom", bloom, bloom_prob)
        if not 0.0 <= lesion_fade <= 1.0:
            raise ValueError(f"lesion_fade must be in [0, 1], got {lesion_fade}")
        if not 0.0 <= lesion_fade_prob <= 1.0:
            raise ValueError(f"lesion_fade_prob must be in [0, 1], got {lesion_fade_prob}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.lesion_fade = float(lesion_fade)
        self.lesion_fade_prob = float(lesion_fade_prob)
        self.lesion_scale = lesion_scale
        self.lesion_scale_prob = float(lesion_scale_prob)
        self.bloom = bloom
        self.bloom_prob = float(bloom_prob)
        mode = "training" if is_train else "inference"
        logger.info("[CMBDatasetMapper] %s augmentations: %s", mode, augmentations)
        if is_train and self.lesion_fade > 0:
            logger.info("[CMBDatasetMapper] lesion fade up to %.2f with probability %.2f",
                        self.lesion_fade, self.lesion_fade_prob)
        if is_train and self.lesion_scale != (1.0, 1.0):
            logger.info("[CMBDatasetMapper] lesion scale %s with probability %.2f",
                        self.lesion_scale, self.lesion_scale_prob)
        if is_train and self.bloom != (1.0, 1.0):
            logger.info("[CMBDatasetMapper] blooming %s with probability %.2f",
                        self.bloom, self.bloom_prob)

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict:
        """Keyword arguments from a config."""
        return {
            "is_train": is_train,
            "augmentations": build_cmb_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "lesion_fade": float(cfg.CMB.AUG.LESION_FADE) if is_train else 0.0,
            "lesion_fade_prob": float(cfg.CMB.AUG.LESION_FADE_PROB),
            "lesion_scale": tuple(cfg.CMB.AUG.LESION_SCALE) if is_train else (1.0, 1.0),
            "lesion_scale_prob": float(cfg.CMB.AUG.LESION_SCALE_PROB),
            "bloom": tuple(cfg.CMB.AUG.BLOOM) if is_train else (1.0, 1.0),
            "bloom_prob": float(cfg.CMB.AUG.BLOOM_PROB),
        }

    def __call__(self, dataset_dict: dict) -> dict:
        """Read, augment and convert one slice record."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        boxes = np.array(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
            dtype=np.float64,
        ).reshape(-1, 4)
        aug_input = T.AugInput(image, boxes=boxes)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        shape = image.shape[:2]
        if not self.is_train:
            dataset_dict["image"] = torch.as_tensor(
                np.ascontiguousarray(image.transpose(2, 0, 1)))
            return dataset_dict
        annos = [utils.transform_instance_annotations(a, transforms, shape) for a in annos]
        instances = utils.annotations_to_instances(annos, shape, mask_format="bitmask")
        if len(instances):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
            keep = instances.gt_masks.tensor.flatten(1).any(dim=1)
            instances = instances[keep]
        else:  # an empty slice still carries (empty) masks, like any other
            instances.gt_masks = BitMasks(torch.zeros((0, *shape), dtype=torch.bool))
        n = len(instances)
        if self.lesion_scale != (1.0, 1.0) and n:
            factors = _draw_per_lesion(n, self.lesion_scale_prob, *self.lesion_scale, 1.0)
            if factors is not None:
                image, masks = scale_lesions(image, instances.gt_masks.tensor.numpy(),
                                             factors)
                instances.gt_masks = BitMasks(torch.from_numpy(masks))
                instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        if self.bloom != (1.0, 1.0) and n:
            factors = _draw_per_lesion(n, self.bloom_prob, *self.bloom, 1.0)
            if factors is not None:
                image = bloom_lesions(image, instances.gt_masks.tensor.numpy(), factors)
        if self.lesion_fade > 0 and n:
            fracs = _draw_per_lesion(n, self.lesion_fade_prob, 0.0, self.lesion_fade, 0.0)
            if fracs is not None:
                image = fade_lesions(image, instances.gt_masks.tensor.numpy(), fracs)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["instances"] = instances
        return dataset_dict


def positive_repeat_factors(dataset_dicts: Sequence[dict], factor: float) -> torch.Tensor:
    """Repeat factor per slice: ``factor`` for slices with a CMB, 1 for the others."""
    return torch.tensor(
        [factor if d.get("annotations") else 1.0 for d in dataset_dicts], dtype=torch.float32
    )


class ClippedSGD(torch.optim.SGD):
    """SGD with Detectron2's per-parameter gradient-norm clipping, over all gradients at once.

    Detectron2's ``SOLVER.CLIP_GRADIENTS`` of type ``norm`` limits each parameter's gradient
    to its own norm, one ``clip_grad_norm_`` call per parameter (82 in the CPU config), and
    its SGD updates the parameters one by one on a CPU. This computes the same norms and
    scales with multi-tensor calls and runs SGD's multi-tensor update: the same arithmetic,
    so the weights come out bit for bit the same (``tests/detection/test_engine.py``), and
    an iteration of the 2-process CPU training took 0.271 s instead of 0.289 s (README).
    """

    def __init__(self, params, *, clip_value: float, norm_type: float = 2.0, **kwargs) -> None:
        super().__init__(params, foreach=True, **kwargs)
        self.clip_value = float(clip_value)
        self.norm_type = float(norm_type)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer.step
        """Clip every parameter's gradient to ``clip_value`` (its own norm), then step."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            # As clip_grad_norm_ on one tensor: the norm of the one-element vector of its
            # norm, then grad *= min(clip / (norm + 1e-6), 1).
            norms = torch.stack(torch._foreach_norm(grads, self.norm_type))
            total = torch.linalg.vector_norm(norms[:, None], self.norm_type, dim=1)
            coef = torch.clamp(self.clip_value / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.tolist())
        return super().step(closure)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the CMB evaluator, train loader and best-checkpoint hook."""

    def __init__(self, cfg: CfgNode):
        """Detectron2's set-up. With several CPU processes (:func:`detection.distributed.
        launch_cpu`) the model is wrapped for data parallelism without CUDA device ids,
        which Detectron2's ``create_ddp_model`` would pass."""
        import detectron2.engine.defaults as d2_defaults

        original = d2_defaults.create_ddp_model
        d2_defaults.create_ddp_model = ddp_for
        try:
            super().__init__(cfg)
        finally:
            d2_defaults.create_ddp_model = original

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Detectron2's optimizer; on a CPU with per-parameter norm clipping, the same
        parameter groups in :class:`ClippedSGD` (same result, less time per step)."""
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if not (cfg.MODEL.DEVICE == "cpu" and clip.ENABLED and clip.CLIP_TYPE == "norm"):
            return super().build_optimizer(cfg, model)
        from detectron2.solver.build import get_default_optimizer_params

        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        logger.info("optimizer: SGD with per-parameter gradient-norm clipping at %g, batched",
                    clip.CLIP_VALUE)
        return ClippedSGD(params, clip_value=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE,
                          lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                          nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    @classmethod
    def test_with_TTA(cls, cfg: CfgNode, model: torch.nn.Module) -> OrderedDict:  # noqa: N802
        """Evaluate the test sets with the volume predictor's mirrored pass
        (:class:`~detection.inference.MirroredPassTTA`; ``TEST.AUG.ENABLED`` with
        ``TEST.AUG.FLIP``), into ``OUTPUT_DIR/inference_TTA``; result keys get ``_TTA``.
        ``TEST.AUG.MIN_SIZES`` / ``MAX_SIZE`` are not used: slices keep their exported
        spacing (``CMB.INFER.ZOOM`` magnifies them)."""
        from .inference import MirroredPassTTA

        if not cfg.TEST.AUG.FLIP:
            raise ValueError("TEST.AUG.ENABLED evaluates the mirrored pass: it needs "
                             "TEST.AUG.FLIP True")
        logger.info("evaluating with the mirrored pass (test-time augmentation)")
        evaluators = [cls.build_evaluator(cfg, name, output_folder=os.path.join(
            cfg.OUTPUT_DIR, "inference_TTA", name)) for name in cfg.DATASETS.TEST]
        res = cls.test(cfg, MirroredPassTTA(cfg, model), evaluators)
        return OrderedDict((f"{k}_TTA", v) for k, v in res.items())

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        """COCO bbox + segm evaluation (pure-Python COCOeval, no C++ extension here) of
        the slice instances with overlapping ones fused (``bbox`` / ``segm``) and as the
        model gives them (``bbox_raw`` / ``segm_raw``, in ``<folder>/raw``); the raw ones
        alone, as ``bbox`` / ``segm``, when ``CMB.EVAL_FUSE_OVERLAPS`` is off
        (:mod:`detection.evaluation.slices`)."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = build_slice_evaluators(dataset_name, output_folder,
                                            fuse=bool(cfg.CMB.EVAL_FUSE_OVERLAPS))
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Slices of ``DATASETS.TRAIN`` through :class:`CMBDatasetMapper`, slices with a
        CMB drawn ``CMB.POSITIVE_OVERSAMPLE`` times as often as empty ones."""
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        factors = positive_repeat_factors(dataset, cfg.CMB.POSITIVE_OVERSAMPLE)
        n_pos = int((factors > 1).sum()) if cfg.CMB.POSITIVE_OVERSAMPLE > 1 else 0
        logger.info(
            "Training on %d slices (%d with CMBs, oversampled x%.1f)",
            len(dataset), n_pos, cfg.CMB.POSITIVE_OVERSAMPLE,
        )
        seed = cfg.SEED if cfg.SEED >= 0 else None
        sampler = RepeatFactorTrainingSampler(factors, seed=seed)
        mapper = CMBDatasetMapper(cfg, is_train=True)
        return build_detection_train_loader(cfg, dataset=dataset, mapper=mapper, sampler=sampler)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """Detectron2's test loader with :class:`CMBDatasetMapper`: slices as exported,
        magnified by ``CMB.INFER.ZOOM`` when it is not 1."""
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=CMBDatasetMapper(cfg, is_train=False))

    def build_hooks(self) -> list:
        """Default hooks plus :class:`~detectron2.engine.hooks.BestCheckpointer` after
        the evaluation hook, keeping ``model_best.pth`` by ``CMB.BEST_METRIC``."""
        ret = super().build_hooks()
        cfg = self.cfg
        if cfg.TEST.EVAL_PERIOD > 0 and cfg.DATASETS.TEST and comm.is_main_process():
            eval_idx = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            ret.insert(
                eval_idx + 1,
                hooks.BestCheckpointer(
                    cfg.TEST.EVAL_PERIOD, self.checkpointer, cfg.CMB.BEST_METRIC, mode="max"
                ),
            )
        return ret


def setup_cfg(config_file: str | os.PathLike, opts: Sequence[str] = ()) -> CfgNode:
    """``get_cfg`` + :func:`add_cmb_config` + the YAML + command-line ``opts``; registers
    the export at ``cfg.CMB.DATA_ROOT`` when it exists."""
    fill_empty_extension()  # default_setup -> collect_env_info needs _C's build info
    cfg = get_cfg()
    add_cmb_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    register_from_cfg(cfg)
    return cfg


def register_from_cfg(cfg: CfgNode) -> list[str]:
    """Register the COCO export named by ``cfg.CMB.DATA_ROOT`` (if it exists)."""
    root = Path(cfg.CMB.DATA_ROOT)
    if not (root / "splits.json").is_file():
        logger.info("No COCO export at %s; datasets must be registered by the caller", root)
        return []
    from .data.register import register_cmb_datasets

    for msg in export_mismatches(cfg, root):
        logger.warning("%s", msg)
    return register_cmb_datasets(root)


def export_mismatches(cfg: CfgNode, root: str | os.PathLike) -> list[str]:
    """How the slices of the export at ``root`` were prepared differently from what
    ``cfg`` prepares at prediction time (spacing, context, skull strip, shading, intensity
    window). A detector trained on one and run on the other sees other images."""
    meta_path = Path(root) / "export_meta.json"
    if not meta_path.is_file():
        return []
    try:
        params = json.loads(meta_path.read_text())["params"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"{meta_path}: unreadable export parameters ({exc})"]
    want = export_params(cfg).as_dict()
    out = []
    for key, name in EXPORT_PARAM_KEYS.items():
        if key in params and params[key] != want[key]:
            out.append(f"{meta_path}: exported with {key}={params[key]}, but {name} is "
                       f"{want[key]}: prediction with this config prepares the slices "
                       "differently; re-export or set the key to match")
    return out
