"""Metrics on hand-made cases, agreement with scikit-learn, bootstrap CIs, figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from mil.metrics import (
    binary_auc,
    bootstrap_ci,
    classification_report,
    confusion_matrix,
    ovr_auc,
    plot_confusion,
    plot_roc,
)


def _onehot(y: list[int], k: int = 3) -> np.ndarray:
    return np.eye(k)[y]


def test_perfect() -> None:
    y = [0, 0, 1, 1, 1, 2, 2]
    r = classification_report(y, _onehot(y), n_resamples=200)
    for m in ("accuracy", "auc_weighted", "precision_weighted", "recall_weighted", "f1_weighted"):
        assert r[m] == pytest.approx(1.0)
    assert r["confusion_matrix"] == [[2, 0, 0], [0, 3, 0], [0, 0, 2]]
    assert r["ci95"]["accuracy"] == [1.0, 1.0]


def test_inverted() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    prob = np.full((6, 3), 0.5)
    prob[np.arange(6), y] = 0.0  # the true class always gets the lowest score
    per, w = ovr_auc(y, prob)
    np.testing.assert_allclose(per, 0.0)
    assert w == 0.0
    r = classification_report(y, prob, n_resamples=0)
    assert r["accuracy"] == 0.0 and r["f1_weighted"] == 0.0
    assert "ci95" not in r


def test_known_confusion_matrix_matches_sklearn() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 0, 1, 2, 2])
    cm = confusion_matrix(y_true, y_pred)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    r = classification_report(y_true, _onehot(list(y_pred)), n_resamples=0)
    assert r["confusion_matrix"] == cm.tolist()
    assert r["accuracy"] == pytest.approx(4 / 6)
    p, rc, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=[0, 1, 2], average="weighted", zero_division=0
    )
    assert r["precision_weighted"] == pytest.approx(p)
    assert r["recall_weighted"] == pytest.approx(rc)
    assert r["f1_weighted"] == pytest.approx(f1)
    assert r["precision_per_class"] == pytest.approx({"aSVD": 1.0, "CAA": 0.5, "CADASIL": 0.5})


def test_zero_division_is_zero() -> None:
    y_true = np.array([0, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 0])  # classes 1, 2 never predicted
    r = classification_report(y_true, _onehot(list(y_pred)), n_resamples=0)
    p, rc, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=[0, 1, 2], average="weighted", zero_division=0
    )
    assert r["precision_weighted"] == pytest.approx(p)
    assert r["f1_weighted"] == pytest.approx(f1)


def test_auc_matches_sklearn_random() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 80)
    logits = rng.normal(size=(80, 3)) + 1.5 * np.eye(3)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    prob = np.round(prob, 2)  # ties
    prob /= prob.sum(1, keepdims=True)
    per, w = ovr_auc(y, prob)
    assert w == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="weighted"))
    for c in range(3):
        assert per[c] == pytest.approx(roc_auc_score(y == c, prob[:, c]))


def test_binary_auc_ties_and_undefined() -> None:
    assert binary_auc(np.array([1, 0, 1, 0], bool), np.ones(4)) == 0.5
    assert np.isnan(binary_auc(np.ones(3, bool), np.arange(3.0)))
    per, w = ovr_auc(np.zeros(4, int), np.full((4, 3), 1 / 3))
    assert np.isnan(w) and np.isnan(per).all()


def test_bootstrap_contains_point_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    prob = rng.dirichlet(np.ones(3), 60) + 0.8 * np.eye(3)[y]
    prob /= prob.sum(1, keepdims=True)
    r = classification_report(y, prob, n_resamples=1000, seed=7)
    assert r["bootstrap"]["n_resamples"] == 1000
    for m in ("accuracy", "auc_weighted", "precision_weighted", "recall_weighted", "f1_weighted"):
        lo, hi = r["ci95"][m]
        assert lo <= r[m] <= hi, m
        assert hi - lo > 0
    for c, (lo, hi) in r["ci95"]["auc_per_class"].items():
        assert lo <= r["auc_per_class"][c] <= hi
    a = bootstrap_ci(y, prob, 300, seed=1)
    b = bootstrap_ci(y, prob, 300, seed=1)
    c = bootstrap_ci(y, prob, 300, seed=2)
    assert a == b
    assert a["ci"] != c["ci"]


def test_bootstrap_skips_undefined_auc() -> None:
    y = np.array([0] * 10 + [1] * 10 + [2])  # a single CADASIL patient
    prob = _onehot(list(y)) * 0.8 + 0.2 / 3
    r = bootstrap_ci(y, prob, 1000, seed=0)
    # P(patient 20 not drawn in 21 draws) = (20/21)^21 ~ 0.36
    assert 250 < r["n_skipped_auc"] < 480
    assert r["ci"]["auc_weighted"] == [1.0, 1.0]
    assert r["ci"]["accuracy"] == [1.0, 1.0]


def test_figures(tmp_path: Path) -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    prob = _onehot(list(y)) * 0.7 + 0.1
    roc = plot_roc({"MIL": (y, prob), "baseline": (y, np.full((6, 3), 1 / 3))},
                   tmp_path / "roc.png")
    cm = plot_confusion({"MIL": confusion_matrix(y, prob.argmax(1))}, tmp_path / "cm.png")
    for p in (roc, cm):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["cm.png", "roc.png"]
