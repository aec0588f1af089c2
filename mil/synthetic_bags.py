"""Synthetic lesion bags with known answers, for tests and the smoke demo.

The class is carried by where the lesions lie (MARS region, position) and by the
patient's age, following the per-disease patterns in REFERENCES.md:

- CAA: older (~74 y); strictly lobar CMBs, posterior predominance, close to the
  cortical surface.
- aSVD: ~68 y; deep and infratentorial CMBs with or without lobar ones (mixed).
- CADASIL: younger (~50 y); often no CMB at all; otherwise thalamic (deep),
  anterior-temporal (lobar) and brainstem (infratentorial) CMBs, sometimes many.

On top, a simulated detector: each true CMB is found with probability
``sensitivity``; false positives (vein-like, elongated, lower score, anywhere) are
added at ``fp_rate`` per patient. Centre ``C`` (the default external centre) has a
different scanner: crop contrast and intensity scale differ and the detector makes
more false positives.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mil import CLASSES, FEATURE_NAMES
from mil.bagio import Bag, save_bag, write_index

logger = logging.getLogger(__name__)

_AGE = {"aSVD": (68.0, 9.0), "CAA": (74.0, 7.0), "CADASIL": (51.0, 8.0)}
# Region probabilities (lobar, deep, infratentorial) of true CMBs.
_REGION_P = {
    "aSVD": (0.30, 0.50, 0.20),
    "CAA": (1.0, 0.0, 0.0),
    "CADASIL": (0.30, 0.45, 0.25),
}
_CENTER_SHIFT = {"C": {"contrast": 0.75, "scale": 1.3, "fp_extra": 0.5}}


def _n_true(rng: np.random.Generator, label: str) -> int:
    if label == "CAA":
        return int(1 + rng.negative_binomial(2, 0.3))  # >= 1, median ~4
    if label == "aSVD":
        return int(1 + rng.negative_binomial(2, 0.35))
    # CADASIL: about a third without CMB, otherwise heavy-tailed counts.
    if rng.random() < 0.35:
        return 0
    return int(1 + rng.negative_binomial(1.2, 0.15))


def _position(rng: np.random.Generator, label: str, region: int) -> tuple[float, ...]:
    """(depth_mm, pos_lr, pos_ap, pos_si) for a lesion of ``label`` in ``region``."""
    lr = float(rng.uniform(-0.9, 0.9))
    if region == 0:  # lobar: cortex / juxtacortical white matter
        depth = float(rng.uniform(0.0, 10.0))
        if label == "CAA":  # posterior predominance (occipital / parietal / temporal)
            ap, si = float(rng.normal(-0.45, 0.3)), float(rng.normal(0.1, 0.35))
        elif label == "CADASIL":  # anterior temporal
            ap, si = float(rng.normal(0.25, 0.3)), float(rng.normal(-0.35, 0.25))
        else:
            ap, si = float(rng.normal(0.0, 0.45)), float(rng.normal(0.15, 0.35))
    elif region == 1:  # deep: basal ganglia, thalamus, deep white matter
        depth = float(rng.uniform(20.0, 45.0))
        lr = float(rng.uniform(-0.4, 0.4))
        if label == "CADASIL":  # thalamus
            ap, si = float(rng.normal(-0.1, 0.12)), float(rng.normal(0.0, 0.12))
        else:  # basal ganglia / deep WM
            ap, si = float(rng.normal(0.1, 0.2)), float(rng.normal(0.05, 0.2))
    else:  # infratentorial: brainstem, cerebellum
        depth = float(rng.uniform(15.0, 40.0))
        lr = float(rng.uniform(-0.5, 0.5))
        if label == "CADASIL":  # brainstem
            lr = float(rng.uniform(-0.15, 0.15))
        ap, si = float(rng.normal(-0.35, 0.2)), float(rng.normal(-0.75, 0.1))
    return depth, lr, float(np.clip(ap, -1, 1)), float(np.clip(si, -1, 1))


def _crop(
    rng: np.random.Generator, size: int, diameter_px: float, elongation: float,
    contrast: float, scale: float,
) -> np.ndarray:
    """A 3-slice patch with a dark blob (CMB) or an elongated dark line (vein)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - (size - 1) / 2.0
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    sigma = max(diameter_px / 2.355, 0.6)
    out = np.empty((3, size, size), np.float32)
    for k, weight in enumerate((0.5, 1.0, 0.5) if elongation < 1.5 else (1.0, 1.0, 1.0)):
        blob = np.exp(-0.5 * ((u / (sigma * elongation)) ** 2 + (v / sigma) ** 2))
        out[k] = scale * (1.0 - contrast * weight * blob) + rng.normal(0, 0.08, (size, size))
    return out


def make_bag(
    rng: np.random.Generator,
    label: str,
    patient_id: str,
    center: str = "A",
    crop_size: int = 32,
    sensitivity: float = 0.85,
    fp_rate: float = 0.6,
    feature_names: tuple[str, ...] = FEATURE_NAMES,
) -> tuple[Bag, float]:
    """One synthetic patient: returns (bag, age)."""
    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}")
    shift = _CENTER_SHIFT.get(center, {})
    age = float(np.clip(rng.normal(*_AGE[label]), 30, 95))
    rows: list[dict[str, float]] = []
    crops: list[np.ndarray] = []
    for _ in range(_n_true(rng, label)):
        if rng.random() > sensitivity:
            continue
        region = int(rng.choice(3, p=_REGION_P[label]))
        diameter = float(rng.uniform(2.0, 8.0))
        elong = float(rng.uniform(1.0, 1.35))
        contrast = float(rng.uniform(0.5, 0.9)) * shift.get("contrast", 1.0)
        score = float(rng.uniform(0.6, 1.0))
        rows.append(_row(rng, label, region, diameter, elong, contrast, score))
        crops.append(_crop(rng, crop_size, diameter * crop_size / 16.0, elong, contrast,
                           shift.get("scale", 1.0)))
    for _ in range(rng.poisson(fp_rate + shift.get("fp_extra", 0.0))):
        region = int(rng.choice(3, p=(0.5, 0.3, 0.2)))
        diameter = float(rng.uniform(1.5, 6.0))
        elong = float(rng.uniform(1.6, 3.0))
        contrast = float(rng.uniform(0.25, 0.6)) * shift.get("contrast", 1.0)
        score = float(rng.uniform(0.3, 0.75))
        rows.append(_row(rng, "noise", region, diameter, elong, contrast, score))
        crops.append(_crop(rng, crop_size, diameter * crop_size / 16.0, elong, contrast,
                           shift.get("scale", 1.0)))
    n = len(rows)
    feats = np.array([[r[f] for f in feature_names] for r in rows], np.float32).reshape(
        n, len(feature_names)
    )
    crop_arr = (
        np.stack(crops).astype(np.float32)
        if crops
        else np.zeros((0, 3, crop_size, crop_size), np.float32)
    )
    lesion_ids = np.arange(1, n + 1, dtype=np.int64)
    return Bag(patient_id, crop_arr, feats, tuple(feature_names), lesion_ids), age


def _row(
    rng: np.random.Generator, label: str, region: int, diameter: float, elong: float,
    contrast: float, score: float,
) -> dict[str, float]:
    depth, lr, ap, si = _position(rng, label, region)
    r = diameter / 2.0
    return {
        "score": score,
        "volume_mm3": float(4.0 / 3.0 * np.pi * r**3 * elong),
        "diameter_mm": diameter,
        "elongation": elong,
        "contrast": contrast,
        "n_slices": float(max(1, round(diameter * (elong if elong > 1.5 else 1.0) / 1.5))),
        "region_lobar": float(region == 0),
        "region_deep": float(region == 1),
        "region_infratentorial": float(region == 2),
        "depth_mm": depth,
        "pos_lr": lr,
        "pos_ap": ap,
        "pos_si": si,
    }


def write_synthetic_bags(
    out_dir: str | os.PathLike,
    n_per_center: int | Mapping[str, int] = 40,
    centers: tuple[str, ...] = ("A", "B", "C"),
    seed: int = 0,
    crop_size: int = 32,
    with_age: bool = True,
    class_p: tuple[float, float, float] = (0.4, 0.35, 0.25),
    feature_names: tuple[str, ...] = FEATURE_NAMES,
) -> Path:
    """Write a synthetic bag set: ``<out>/bags/<pid>.npz`` and ``<out>/index.csv``.

    Args:
        out_dir: output folder.
        n_per_center: patients per centre (int or mapping centre -> count).
        centers: centre names; ``C`` gets a scanner shift (use it as external centre).
        seed: RNG seed (the same seed gives identical files).
        crop_size: crop side S.
        with_age: write an ``age`` column in the index.
        class_p: class frequencies (aSVD, CAA, CADASIL); every class appears at
            least twice per centre when the centre has >= 6 patients.
        feature_names: which feature columns to write (any subset of FEATURE_NAMES).

    Returns:
        Path of the index CSV.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    counts = (
        dict(n_per_center)
        if isinstance(n_per_center, Mapping)
        else {c: int(n_per_center) for c in centers}
    )
    entries = []
    for center in centers:
        n = counts.get(center, 0)
        labels = list(rng.choice(len(CLASSES), size=n, p=class_p))
        if n >= 6:  # guarantee every class for stratified folds
            for k in range(len(CLASSES)):
                while labels.count(k) < 2:
                    j = int(np.argmax([labels.count(x) for x in labels]))
                    labels[j] = k
        for i, k in enumerate(labels):
            pid = f"{center}{i:03d}"
            bag, age = make_bag(
                rng, CLASSES[k], pid, center=center, crop_size=crop_size,
                feature_names=feature_names,
            )
            path = save_bag(
                out_dir / "bags" / f"{pid}.npz", bag.crops, bag.features, bag.feature_names,
                bag.lesion_ids, pid,
            )
            e: dict[str, object] = {
                "patient_id": pid, "center": center, "label": CLASSES[k],
                "n_instances": bag.n_instances, "path": str(path),
            }
            if with_age:
                e["age"] = round(age, 1)
            entries.append(e)
    index = write_index(out_dir / "index.csv", entries)
    logger.info("wrote %d synthetic bags to %s", len(entries), out_dir)
    return index
