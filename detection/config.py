"""The project's Detectron2 config keys (``cfg.CMB.*``).

Call :func:`add_cmb_config` on a ``get_cfg()`` before ``merge_from_file``, as
Detectron2 projects do (cf. PointRend's ``add_pointrend_config``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from detectron2.config import CfgNode as CN

from . import backbone  # noqa: F401  (registers build_cmb_lite_fpn_backbone)

if TYPE_CHECKING:
    from .data.export_coco import ExportParams

#: The :class:`ExportParams` field each detector config key sets. The exporter (training
#: slices) and the volume predictor must prepare slices alike; :func:`export_params` is the
#: one mapping from a config to those parameters.
EXPORT_PARAM_KEYS: dict[str, str] = {
    "target_spacing": "CMB.TARGET_SPACING",
    "context_offset": "CMB.CONTEXT_OFFSET",
    "brain_margin_mm": "CMB.BRAIN_MARGIN_MM",
    "bias_degree": "CMB.BIAS_DEGREE",
    "percentiles": "CMB.INTENSITY_PERCENTILES",
}


def add_cmb_config(cfg: CN) -> None:
    """Add the cmb-csvd keys to ``cfg`` in place (with their defaults)."""
    _C = cfg
    _C.CMB = CN()
    # Folder written by tools/export_coco.py; its splits are registered as
    # cmb_fold{k}_train / cmb_fold{k}_val / cmb_dev / cmb_external.
    _C.CMB.DATA_ROOT = "datasets/cmb_coco"
    # 2.5D input: channels are slices z-k, z, z+k (k = CONTEXT_OFFSET slices).
    _C.CMB.CONTEXT_OFFSET = 1
    # In-plane spacing (mm) slices are resampled to before export and inference;
    # 0 keeps the native spacing. Small values make 2 mm bleeds span several pixels.
    _C.CMB.TARGET_SPACING = 0.5
    # Skull strip: voxels farther than this (mm) from the brain mask are set to 0 in the
    # exported and predicted slices (< 0 keeps the whole head). CMBs are parenchymal; the
    # dark gap between brain and scalp is where detectors fire on unseen scanners.
    _C.CMB.BRAIN_MARGIN_MM = -1.0
    # Intensity shading: divide out a polynomial field of this degree fitted to the brain's
    # log intensity before the percentile scaling (0 = off). Scanners differ much in it.
    _C.CMB.BIAS_DEGREE = 0
    # Brain intensity percentiles (low, high) mapped to 0..255 in the exported and
    # predicted slices. A low of 1 clips every voxel darker than the brain's darkest 1 %
    # (veins, iron, every bleed with its halo) to 0; a low of 0 keeps the dark range.
    _C.CMB.INTENSITY_PERCENTILES = (1.0, 99.0)
    # Training loader: slices with at least one CMB are drawn this many times more
    # often than empty slices (1.0 = no oversampling).
    _C.CMB.POSITIVE_OVERSAMPLE = 4.0

    # SWI-specific augmentation used by the training mapper.
    _C.CMB.AUG = CN()
    _C.CMB.AUG.HFLIP = True  # left-right flip (brains are near symmetric)
    _C.CMB.AUG.VFLIP = False  # anterior-posterior flip (off: breaks anatomy priors)
    _C.CMB.AUG.ROTATION = 10.0  # max in-plane rotation, degrees
    _C.CMB.AUG.SCALE = (0.9, 1.1)  # random isotropic rescale range
    _C.CMB.AUG.BRIGHTNESS = 0.1  # intensity shift, fraction of the 8-bit range
    _C.CMB.AUG.CONTRAST = (0.8, 1.2)  # multiplicative contrast range
    _C.CMB.AUG.BLUR_SIGMA = 0.0  # max Gaussian blur (px): thicker slices / softer scanners
    _C.CMB.AUG.NOISE_STD = 0.0  # max additive noise (8-bit grey levels): lower SNR
    _C.CMB.AUG.CROP_SIZE = 0  # square training crop (px); 0 = whole slice
    # Thick-slice partial volume: the centre channel is mixed with its neighbours by a
    # weight drawn from [0, SLICE_MIX] (0 = off), fading bleeds seen in one slice only.
    _C.CMB.AUG.SLICE_MIX = 0.0
    # Weaker blooming / partial volume of one lesion: each lesion is faded towards its
    # local background by a fraction drawn from [0, LESION_FADE] (0 = off), with
    # probability LESION_FADE_PROB per lesion. Its mask is kept: faint bleeds are bleeds.
    _C.CMB.AUG.LESION_FADE = 0.0
    _C.CMB.AUG.LESION_FADE_PROB = 0.5
    # Blooming differs between scanners (it grows with field strength and echo time): each
    # lesion is, with probability LESION_SCALE_PROB, resized about its centre by a factor
    # drawn from LESION_SCALE (its mask too), the anatomy around it unchanged.
    # (1.0, 1.0) = off.
    _C.CMB.AUG.LESION_SCALE = (1.0, 1.0)
    _C.CMB.AUG.LESION_SCALE_PROB = 0.5
    # The blooming halo (signal void beyond the bleed's true extent) is shallower and
    # narrower at lower field strength or shorter echo time, while the core stays dark:
    # each lesion's halo is, with probability BLOOM_PROB, reshaped to a factor drawn
    # from BLOOM (depth and width scale together; <1 weaker blooming), the lesion and its
    # mask unchanged (engine.bloom_lesions). (1.0, 1.0) = off.
    _C.CMB.AUG.BLOOM = (1.0, 1.0)
    _C.CMB.AUG.BLOOM_PROB = 0.5
    _C.CMB.AUG.CROP_KEEP_LESION_PROB = 0.8  # share of crops placed to contain a lesion

    # Light ResNet-FPN backbone (detection/backbone.py, MODEL.BACKBONE.NAME
    # "build_cmb_lite_fpn_backbone"): widths/blocks of stem and res2..res5.
    _C.CMB.LITE = CN()
    _C.CMB.LITE.STEM_WIDTH = 32
    _C.CMB.LITE.STAGE_WIDTHS = [32, 64, 96, 128]
    _C.CMB.LITE.BLOCKS = [1, 1, 1, 1]

    # Training bookkeeping.
    _C.CMB.BEST_METRIC = "segm/AP50"  # metric the best-checkpoint hook maximises
    # COCO evaluation of slices: fuse each slice's instances whose masks overlap (union
    # mask and box, max score), as the volume predictor unites them into one lesion;
    # the model's raw instances are evaluated too, reported as bbox_raw / segm_raw
    # (detection/evaluation/slices.py). False: the raw instances only, as bbox / segm.
    _C.CMB.EVAL_FUSE_OVERLAPS = True

    # Volume inference and 3D lesion merging (detection/inference.py).
    _C.CMB.INFER = CN()
    _C.CMB.INFER.BATCH_SIZE = 8  # slices per forward pass
    _C.CMB.INFER.SCORE_THRESH = 0.5  # instance score kept when building 3D lesions
    _C.CMB.INFER.MAX_SLICES = 6  # lesions spanning more slices look like veins
    _C.CMB.INFER.MAX_DIAMETER_MM = 10.0  # CMBs are 2-10 mm (REFERENCES.md)
    _C.CMB.INFER.MAX_ELONGATION = 3.0  # principal-axis ratio above which a lesion is tubular
    # Share of a lesion's voxels that must lie in the brain mask (CMBs are parenchymal;
    # 0 disables the test).
    _C.CMB.INFER.MIN_BRAIN_FRACTION = 0.5
    # A CMB is at least half surrounded by brain parenchyma (Greenberg et al. 2009): a
    # lesion is rejected when less than this share of the in-plane ring SURROUND_RING_MM
    # (mm beyond its mask, past the blooming halo; its part in the brain mask) is not
    # darker than halfway from the lesion's core to the brain median
    # (lesions.parenchyma_surround).
    # Detections on part of an iron-rich nucleus or a sinus fail it. 0 disables it. The
    # ring was chosen on the development centres (README, "Rejection rules").
    _C.CMB.INFER.MIN_PARENCHYMA_SURROUND = 0.5
    _C.CMB.INFER.SURROUND_RING_MM = (2.0, 5.0)
    # Bilateral mimics: a lesion whose mirror image across the mid-sagittal plane (found
    # by symmetry, detection/symmetry.py) holds a twin at least this dark, relative to
    # the lesion's own darkness against its ring, is rejected (iron-rich nuclei, pallidal
    # calcification: symmetric; a bleed has no twin). The twin is sought within
    # MIRROR_SEARCH_MM of the exact mirror image. 0 disables it.
    _C.CMB.INFER.MAX_MIRROR_RATIO = 0.0
    _C.CMB.INFER.MIRROR_SEARCH_MM = 3.0
    # Test-time left-right flip: each slice is also run mirrored and the two passes'
    # instances are fused (matched pairs: mean score; unmatched: half score). Twice the
    # model time; bleeds are found in both passes more consistently than mimics.
    _C.CMB.INFER.TTA_HFLIP = False
    # With TTA_HFLIP, each pass's slice instances scoring below this count as absent
    # (score 0) when the passes are fused for lesions.csv / cmb_pred.nii.gz. 0 = half of
    # SCORE_THRESH. candidates.csv fuses from its own floor (half of CANDIDATE_THRESH, or
    # this one if lower), so CANDIDATE_THRESH never changes the operating outputs.
    _C.CMB.INFER.TTA_PASS_THRESH = 0.0
    # Candidates for FROC: when > 0 and below SCORE_THRESH, the slice instances down to
    # this score are also merged into 3D candidates, written (with their centres and
    # scores) to candidates.csv. lesions.csv / cmb_pred.nii.gz stay at SCORE_THRESH; the
    # lesion evaluation sweeps FROC over the candidates. 0 = off.
    _C.CMB.INFER.CANDIDATE_THRESH = 0.0
    # Test-time magnification: slices are resampled to TARGET_SPACING / ZOOM mm for volume
    # inference and for COCO evaluation (predictions are mapped back to the slice grid).
    # A detector learns the apparent size of its training scanners' bleeds; a scanner
    # whose bleeds bloom less shows them smaller. Choose it per site on a few labelled
    # patients with tools/calibrate_zoom.py. 1.0 = as trained.
    _C.CMB.INFER.ZOOM = 1.0
    # Volume inference: a slice instance's mask is the pixels of its box where the mask
    # head's probability is >= this. Where a scanner blooms less than the training ones,
    # bleeds come out smaller than their reference, and a lower value draws them larger.
    # Like the zoom it is a property of the site (README, "A new site: the mask
    # threshold"): choose it with tools/calibrate_zoom.py --mask-threshs. COCO evaluation
    # of slices keeps Detectron2's 0.5.
    _C.CMB.INFER.MASK_THRESH = 0.5


def inference_zoom(cfg: CN) -> float:
    """``cfg.CMB.INFER.ZOOM`` checked: positive, finite, and only with a target spacing
    (slices on their native grid have no common pixel size to magnify)."""
    zoom = float(cfg.CMB.INFER.ZOOM)
    if not (zoom > 0 and zoom < float("inf")):
        raise ValueError(f"CMB.INFER.ZOOM must be a positive number, got {cfg.CMB.INFER.ZOOM}")
    if zoom != 1.0 and float(cfg.CMB.TARGET_SPACING) <= 0:
        raise ValueError("CMB.INFER.ZOOM needs CMB.TARGET_SPACING > 0 (slices on their native "
                         f"grid cannot be magnified consistently), got ZOOM {zoom}")
    return zoom


def mask_threshold(cfg: CN) -> float:
    """``cfg.CMB.INFER.MASK_THRESH`` checked: strictly between 0 and 1 (0 would paste the
    whole box, 1 nothing)."""
    t = float(cfg.CMB.INFER.MASK_THRESH)
    if not 0.0 < t < 1.0:
        raise ValueError("CMB.INFER.MASK_THRESH must be in (0, 1), got "
                         f"{cfg.CMB.INFER.MASK_THRESH}")
    return t


def export_params(cfg: CN, zoom: float = 1.0) -> ExportParams:
    """How ``cfg`` prepares slices (:data:`EXPORT_PARAM_KEYS`), validated. ``zoom`` > 1
    divides the spacing (test-time magnification, ``CMB.INFER.ZOOM``); the export and the
    up-to-date stamps use 1."""
    # Imported here: the exporter pulls in pandas and scipy (~0.4 s), which training
    # processes that only read the config keys do not need.
    from .data.export_coco import ExportParams

    if not (zoom > 0 and zoom < float("inf")):
        raise ValueError(f"zoom must be a positive number, got {zoom}")
    return ExportParams(
        target_spacing=float(cfg.CMB.TARGET_SPACING) / zoom,
        context_offset=int(cfg.CMB.CONTEXT_OFFSET),
        brain_margin_mm=float(cfg.CMB.BRAIN_MARGIN_MM),
        bias_degree=int(cfg.CMB.BIAS_DEGREE),
        percentiles=tuple(float(v) for v in cfg.CMB.INTENSITY_PERCENTILES),
    )
