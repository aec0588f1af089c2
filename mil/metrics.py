"""Patient-level classification metrics with bootstrap CIs, and their figures.

Conventions (REFERENCES.md, "Evaluation conventions"):

- predicted label = argmax of the class probabilities;
- one-vs-rest ROC AUC per class (Mann-Whitney, ties count 1/2); the weighted AUC
  averages the per-class AUCs of the classes present, weighted by their support
  (as ``sklearn.metrics.roc_auc_score(multi_class="ovr", average="weighted")``);
  undefined (NaN) when fewer than two classes are present;
- accuracy; precision / recall / F1 per class (0 when undefined) averaged with
  support weights (sklearn's ``average="weighted", zero_division=0``);
- 95% CIs: percentile bootstrap over patients (``n_resamples`` >= 1000, seeded).
  A resample in which a class present in the full sample is missing has undefined
  per-class AUC; such resamples are skipped for all AUC metrics and counted
  (``n_skipped_auc``). Other metrics use every resample.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from mil import CLASSES

logger = logging.getLogger(__name__)

SCALAR_METRICS: tuple[str, ...] = (
    "accuracy", "auc_weighted", "precision_weighted", "recall_weighted", "f1_weighted",
)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Confusion matrix ``cm[i, j]`` = patients of true class i predicted as j."""
    y_true = np.asarray(y_true, int)
    y_pred = np.asarray(y_pred, int)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(
        n_classes, n_classes
    )


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the boolean ``positive``; NaN if one side is empty."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ovr_auc(y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class one-vs-rest AUC (NaN where undefined) and the support-weighted mean."""
    y_true = np.asarray(y_true, int)
    prob = np.asarray(prob, float)
    k = prob.shape[1]
    per = np.array([binary_auc(y_true == c, prob[:, c]) for c in range(k)])
    support = np.bincount(y_true, minlength=k).astype(float)
    ok = ~np.isnan(per)
    if not ok.any() or support[ok].sum() == 0:
        return per, math.nan
    return per, float(np.sum(per[ok] * support[ok]) / support[ok].sum())


def _prf_from_cm(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(float)
    pred = cm.sum(0).astype(float)
    support = cm.sum(1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred > 0, tp / pred, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    return precision, recall, f1, support


def _scalars(y_true: np.ndarray, prob: np.ndarray, k: int) -> dict[str, float | np.ndarray]:
    y_pred = prob.argmax(1)
    cm = confusion_matrix(y_true, y_pred, k)
    precision, recall, f1, support = _prf_from_cm(cm)
    n = support.sum()
    w = support / n if n else support
    per_auc, auc_w = ovr_auc(y_true, prob)
    return {
        "accuracy": float(np.trace(cm) / n) if n else math.nan,
        "auc_weighted": auc_w,
        "precision_weighted": float(np.sum(w * precision)),
        "recall_weighted": float(np.sum(w * recall)),
        "f1_weighted": float(np.sum(w * f1)),
        "auc_per_class": per_auc,
        "precision_per_class": precision,
        "recall_per_class": recall,
        "f1_per_class": f1,
        "cm": cm,
    }


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    prob: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    classes: Sequence[str] = CLASSES,
) -> dict:
    """Percentile bootstrap CIs over patients.

    Returns:
        ``{"ci": {metric: [lo, hi]}, "auc_per_class_ci": {class: [lo, hi]},
        "n_resamples": R, "n_skipped_auc": k, "seed": seed, "level": 1 - alpha}``;
        bounds are None when no valid resample exists.
    """
    y_true = np.asarray(y_true, int)
    prob = np.asarray(prob, float)
    k = len(classes)
    n = len(y_true)
    rng = np.random.default_rng(seed)
    present = np.bincount(y_true, minlength=k) > 0
    stats: dict[str, list[float]] = {m: [] for m in SCALAR_METRICS}
    per_class: list[np.ndarray] = []
    skipped = 0
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        yt, pr = y_true[idx], prob[idx]
        s = _scalars(yt, pr, k)
        for m in ("accuracy", "precision_weighted", "recall_weighted", "f1_weighted"):
            stats[m].append(s[m])
        if np.array_equal(np.bincount(yt, minlength=k) > 0, present) and present.sum() >= 2:
            stats["auc_weighted"].append(s["auc_weighted"])
            per_class.append(s["auc_per_class"])
        else:
            skipped += 1
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]

    def bounds(v: Sequence[float] | np.ndarray) -> list[float | None]:
        v = np.asarray(v, float)
        v = v[~np.isnan(v)]
        if v.size == 0:
            return [None, None]
        lo, hi = np.percentile(v, q)
        return [float(lo), float(hi)]

    pc = np.array(per_class).reshape(-1, k)
    if skipped:
        logger.info("bootstrap: %d of %d resamples skipped for AUC (a class missing)",
                    skipped, n_resamples)
    return {
        "ci": {m: bounds(stats[m]) for m in SCALAR_METRICS},
        "auc_per_class_ci": {c: bounds(pc[:, j]) for j, c in enumerate(classes)},
        "n_resamples": int(n_resamples),
        "n_skipped_auc": int(skipped),
        "seed": int(seed),
        "level": 1 - alpha,
    }


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    prob: np.ndarray,
    classes: Sequence[str] = CLASSES,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Point estimates and bootstrap CIs as a JSON-ready dict (NaN -> None).

    Keys: ``n``, ``support``, the :data:`SCALAR_METRICS`, ``auc_per_class``,
    ``precision_per_class``/``recall_per_class``/``f1_per_class``,
    ``confusion_matrix`` (rows = true, columns = predicted), ``ci95`` (metric ->
    [lo, hi], plus ``auc_per_class``), ``bootstrap`` (resamples, skipped, seed).
    """
    y_true = np.asarray(y_true, int)
    prob = np.asarray(prob, float)
    k = len(classes)
    if len(y_true) == 0:
        return {"n": 0}
    s = _scalars(y_true, prob, k)
    out: dict = {
        "n": int(len(y_true)),
        "support": {c: int(v) for c, v in zip(classes, np.bincount(y_true, minlength=k))},
    }
    for m in SCALAR_METRICS:
        out[m] = _nan_to_none(s[m])
    for m in ("auc_per_class", "precision_per_class", "recall_per_class", "f1_per_class"):
        out[m] = {c: _nan_to_none(float(v)) for c, v in zip(classes, s[m])}
    out["confusion_matrix"] = s["cm"].tolist()
    if n_resamples > 0:
        b = bootstrap_ci(y_true, prob, n_resamples, seed, classes=classes)
        out["ci95"] = dict(b["ci"])
        out["ci95"]["auc_per_class"] = b["auc_per_class_ci"]
        out["bootstrap"] = {
            "n_resamples": b["n_resamples"], "n_skipped_auc": b["n_skipped_auc"],
            "seed": b["seed"], "method": "percentile, resampling patients",
        }
    return out


def _save_fig(fig: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    classes: Sequence[str] = CLASSES,
    title: str = "",
) -> Path:
    """One-vs-rest ROC curves per class; one line style per named predictor.

    Args:
        curves: name -> (y_true [n], prob [n, K]), e.g. {"MIL": ..., "baseline": ...}.
        path: PNG path (written atomically).
    """
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend
    from sklearn.metrics import roc_curve

    path = Path(path)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for si, (name, (y, p)) in enumerate(curves.items()):
        y = np.asarray(y, int)
        p = np.asarray(p, float)
        per, w = ovr_auc(y, p)
        for c, cls in enumerate(classes):
            if np.isnan(per[c]):
                continue
            fpr, tpr, _ = roc_curve(y == c, p[:, c])
            ax.plot(fpr, tpr, styles[si % 4], color=colors[c % 5],
                    label=f"{name} {cls} AUC={per[c]:.3f}")
        ax.plot([], [], styles[si % 4], color="k", label=f"{name} weighted AUC={w:.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=title or "ROC (one-vs-rest)")
    ax.legend(fontsize=7, loc="lower right")
    _save_fig(fig, path)
    return path


def plot_confusion(
    matrices: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    classes: Sequence[str] = CLASSES,
    title: str = "",
) -> Path:
    """Confusion matrices side by side (rows = true, columns = predicted)."""
    from matplotlib.figure import Figure

    path = Path(path)
    n = len(matrices)
    fig = Figure(figsize=(4.4 * n, 4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items()):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)),
               xticklabels=classes, yticklabels=classes, xlabel="predicted",
               title=f"{title} {name}".strip())
    axes[0][0].set_ylabel("true")
    _save_fig(fig, path)
    return path
