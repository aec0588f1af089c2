"""Rule-based CSVD classifier from lesion locations (stand-in for the clinical reading).

Input: the same bags as the MIL model (region one-hot columns ``region_lobar``,
``region_deep``, ``region_infratentorial``; optional ``score``) plus age from the
index when present. Nothing is fitted. An instance counts in the region whose
one-hot value is largest (and >= 0.5); instances with ``score < min_score`` are
ignored. With L, D, I the lobar, deep and infratentorial counts, in this order:

1. **Deep or infratentorial involvement** (D + I >= 1; Boston v2.0 excludes CAA when
   any deep lesion is present; cerebellar lesions are treated as infratentorial):
   CADASIL if age < ``young_age`` (55), or if age < ``cadasil_max_age`` (65) and both
   deep and infratentorial CMBs are present (the thalamic + brainstem pattern of
   CADASIL); otherwise aSVD (hypertensive arteriopathy, deep or mixed pattern).
   Unknown age -> aSVD.
2. **Strictly lobar, >= 2 CMBs** (L >= 2, D + I = 0): CAA -- Boston v2.0 probable
   CAA -- when age >= ``caa_min_age`` (50) or unknown; CADASIL when younger.
3. **Single lobar CMB** (L = 1, D + I = 0): CAA (Boston v2.0 possible CAA) when
   age >= ``caa_min_age`` or unknown; CADASIL when younger.
4. **No CMB**: by age: CADASIL if age < ``young_age``, CAA if age >= ``old_age``
   (75), otherwise aSVD; unknown age -> aSVD (the most common class).

Probabilities are the smoothed one-hot of the decision: ``1 - smoothing`` for the
chosen class and ``smoothing / 2`` for each other, so ROC AUC is computable (each
class curve has a single operating point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mil import CLASSES, REGION_COLUMNS
from mil.bagio import Bag

ASVD, CAA, CADASIL = (CLASSES.index(c) for c in ("aSVD", "CAA", "CADASIL"))


@dataclass
class BaselineRule:
    """Thresholds of the rule (see module docstring)."""

    caa_min_age: float = 50.0
    young_age: float = 55.0
    cadasil_max_age: float = 65.0
    old_age: float = 75.0
    min_score: float = 0.0
    smoothing: float = 0.1


def region_counts(bag: Bag, min_score: float = 0.0) -> tuple[int, int, int]:
    """(lobar, deep, infratentorial) CMB counts of a bag.

    Raises:
        KeyError: a region one-hot column is missing.
    """
    missing = [c for c in REGION_COLUMNS if not bag.has_feature(c)]
    if missing:
        raise KeyError(f"bag {bag.patient_id!r}: baseline needs region column(s) {missing}")
    if bag.n_instances == 0:
        return 0, 0, 0
    onehot = bag.select_features(REGION_COLUMNS)
    keep = onehot.max(1) >= 0.5
    if min_score > 0 and bag.has_feature("score"):
        keep &= bag.feature("score") >= min_score
    region = onehot.argmax(1)[keep]
    counts = np.bincount(region, minlength=3)
    return int(counts[0]), int(counts[1]), int(counts[2])


def classify_counts(
    lobar: int, deep: int, infra: int, age: float | None, rule: BaselineRule | None = None
) -> tuple[int, str]:
    """Apply the rule to region counts and age; returns (class index, reason)."""
    r = rule or BaselineRule()
    known = age is not None and not math.isnan(age)
    if deep + infra >= 1:
        if known and age < r.young_age:
            return CADASIL, "deep/infratentorial CMB, young"
        if known and age < r.cadasil_max_age and deep >= 1 and infra >= 1:
            return CADASIL, "deep + infratentorial pattern, age < cadasil_max_age"
        return ASVD, "deep/infratentorial CMB"
    if lobar >= 2:
        if known and age < r.caa_min_age:
            return CADASIL, ">= 2 strictly lobar CMB but age < 50"
        return CAA, ">= 2 strictly lobar CMB (probable CAA)"
    if lobar == 1:
        if known and age < r.caa_min_age:
            return CADASIL, "single lobar CMB, age < 50"
        return CAA, "single lobar CMB (possible CAA)"
    if not known:
        return ASVD, "no CMB, age unknown"
    if age < r.young_age:
        return CADASIL, "no CMB, young"
    if age >= r.old_age:
        return CAA, "no CMB, old"
    return ASVD, "no CMB"


def predict_baseline(
    bags: Sequence[Bag], ages: Sequence[float | None] | None = None,
    rule: BaselineRule | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rule-based predictions for bags.

    Returns:
        (probabilities [n, 3], predicted class indices [n], reasons [n]).
    """
    r = rule or BaselineRule()
    ages = list(ages) if ages is not None else [None] * len(bags)
    k = len(CLASSES)
    probs = np.full((len(bags), k), r.smoothing / (k - 1), np.float64)
    preds = np.zeros(len(bags), int)
    reasons = []
    for i, (bag, age) in enumerate(zip(bags, ages, strict=True)):
        c, why = classify_counts(*region_counts(bag, r.min_score), age, r)
        probs[i, c] = 1.0 - r.smoothing
        preds[i] = c
        reasons.append(why)
    return probs, preds, reasons
