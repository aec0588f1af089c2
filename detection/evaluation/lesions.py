"""Lesion-level detection metrics per patient and over a cohort (pure numpy/scipy).

Conventions (``../shared/REFERENCES.md``; all written into ``metrics.json``)
----------------------------------------------------------------------------
* Reference lesions: the reference mask's instance ids when it holds more than one
  positive value, else its 3D connected components (26-connectivity). Predicted lesions:
  the ids of the predicted instance label volume (``cmb_pred.nii.gz``).
* Voxel-wise **IoU / Dice** on the binary patient volume (study convention, reported
  mean ± SD over patients, SD with ddof=1). Empty prediction and empty reference:
  IoU = Dice = 1 (nothing to find, nothing wrongly found).
* **Lesion recall** (study): fraction of reference lesions overlapped by at least one
  predicted voxel; undefined (NaN, left out of means) for a patient without reference
  lesions.
* **VALDO matching**: centres of mass in world mm (the affine, so anisotropic voxels
  count correctly); a prediction is a TP when its centre lies within ``match_mm``
  (5 mm) of a reference centre; one prediction per reference and one reference per
  prediction, assigned greedily by increasing distance (nearest wins). FP = unmatched
  predictions, FN = unmatched references. Per-case **F1** = 2TP / (2TP + FP + FN),
  1 when both are empty; **sensitivity** = TP / (TP + FN) (NaN without references);
  **precision** = TP / (TP + FP) (NaN without predictions); **lesion Dice** = mean
  Dice over matched pairs (NaN without matches); **absolute count difference**.
* **Count agreement**: ICC(2,1) (two-way random effects, absolute agreement, single
  rater; McGraw & Wong ICC(A,1)) between predicted and reference lesion counts,
  because a systematic over-count must lower agreement; ICC(3,1) (consistency) is
  reported beside it; Spearman's rho with its p-value.
* **FROC**: predicted lesions are thresholded at every distinct score (at most 512
  quantiles), re-matched with the VALDO rule at each threshold; sensitivity = total
  TP / total reference lesions, FP per patient = total FP / number of patients. The
  sensitivity at a target FP rate is the best sensitivity among operating points with
  at most that many FP per patient (so the curve is monotone). The sweep runs over
  every candidate, not only those above the operating ``score_thresh``: the lesions
  before that threshold, or the prediction's ``candidates.csv`` (lesions merged from
  slice instances down to ``CMB.INFER.CANDIDATE_THRESH``) when it has one. A FROC cut
  at the operating threshold would stop at that threshold's sensitivity. With candidates,
  the predicted lesions are swept as well and the curve holds both families' points
  (each point one threshold applied to every patient), so it passes through the
  operating point.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy import stats

from ..fileio import atomic_output, write_json_atomic, write_text_atomic

__all__ = [
    "FROC_FP_RATES",
    "STUDY_REFERENCE",
    "LesionEvalError",
    "PatientEval",
    "CohortEval",
    "SIZE_BINS_MM",
    "by_reference_size",
    "reference_instances",
    "lesion_centres",
    "match_lesions",
    "evaluate_patient",
    "icc",
    "spearman",
    "froc",
    "evaluate_cohort",
    "plot_froc",
    "write_report",
    "evaluate_prediction_dir",
    "headline_figures",
]

logger = logging.getLogger(__name__)

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: The target study's external-test figures (mean ± SD over patients).
STUDY_REFERENCE = {"iou": [0.523, 0.319], "dice": [0.627, 0.296], "recall": [0.706, 0.365]}
#: Per-patient metrics summarised as mean / SD / median.
PATIENT_METRICS = ("iou", "dice", "recall", "sensitivity", "precision", "f1", "lesion_dice",
                   "fp", "abs_count_diff", "n_ref", "n_pred", "tp", "fn")
_MAX_THRESHOLDS = 512


class LesionEvalError(ValueError):
    """Bad evaluation input; the message names the file and the problem."""


# ============================================================================ per patient


def reference_instances(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Instance labels of a reference mask: its ids when it has several positive values,
    else 3D connected components (``connectivity`` 6, 18 or 26)."""
    mask = np.asarray(mask)
    if np.issubdtype(mask.dtype, np.floating):
        mask = np.rint(mask)
    mask = mask.astype(np.int64, copy=False)
    vals = np.unique(mask[mask > 0])
    if len(vals) > 1:
        return mask.astype(np.int32)
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    lab, _ = ndi.label(mask > 0, structure=ndi.generate_binary_structure(3, rank))
    return lab.astype(np.int32)


def lesion_centres(labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids present, world centres of mass [n, 3] mm)."""
    labels = np.asarray(labels)
    ids = np.unique(labels[labels > 0]).astype(np.int64)
    if not len(ids):
        return ids, np.zeros((0, 3))
    com = np.asarray(ndi.center_of_mass(np.ones(labels.shape, np.float32), labels, ids))
    aff = np.asarray(affine, dtype=np.float64)
    return ids, com.reshape(-1, 3) @ aff[:3, :3].T + aff[:3, 3]


def _candidate_pairs(pred_com: np.ndarray, ref_com: np.ndarray, match_mm: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred index, ref index, distance) of pairs within ``match_mm``, nearest first."""
    if not len(pred_com) or not len(ref_com):
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0)
    d = np.linalg.norm(pred_com[:, None, :] - ref_com[None, :, :], axis=2)
    pi, ri = np.nonzero(d <= match_mm)
    dist = d[pi, ri]
    order = np.lexsort((ri, pi, dist))
    return pi[order], ri[order], dist[order]


def _greedy(pi: np.ndarray, ri: np.ndarray, keep: np.ndarray | None = None) -> list[int]:
    """Indices into the pair list of the greedy one-to-one matching."""
    used_p: set[int] = set()
    used_r: set[int] = set()
    out = []
    for n, (p, r) in enumerate(zip(pi.tolist(), ri.tolist())):
        if (keep is not None and not keep[p]) or p in used_p or r in used_r:
            continue
        used_p.add(p)
        used_r.add(r)
        out.append(n)
    return out


def match_lesions(pred_com: np.ndarray, ref_com: np.ndarray, match_mm: float = 5.0
                  ) -> list[tuple[int, int, float]]:
    """VALDO matching of world centres: ``(pred index, ref index, distance mm)`` pairs."""
    pi, ri, d = _candidate_pairs(np.asarray(pred_com, float).reshape(-1, 3),
                                 np.asarray(ref_com, float).reshape(-1, 3), match_mm)
    return [(int(pi[n]), int(ri[n]), float(d[n])) for n in _greedy(pi, ri)]


@dataclass
class PatientEval:
    """One patient's metrics (``metrics``), matched pairs and what FROC needs."""

    patient_id: str
    metrics: dict[str, float]
    pred_ids: np.ndarray
    pred_scores: np.ndarray
    pred_com: np.ndarray
    ref_ids: np.ndarray
    ref_com: np.ndarray
    matches: list[tuple[int, int, float, float]] = field(default_factory=list)
    """(pred id, ref id, distance mm, lesion Dice)."""
    froc_com: np.ndarray | None = None
    """Centres (mm) of the candidates FROC sweeps over; None: the predicted lesions."""
    froc_scores: np.ndarray | None = None
    froc_from_candidates: bool = False
    """True when ``froc_com`` holds explicit candidates (candidates.csv)."""
    ref_volume_mm3: np.ndarray | None = None
    """Volume of each reference lesion (aligned with ``ref_ids``)."""
    pred_volume_mm3: np.ndarray | None = None
    """Volume of each predicted lesion (aligned with ``pred_ids``)."""


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def evaluate_patient(
    pred_labels: np.ndarray,
    ref_mask: np.ndarray,
    affine: np.ndarray,
    scores: Mapping[int, float] | None = None,
    *,
    patient_id: str = "",
    match_mm: float = 5.0,
    score_thresh: float | None = None,
    candidates: tuple[np.ndarray, np.ndarray] | None = None,
) -> PatientEval:
    """All per-patient metrics (module docstring) for one predicted label volume.

    ``scores``: predicted lesion id -> score (missing ids score 1.0 with a warning;
    ``None``: all 1.0). ``score_thresh`` drops predicted lesions scoring below it first.
    ``candidates``: (centres [n, 3] in mm, scores [n]) for the FROC sweep; None: the
    predicted lesions before ``score_thresh``.
    """
    pred = np.asarray(pred_labels)
    if np.issubdtype(pred.dtype, np.floating):
        pred = np.rint(pred)
    pred = pred.astype(np.int64, copy=False)
    ref = reference_instances(ref_mask).astype(np.int64)
    if pred.shape != ref.shape:
        raise LesionEvalError(f"{patient_id}: prediction {pred.shape} and reference "
                              f"{ref.shape} are not on the same grid")
    pids = np.unique(pred[pred > 0])
    sc = np.ones(len(pids))
    if scores is not None:
        missing = [int(i) for i in pids if int(i) not in scores]
        if missing:
            logger.warning("%s: no score for predicted lesions %s; using 1.0", patient_id,
                           missing[:10])
        sc = np.array([float(scores.get(int(i), 1.0)) for i in pids])
    froc_com = froc_scores = None
    if candidates is not None:
        froc_com = np.asarray(candidates[0], dtype=np.float64).reshape(-1, 3)
        froc_scores = np.asarray(candidates[1], dtype=np.float64).reshape(-1)
        if len(froc_com) != len(froc_scores):
            raise LesionEvalError(f"{patient_id}: {len(froc_com)} candidate centres but "
                                  f"{len(froc_scores)} scores")
    if score_thresh is not None and len(pids):
        if candidates is None and np.any(sc < score_thresh):
            all_ids, froc_com = lesion_centres(pred, affine)
            score_all = dict(zip(pids.tolist(), sc.tolist()))
            froc_scores = np.array([score_all.get(int(i), 1.0) for i in all_ids])
        drop = pids[sc < score_thresh]
        if len(drop):
            pred = np.where(np.isin(pred, drop), 0, pred)
            keep = sc >= score_thresh
            pids, sc = pids[keep], sc[keep]

    pb, rb = pred > 0, ref > 0
    inter = int(np.count_nonzero(pb & rb))
    union = int(np.count_nonzero(pb | rb))
    npv, nrv = int(pb.sum()), int(rb.sum())
    iou = 1.0 if union == 0 else inter / union
    dice = 1.0 if npv + nrv == 0 else 2.0 * inter / (npv + nrv)

    pid_arr, pcom = lesion_centres(pred, affine)
    rid_arr, rcom = lesion_centres(ref, affine)
    # voxel overlaps between lesions (for recall and lesion Dice)
    both = pb & rb
    pairs = np.stack([pred[both], ref[both]], 1)
    uniq, cnt = (np.unique(pairs, axis=0, return_counts=True) if len(pairs)
                 else (np.zeros((0, 2), np.int64), np.zeros(0, np.int64)))
    overlap = {(int(a), int(b)): int(c) for (a, b), c in zip(uniq, cnt)}
    psize = dict(zip(*np.unique(pred[pb], return_counts=True)))
    rsize = dict(zip(*np.unique(ref[rb], return_counts=True)))
    hit_refs = {b for (_, b) in overlap}

    matches = []
    for p_i, r_i, d in match_lesions(pcom, rcom, match_mm):
        p, r = int(pid_arr[p_i]), int(rid_arr[r_i])
        ld = 2.0 * overlap.get((p, r), 0) / (psize[p] + rsize[r])
        matches.append((p, r, d, float(ld)))
    n_pred, n_ref, tp = len(pid_arr), len(rid_arr), len(matches)
    fp, fn = n_pred - tp, n_ref - tp
    metrics = {
        "n_ref": n_ref, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn,
        "iou": float(iou), "dice": float(dice),
        "recall": _ratio(len(hit_refs), n_ref),
        "sensitivity": _ratio(tp, n_ref),
        "precision": _ratio(tp, n_pred),
        "f1": 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn),
        "lesion_dice": float(np.mean([m[3] for m in matches])) if matches else float("nan"),
        "abs_count_diff": abs(n_pred - n_ref),
        "ref_voxels": nrv, "pred_voxels": npv,
    }
    score_of = dict(zip(pids.tolist(), sc.tolist()))
    vox_mm3 = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    return PatientEval(
        patient_id=patient_id, metrics=metrics, pred_ids=pid_arr,
        pred_scores=np.array([score_of.get(int(i), 1.0) for i in pid_arr]),
        pred_com=pcom, ref_ids=rid_arr, ref_com=rcom, matches=matches,
        froc_com=froc_com, froc_scores=froc_scores, froc_from_candidates=candidates is not None,
        ref_volume_mm3=np.array([rsize[i] * vox_mm3 for i in rid_arr.tolist()], float),
        pred_volume_mm3=np.array([psize[i] * vox_mm3 for i in pid_arr.tolist()], float))


# ============================================================================ agreement


def icc(ratings: np.ndarray, kind: str = "2,1") -> float:
    """Shrout-Fleiss ICC of ``ratings`` [n subjects, k raters]: ``"2,1"`` (absolute
    agreement, two-way random) or ``"3,1"`` (consistency, two-way mixed). NaN when
    undefined (fewer than 2 subjects or no variance)."""
    x = np.asarray(ratings, dtype=np.float64)
    n, k = x.shape
    if n < 2 or k < 2:
        return float("nan")
    grand = x.mean()
    ssr = k * np.sum((x.mean(1) - grand) ** 2)
    ssc = n * np.sum((x.mean(0) - grand) ** 2)
    sse = np.sum((x - grand) ** 2) - ssr - ssc
    msr, msc, mse = ssr / (n - 1), ssc / (k - 1), sse / ((n - 1) * (k - 1))
    if kind == "2,1":
        den = msr + (k - 1) * mse + k * (msc - mse) / n
    elif kind == "3,1":
        den = msr + (k - 1) * mse
    else:
        raise ValueError(f"kind must be '2,1' or '3,1', got {kind!r}")
    return float((msr - mse) / den) if den > 0 else float("nan")


def spearman(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and p-value; NaN when a side is constant or n < 3."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.spearmanr(a, b)
    return float(res.statistic), float(res.pvalue)


# ============================================================================ FROC


def _sweep(cases: Sequence[PatientEval], cand: Sequence[tuple[np.ndarray, np.ndarray]],
           match_mm: float) -> tuple[list[float], list[float], list[float]]:
    """Operating points (thresholds, FP per patient, sensitivity) of one family of
    detections per patient, thresholded at each of their scores and re-matched."""
    n_pat = len(cases)
    total_ref = sum(len(c.ref_ids) for c in cases)
    pre = [(_candidate_pairs(com, c.ref_com, match_mm), s) for (com, s), c in zip(cand, cases)]
    all_scores = np.concatenate([s for _, s in cand]) if cases else np.zeros(0)
    thr = np.unique(all_scores)[::-1]
    if len(thr) > _MAX_THRESHOLDS:
        thr = np.unique(np.quantile(all_scores, np.linspace(0, 1, _MAX_THRESHOLDS)))[::-1]
    curve_t, curve_fp, curve_s = [], [], []
    for t in thr:
        tp = fp = 0
        for (pi, ri, _), s in pre:
            keep = s >= t
            m = len(_greedy(pi, ri, keep))
            tp += m
            fp += int(keep.sum()) - m
        curve_t.append(float(t))
        curve_fp.append(fp / max(n_pat, 1))
        curve_s.append(tp / total_ref if total_ref else float("nan"))
    return curve_t, curve_fp, curve_s


def froc(cases: Sequence[PatientEval], fp_rates: Sequence[float] = FROC_FP_RATES,
         match_mm: float = 5.0) -> dict[str, Any]:
    """FROC over patients (module docstring): the curve and sensitivity at ``fp_rates``.

    With candidates (``froc_com``), the predicted lesions are swept too and both
    families' operating points form the curve: candidates merged from weaker slice
    instances can join neighbouring bleeds or move a centre, so at high thresholds the
    lesions (merged at the operating threshold) are the detector's actual output, and the
    curve then passes through the operating point itself. ``curve["source"]`` names each
    point's family.
    """
    n_pat = len(cases)
    total_ref = sum(len(c.ref_ids) for c in cases)
    lesions = [(c.pred_com, c.pred_scores) for c in cases]
    cand = [lesions[i] if c.froc_com is None else (c.froc_com, c.froc_scores)
            for i, c in enumerate(cases)]
    curve_t, curve_fp, curve_s = [float("inf")], [0.0], [0.0]
    source = ["none"]
    has_cand = any(c.froc_from_candidates for c in cases)
    families = [("candidates", cand), ("lesions", lesions)] if has_cand else [("lesions", cand)]
    for name, family in families:
        t, f, sv = _sweep(cases, family, match_mm)
        curve_t += t
        curve_fp += f
        curve_s += sv
        source += [name] * len(t)
    fps, sens = np.array(curve_fp), np.array(curve_s)
    at, thr_at = [], []
    for r in fp_rates:
        ok = np.nonzero(fps <= r + 1e-12)[0]
        if total_ref == 0 or not len(ok):
            at.append(float("nan"))
            thr_at.append(float("nan"))
            continue
        best = ok[np.argmax(sens[ok])]
        at.append(float(sens[best]))
        thr_at.append(curve_t[best])
    return {
        "fp_rates": [float(r) for r in fp_rates],
        "sensitivity": at,
        "thresholds": thr_at,
        "mean_sensitivity": float(np.mean(at)) if total_ref else float("nan"),
        "n_reference_lesions": int(total_ref),
        "n_patients": int(n_pat),
        "curve": {"threshold": curve_t, "fp_per_patient": curve_fp, "sensitivity": curve_s,
                  "source": source},
    }


#: Reference-size bins (equivalent-sphere diameter, mm) of :func:`by_reference_size`.
SIZE_BINS_MM = (0.0, 3.0, 5.0, 7.0, float("inf"))


def by_reference_size(cases: Sequence[PatientEval],
                      edges_mm: Sequence[float] = SIZE_BINS_MM) -> list[dict[str, Any]]:
    """Detection and segmentation by reference lesion size: one row per bin of the
    reference lesion's equivalent-sphere diameter with ``n_ref``, ``sensitivity``
    (VALDO TP / references), ``lesion_dice`` (mean over the matched) and
    ``volume_ratio`` (median predicted / reference volume of the matched; < 1 means
    under-segmentation). A detector that misjudges the bleeds' extent at a new scanner
    shows it here first."""
    edges = np.asarray(edges_mm, float)
    if len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"edges_mm must increase, got {list(edges_mm)}")
    diam, hit, dice, ratio = [], [], [], []
    for c in cases:
        if c.ref_volume_mm3 is None or c.pred_volume_mm3 is None:
            raise LesionEvalError(f"{c.patient_id}: lesion volumes were not recorded")
        rvol = dict(zip(c.ref_ids.tolist(), c.ref_volume_mm3.tolist()))
        pvol = dict(zip(c.pred_ids.tolist(), c.pred_volume_mm3.tolist()))
        matched = {int(m[1]): m for m in c.matches}
        for rid in c.ref_ids.tolist():
            diam.append((6.0 * rvol[rid] / np.pi) ** (1.0 / 3.0))
            m = matched.get(int(rid))
            hit.append(m is not None)
            dice.append(m[3] if m else np.nan)
            ratio.append(pvol[int(m[0])] / rvol[rid] if m else np.nan)
    diam_a, hit_a = np.asarray(diam, float), np.asarray(hit, bool)
    dice_a, ratio_a = np.asarray(dice, float), np.asarray(ratio, float)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (diam_a >= lo) & (diam_a < hi)
        n = int(sel.sum())
        got = sel & hit_a
        label = f">= {lo:g} mm" if np.isinf(hi) else f"{lo:g}-{hi:g} mm"
        rows.append({
            "diameter_mm": label, "n_ref": n,
            "sensitivity": float(hit_a[sel].mean()) if n else float("nan"),
            "lesion_dice": float(dice_a[got].mean()) if got.any() else float("nan"),
            "volume_ratio": float(np.median(ratio_a[got])) if got.any() else float("nan"),
        })
    return rows


# ============================================================================ cohort


@dataclass
class CohortEval:
    """Cohort result: ``per_patient`` table, ``metrics`` (the metrics.json content),
    ``matches`` (one row per predicted and per unmatched reference lesion)."""

    per_patient: pd.DataFrame
    metrics: dict[str, Any]
    matches: pd.DataFrame
    cases: list[PatientEval]


def _summary(values: pd.Series) -> dict[str, float]:
    v = values.dropna().astype(float)
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "median": float(v.median()) if len(v) else float("nan"), "n": int(len(v))}


def evaluate_cohort(cases: Iterable[PatientEval], *, match_mm: float = 5.0,
                    score_thresh: float | None = None) -> CohortEval:
    """Summaries over patients (mean ± SD, median), pooled counts, count agreement, FROC."""
    cases = list(cases)
    rows = [{"patient_id": c.patient_id, **c.metrics} for c in cases]
    pp = pd.DataFrame(rows, columns=["patient_id", *cases[0].metrics] if cases else None)
    tp, fp, fn = (int(pp[k].sum()) if len(pp) else 0 for k in ("tp", "fp", "fn"))
    n = len(cases)
    counts = pp[["n_pred", "n_ref"]].to_numpy(float) if n else np.zeros((0, 2))
    rho, p = spearman(counts[:, 0], counts[:, 1]) if n else (float("nan"), float("nan"))
    fr = froc(cases, match_mm=match_mm)
    metrics: dict[str, Any] = {
        "n_patients": n,
        "n_patients_with_reference_lesions": int((pp["n_ref"] > 0).sum()) if n else 0,
        "match_distance_mm": match_mm,
        "score_thresh": score_thresh,
        "per_patient": {k: _summary(pp[k]) for k in PATIENT_METRICS if n},
        "pooled": {
            "tp": tp, "fp": fp, "fn": fn,
            "n_ref": int(pp["n_ref"].sum()) if n else 0,
            "n_pred": int(pp["n_pred"].sum()) if n else 0,
            "sensitivity": _ratio(tp, tp + fn),
            "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "fp_per_patient": _ratio(fp, n),
        },
        "count_agreement": {
            "icc_2_1": icc(counts, "2,1") if n else float("nan"),
            "icc_3_1": icc(counts, "3,1") if n else float("nan"),
            "spearman_rho": rho, "spearman_p": p,
        },
        "froc": fr,
        "by_reference_size": by_reference_size(cases),
        "study_reference": {"external_test_mean_sd": STUDY_REFERENCE},
        "conventions": {
            "dice_iou": "voxel-wise per patient; empty/empty = 1; mean and SD (ddof=1) "
                        "over patients",
            "recall": "fraction of reference lesions overlapped by >= 1 predicted voxel; "
                      "patients without reference lesions left out",
            "matching": f"VALDO: centre of mass within {match_mm:g} mm (world), greedy "
                        "nearest-first, one-to-one",
            "f1": "2TP/(2TP+FP+FN) per case; 1 when no reference and no prediction",
            "icc": "ICC(2,1) absolute agreement of lesion counts (ICC(3,1) beside it)",
            "froc": ("re-matched at each score threshold over all candidates (candidates.csv, "
                     "or the lesions before score_thresh); best sensitivity at <= k FP/patient"),
            "reference_instances": "mask ids if several, else 26-connected components",
            "by_reference_size": "bins of the reference equivalent-sphere diameter; "
                                 "sensitivity = VALDO TP / references, lesion Dice and "
                                 "median predicted/reference volume over the matched",
        },
    }
    mrows = []
    for c in cases:
        matched_p = {m[0]: m for m in c.matches}
        matched_r = {m[1] for m in c.matches}
        # volumes are present: by_reference_size above raised otherwise
        rvol = dict(zip(c.ref_ids.tolist(), c.ref_volume_mm3.tolist()))
        for pid, s, com, pv in zip(c.pred_ids, c.pred_scores, c.pred_com,
                                   c.pred_volume_mm3.tolist()):
            m = matched_p.get(int(pid))
            mrows.append({"patient_id": c.patient_id, "pred_id": int(pid),
                          "ref_id": m[1] if m else 0, "status": "TP" if m else "FP",
                          "score": float(s), "distance_mm": m[2] if m else np.nan,
                          "lesion_dice": m[3] if m else np.nan,
                          "pred_volume_mm3": pv,
                          "ref_volume_mm3": rvol[int(m[1])] if m else np.nan,
                          "x_mm": com[0], "y_mm": com[1], "z_mm": com[2]})
        for rid, com in zip(c.ref_ids, c.ref_com):
            if int(rid) not in matched_r:
                mrows.append({"patient_id": c.patient_id, "pred_id": 0, "ref_id": int(rid),
                              "status": "FN", "score": np.nan, "distance_mm": np.nan,
                              "lesion_dice": np.nan, "pred_volume_mm3": np.nan,
                              "ref_volume_mm3": rvol[int(rid)],
                              "x_mm": com[0], "y_mm": com[1], "z_mm": com[2]})
    matches = pd.DataFrame(mrows, columns=["patient_id", "pred_id", "ref_id", "status", "score",
                                           "distance_mm", "lesion_dice", "pred_volume_mm3",
                                           "ref_volume_mm3", "x_mm", "y_mm", "z_mm"])
    return CohortEval(per_patient=pp, metrics=metrics, matches=matches, cases=cases)


# ============================================================================ outputs


def plot_froc(fr: Mapping[str, Any], path: str | Path, title: str = "FROC") -> None:
    """FROC curve (sensitivity vs FP per patient, log2 axis) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fps = np.array(fr["curve"]["fp_per_patient"], float)
    sens = np.array(fr["curve"]["sensitivity"], float)
    rates = np.array(fr["fp_rates"], float)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    lo = rates.min() / 2
    order = np.argsort(fps, kind="stable")
    best = np.maximum.accumulate(np.nan_to_num(sens[order]))
    xs = np.append(np.maximum(fps[order], lo), max(rates.max() * 1.5, fps.max()))
    ax.step(xs, np.append(best, best[-1]), where="post", color="C0", label="FROC")
    ax.plot(rates, fr["sensitivity"], "o", color="C1", label="at 1/8 ... 8 FP")
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, rates.max() * 1.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per patient")
    ax.set_ylabel("lesion sensitivity")
    ms = fr.get("mean_sensitivity")
    ax.set_title(f"{title} (mean sens. {ms:.3f})" if ms is not None and np.isfinite(ms)
                 else title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        with atomic_output(path, ".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def write_report(result: CohortEval, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_patient.csv``, ``lesion_matches.csv`` and
    ``froc.png`` into ``out_dir`` (each atomically); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "per_patient": out / "per_patient.csv",
             "matches": out / "lesion_matches.csv", "froc": out / "froc.png"}
    write_text_atomic(paths["per_patient"], result.per_patient.to_csv(index=False))
    write_text_atomic(paths["matches"], result.matches.to_csv(index=False))
    plot_froc(result.metrics["froc"], paths["froc"])
    write_json_atomic(paths["metrics"], result.metrics)
    return paths


# ============================================================================ prediction folders


def _resolve(p: str, base: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


def _read_scores(csv_path: Path) -> dict[int, float]:
    df = pd.read_csv(csv_path)
    need = {"lesion_id", "max_score"}
    if not need.issubset(df.columns):
        raise LesionEvalError(f"{csv_path}: needs columns {sorted(need)}, has {list(df.columns)}")
    return {int(i): float(s) for i, s in zip(df["lesion_id"], df["max_score"])}


def _read_candidates(patient_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(centres mm, scores) from ``candidates.csv``, or None when the folder has none."""
    path = patient_dir / "candidates.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    need = {"x_mm", "y_mm", "z_mm", "max_score"}
    if not need.issubset(df.columns):
        raise LesionEvalError(f"{path}: needs columns {sorted(need)}, has {list(df.columns)}")
    com = df[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)
    scores = df["max_score"].to_numpy(np.float64)
    if not (np.isfinite(com).all() and np.isfinite(scores).all()):
        raise LesionEvalError(f"{path}: non-finite centre or score")
    return com, scores


def evaluate_prediction_dir(
    pred_dir: str | Path,
    manifest: str | Path,
    output: str | Path | None = None,
    *,
    match_mm: float = 5.0,
    score_thresh: float | None = None,
    affine_tol: float = 1e-3,
) -> CohortEval:
    """Evaluate ``<pred_dir>/<patient_id>/{cmb_pred.nii.gz,lesions.csv}`` against the
    manifest's ``cmb_mask`` (paths relative to the manifest's folder); patients without a
    ``cmb_mask`` are skipped. Missing files and grid mismatches raise
    :class:`LesionEvalError` naming the files. Writes the report when ``output`` is set.
    """
    import nibabel as nib

    pred_dir, manifest = Path(pred_dir), Path(manifest)
    if not manifest.is_file():
        raise LesionEvalError(f"manifest not found: {manifest}")
    if not pred_dir.is_dir():
        raise LesionEvalError(f"prediction folder not found: {pred_dir}")
    man = pd.read_csv(manifest, dtype={"patient_id": str}, keep_default_na=False)
    for col in ("patient_id", "cmb_mask"):
        if col not in man.columns:
            raise LesionEvalError(f"{manifest}: no {col!r} column")
    todo, problems = [], []
    for row in man.itertuples(index=False):
        pid, ref = str(row.patient_id), str(row.cmb_mask).strip()
        if not ref:
            logger.warning("%s: no cmb_mask in %s; skipped", pid, manifest)
            continue
        files = (pred_dir / pid / "cmb_pred.nii.gz", pred_dir / pid / "lesions.csv",
                 _resolve(ref, manifest.parent))
        problems += [f"{pid}: missing {f}" for f in files if not f.is_file()]
        todo.append((pid, *files))
    if problems:
        raise LesionEvalError("missing files:\n  " + "\n  ".join(problems))
    if not todo:
        raise LesionEvalError(f"{manifest}: no patient with a cmb_mask to evaluate")
    evals = []
    for n, (pid, pred_path, csv_path, ref_path) in enumerate(todo, 1):
        pimg, rimg = nib.load(str(pred_path)), nib.load(str(ref_path))
        if pimg.shape[:3] != rimg.shape[:3] or not np.allclose(pimg.affine, rimg.affine,
                                                                atol=affine_tol):
            raise LesionEvalError(
                f"{pid}: grid mismatch between {pred_path} (shape {pimg.shape}, affine\n"
                f"{np.round(pimg.affine, 4)}) and {ref_path} (shape {rimg.shape}, affine\n"
                f"{np.round(rimg.affine, 4)})")
        pred = np.asarray(pimg.dataobj).reshape(pimg.shape[:3])
        ref = np.asarray(rimg.dataobj).reshape(rimg.shape[:3])
        evals.append(evaluate_patient(pred, ref, rimg.affine, _read_scores(csv_path),
                                      patient_id=pid, match_mm=match_mm,
                                      score_thresh=score_thresh,
                                      candidates=_read_candidates(csv_path.parent)))
        logger.info("[%d/%d] %s: %s", n, len(todo), pid,
                    {k: round(float(evals[-1].metrics[k]), 3)
                     for k in ("dice", "f1", "tp", "fp", "fn")})
    result = evaluate_cohort(evals, match_mm=match_mm, score_thresh=score_thresh)
    if output is not None:
        write_report(result, output)
    return result


def headline_figures(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The figures the benchmarks quote, from an evaluation's ``metrics.json`` content:
    per-patient means (recall, Dice, IoU), pooled FP per patient and precision, FROC
    sensitivity at 0.5 / 1 / 2 FP per patient and its mean, and the counts."""
    pp, fr = metrics["per_patient"], metrics["froc"]
    at = dict(zip(fr["fp_rates"], fr["sensitivity"]))
    return {
        "recall_mean": pp["recall"]["mean"], "dice_mean": pp["dice"]["mean"],
        "iou_mean": pp["iou"]["mean"], "fp_per_patient": metrics["pooled"]["fp_per_patient"],
        "precision_pooled": metrics["pooled"]["precision"],
        "sensitivity_at_0.5fp": at.get(0.5), "sensitivity_at_1fp": at.get(1.0),
        "sensitivity_at_2fp": at.get(2.0), "froc_mean": fr["mean_sensitivity"],
        "n_reference_lesions": fr["n_reference_lesions"], "n_patients": fr["n_patients"],
    }
