"""Rule-based baseline on constructed lesion patterns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mil import CLASSES, REGION_COLUMNS
from mil.bagio import Bag
from mil.baseline import BaselineRule, classify_counts, predict_baseline, region_counts


def _bag(regions: list[int], scores: list[float] | None = None, with_regions: bool = True) -> Bag:
    n = len(regions)
    names = ["score", *REGION_COLUMNS] if with_regions else ["score"]
    feats = np.zeros((n, len(names)), np.float32)
    feats[:, 0] = scores if scores is not None else 0.9
    if with_regions:
        for i, r in enumerate(regions):
            feats[i, 1 + r] = 1.0
    return Bag("P", np.zeros((n, 3, 4, 4), np.float32), feats, tuple(names),
               np.arange(n, dtype=np.int64))


L, D, INFRA = 0, 1, 2


@pytest.mark.parametrize(
    ("regions", "age", "expected"),
    [
        ([L, L, L], 72.0, "CAA"),  # >= 2 strictly lobar: probable CAA
        ([L, L], None, "CAA"),  # age unknown: still CAA
        ([L, L, L], 45.0, "CADASIL"),  # Boston needs age >= 50
        ([L], 70.0, "CAA"),  # single lobar: possible CAA
        ([L, L, D], 72.0, "aSVD"),  # mixed: any deep excludes CAA
        ([D, D], 70.0, "aSVD"),
        ([INFRA], 68.0, "aSVD"),
        ([D, INFRA, L], None, "aSVD"),
        ([D, D, L], 48.0, "CADASIL"),  # young with deep involvement
        ([D, INFRA], 60.0, "CADASIL"),  # thalamic + brainstem pattern, < 65
        ([D, INFRA], 70.0, "aSVD"),
        ([], 45.0, "CADASIL"),  # no CMB: by age
        ([], 65.0, "aSVD"),
        ([], 80.0, "CAA"),
        ([], None, "aSVD"),
    ],
)
def test_rule_patterns(regions: list[int], age: float | None, expected: str) -> None:
    probs, preds, reasons = predict_baseline([_bag(regions)], [age])
    assert CLASSES[preds[0]] == expected, reasons[0]
    assert probs[0, preds[0]] == pytest.approx(0.9)
    assert probs.sum() == pytest.approx(1.0)


def test_nan_age_is_unknown() -> None:
    assert classify_counts(0, 0, 0, math.nan)[0] == CLASSES.index("aSVD")


def test_counts_and_min_score() -> None:
    bag = _bag([L, D, D, INFRA], scores=[0.9, 0.2, 0.9, 0.9])
    assert region_counts(bag) == (1, 2, 1)
    assert region_counts(bag, min_score=0.5) == (1, 1, 1)
    # A low-score deep false positive no longer masks a strictly lobar pattern.
    bag = _bag([L, L, D], scores=[0.9, 0.9, 0.3])
    rule = BaselineRule(min_score=0.5)
    _, preds, _ = predict_baseline([bag], [75.0], rule)
    assert CLASSES[preds[0]] == "CAA"


def test_missing_region_columns() -> None:
    with pytest.raises(KeyError, match="region"):
        predict_baseline([_bag([L], with_regions=False)])
