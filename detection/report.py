"""The demo's report: ``report.md`` with figures and one ``metrics.json`` for a whole run.

:func:`build_report` reads the stage outputs of a run folder (:class:`RunLayout`, the
layout ``tools/run_pipeline.py`` writes) and writes

- ``figures/``: slice overlays of detected CMBs (red) against the reference (green) for a
  few external patients (:func:`detection.inference.save_overlay`), the FROC of the
  external and development centres, ROC and confusion matrices of the MIL model and of
  the rule-based baseline (copied from the MIL stage), glass-brain plots of CMB locations
  per class (:func:`plot_glass_brain`);
- ``report.md``: detection and classification tables beside the target study's figures
  (``../shared/REFERENCES.md``) and the rule-based baseline, the acceptance bars of the
  detection and MIL issues, stage timings, and notes on what the numbers mean;
- ``metrics.json``: every figure of the report (and the per-stage metrics they come from).

Glass brain: a lesion centre (world mm) is normalised by the bounding box of its
patient's brain mask (``(c - box_centre) / box_half_size`` per RAS axis, -1..1 inside
the box) and placed at the same relative position in the bounding box of the MNI
ICBM152 2009a brain that ships inside the ``nilearn`` wheel (read with nibabel: no
fetcher, no download; an ellipse outline is drawn when the file is absent). Projections
are sagittal (A-P vs S-I), coronal (L-R vs S-I) and axial (L-R vs A-P), "glass" = all
lesions of a class at once. No registration: head tilt and brain shape differences
are ignored, so positions are approximate (a few mm to a cm).

May import :mod:`mil` (never the other way round) and matplotlib (Agg backend).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .fileio import atomic_output, copy_atomic, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "ACCEPTANCE",
    "CLASSES",
    "REGION_COLORS",
    "STUDY_CLASSIFICATION",
    "STUDY_DETECTION",
    "RunLayout",
    "acceptance_checks",
    "brain_box",
    "build_report",
    "classification_summary",
    "coco_ap",
    "detection_summary",
    "mni_template_path",
    "normalised_positions",
    "plot_froc_curves",
    "size_table_rows",
    "plot_glass_brain",
    "update_stage_timings",
    "write_json_atomic",
    "write_text_atomic",
]

CLASSES: tuple[str, ...] = ("aSVD", "CAA", "CADASIL")

#: The study's external-test detection figures (mean, SD over patients).
STUDY_DETECTION: dict[str, tuple[float, float]] = {
    "iou": (0.523, 0.319), "dice": (0.627, 0.296), "recall": (0.706, 0.365),
}
#: The study's external-test classification figures (value, (95% CI)); weighted = by support.
STUDY_CLASSIFICATION: dict[str, tuple[float, tuple[float, float]]] = {
    "auc_weighted": (0.908, (0.895, 0.921)),
    "accuracy": (0.819, (0.768, 0.870)),
    "precision_weighted": (0.864, (0.831, 0.897)),
    "f1_weighted": (0.829, (0.782, 0.876)),
}
#: Acceptance bars on the external centre (issues 5, 6 and 7).
ACCEPTANCE: dict[str, float] = {
    "segm_ap50": 0.5,            # issue 5: COCO segm AP50 of the CPU config
    "sensitivity_at_1fp": 0.85,  # issue 6: lesion recall at <= 1 FP per patient
    "dice_mean": 0.65,           # issue 6: mean Dice over patients
    "auc_weighted": 0.90,        # issue 7: weighted one-vs-rest AUC
    "accuracy": 0.82,            # issue 7: accuracy
}
REGION_COLORS: dict[str, str] = {
    "lobar": "tab:blue", "deep": "tab:orange", "infratentorial": "tab:green",
}
_METRIC_LABELS = {
    "auc_weighted": "weighted AUC (one-vs-rest)", "accuracy": "accuracy",
    "precision_weighted": "weighted precision", "recall_weighted": "weighted recall",
    "f1_weighted": "weighted F1",
}
_TIMINGS_START = "<!-- stage-timings:start -->"
_TIMINGS_END = "<!-- stage-timings:end -->"
_MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


# ============================================================================ layout


class RunLayout:
    """Where each stage of a pipeline run writes (``tools/run_pipeline.py``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    cohort = property(lambda self: self.root / "cohort")
    manifest = property(lambda self: self.root / "cohort" / "manifest.csv")
    coco = property(lambda self: self.root / "coco")
    train = property(lambda self: self.root / "train")
    config = property(lambda self: self.root / "train" / "config.yaml")
    weights = property(lambda self: self.root / "train" / "model_final.pth")
    predict = property(lambda self: self.root / "predict")
    lesions = property(lambda self: self.root / "lesions")
    bags = property(lambda self: self.root / "bags")
    bag_index = property(lambda self: self.root / "bags" / "index.csv")
    mil = property(lambda self: self.root / "mil")
    mil_model = property(lambda self: self.root / "mil" / "model")
    figures = property(lambda self: self.root / "figures")
    report = property(lambda self: self.root / "report.md")
    metrics = property(lambda self: self.root / "metrics.json")
    state = property(lambda self: self.root / ".pipeline")
    log = property(lambda self: self.root / "pipeline.log")

    def lesion_split(self, split: str) -> Path:
        """Lesion-metrics folder of a split (``external`` or ``development``)."""
        return self.root / "lesions" / split


# ============================================================================ atomic I/O


def _save_fig(fig: Any, path: Path, dpi: int = 110) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path, ".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ============================================================================ summaries


def _num(x: Any) -> float:
    """float, NaN for None / missing."""
    try:
        return float(x) if x is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def detection_summary(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The headline figures of a lesion-metrics ``metrics.json``
    (:mod:`detection.evaluation.lesions`)."""
    if not metrics:
        return None
    pp = metrics.get("per_patient", {})
    pooled = metrics.get("pooled", {})
    ca = metrics.get("count_agreement", {})
    fr = metrics.get("froc", {})
    rates = list(fr.get("fp_rates", []))
    sens = list(fr.get("sensitivity", []))
    at = dict(zip([float(r) for r in rates], sens))

    def ms(key: str) -> dict[str, float]:
        d = pp.get(key, {})
        return {"mean": _num(d.get("mean")), "sd": _num(d.get("sd")),
                "median": _num(d.get("median")), "n": int(d.get("n", 0) or 0)}

    return {
        "n_patients": int(metrics.get("n_patients", 0)),
        "n_reference_lesions": int(pooled.get("n_ref", 0)),
        "n_predicted_lesions": int(pooled.get("n_pred", 0)),
        "iou": ms("iou"), "dice": ms("dice"), "recall": ms("recall"),
        "valdo_f1": ms("f1"), "lesion_dice": ms("lesion_dice"),
        "sensitivity_pooled": _num(pooled.get("sensitivity")),
        "precision_pooled": _num(pooled.get("precision")),
        "f1_pooled": _num(pooled.get("f1")),
        "fp_per_patient": _num(pooled.get("fp_per_patient")),
        "count_icc_2_1": _num(ca.get("icc_2_1")),
        "count_spearman_rho": _num(ca.get("spearman_rho")),
        "froc": {"fp_rates": rates, "sensitivity": sens,
                 "mean_sensitivity": _num(fr.get("mean_sensitivity"))},
        "sensitivity_at_1fp": _num(at.get(1.0)),
        "by_reference_size": [dict(r) for r in metrics.get("by_reference_size", [])],
    }


def size_table_rows(*metrics: Mapping[str, Any] | None) -> list[tuple[str, ...]]:
    """Rows of the by-size table from lesion-metrics ``metrics.json`` contents (their
    ``by_reference_size``), one column per metrics; empty when none has one."""
    tables = [(m or {}).get("by_reference_size") or [] for m in metrics]
    labels = next((([r["diameter_mm"] for r in t]) for t in tables if t), [])
    rows = []
    for n, label in enumerate(labels):
        cells = []
        for t in tables:
            r = t[n] if n < len(t) and t[n]["diameter_mm"] == label else None
            cells.append("n/a" if r is None else
                         f"{r['n_ref']}: {_f(r['sensitivity'])} / {_f(r['lesion_dice'])} / "
                         f"{_f(r['volume_ratio'], 2)}")
        rows.append((label, *cells))
    return rows


def coco_ap(train_dir: str | os.PathLike) -> dict[str, float] | None:
    """Last COCO evaluation Detectron2 logged in ``<train_dir>/metrics.json`` (one JSON
    object per line): bbox/segm AP and AP50 as fractions (Detectron2 logs percent), of
    the slice instances with overlapping ones fused, and ``*_raw`` of the instances as
    the model gives them when that run logged them too (``CMB.EVAL_FUSE_OVERLAPS``)."""
    path = Path(train_dir) / "metrics.json"
    if not path.is_file():
        return None
    last: dict[str, Any] | None = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "segm/AP50" in rec:
            last = rec
    if last is None:
        return None
    out = {"iteration": int(last.get("iteration", -1))}
    for suffix in ("", "_raw"):
        if suffix and f"segm{suffix}/AP50" not in last:
            continue
        for task in ("bbox", "segm"):
            for k in ("AP", "AP50", "AP75"):
                v = _num(last.get(f"{task}{suffix}/{k}"))
                out[f"{task}_{k.lower()}{suffix}"] = v / 100.0 if math.isfinite(v) else v
    return out


def classification_summary(mil_metrics: Mapping[str, Any] | None, split: str
                           ) -> dict[str, Any] | None:
    """``{"model": {...}, "baseline": {...}}`` of a MIL ``metrics.json`` split (``cv`` or
    ``external``): value and 95% CI per metric, support, confusion matrix."""
    if not mil_metrics or not mil_metrics.get(split):
        return None
    out: dict[str, Any] = {}
    for who in ("model", "baseline"):
        rep = mil_metrics[split].get(who)
        if not rep or not rep.get("n"):
            out[who] = None
            continue
        ci = rep.get("ci95", {})
        out[who] = {
            "n": int(rep["n"]), "support": rep.get("support", {}),
            **{m: {"value": _num(rep.get(m)),
                   "ci95": [_num(v) for v in (ci.get(m) or [None, None])]}
               for m in _METRIC_LABELS},
            "auc_per_class": rep.get("auc_per_class", {}),
            "confusion_matrix": rep.get("confusion_matrix"),
        }
    return out


def _ge(value: float, bar: float) -> bool | None:
    return None if not math.isfinite(value) else bool(value >= bar)


def acceptance_checks(det_ext: Mapping[str, Any] | None, cls_ext: Mapping[str, Any] | None,
                      coco: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The external-centre bars of issues 5-7: one row per check with ``passed``
    (True / False / None when the figure is missing)."""
    rows: list[dict[str, Any]] = []
    seg = _num((coco or {}).get("segm_ap50"))
    rows.append({"issue": 5, "check": "COCO segm AP50 (external slices, overlaps fused)",
                 "bar": ">= 0.50",
                 "value": seg, "passed": _ge(seg, ACCEPTANCE["segm_ap50"])})
    s1 = _num((det_ext or {}).get("sensitivity_at_1fp"))
    rows.append({"issue": 6, "check": "lesion sensitivity at <= 1 FP/patient (FROC)",
                 "bar": ">= 0.85", "value": s1,
                 "passed": _ge(s1, ACCEPTANCE["sensitivity_at_1fp"])})
    d = _num(((det_ext or {}).get("dice") or {}).get("mean"))
    rows.append({"issue": 6, "check": "mean Dice over patients", "bar": ">= 0.65",
                 "value": d, "passed": _ge(d, ACCEPTANCE["dice_mean"])})
    model = (cls_ext or {}).get("model") or {}
    base = (cls_ext or {}).get("baseline") or {}
    auc = _num((model.get("auc_weighted") or {}).get("value"))
    acc = _num((model.get("accuracy") or {}).get("value"))
    rows.append({"issue": 7, "check": "MIL weighted AUC", "bar": ">= 0.90", "value": auc,
                 "passed": _ge(auc, ACCEPTANCE["auc_weighted"])})
    rows.append({"issue": 7, "check": "MIL accuracy", "bar": ">= 0.82", "value": acc,
                 "passed": _ge(acc, ACCEPTANCE["accuracy"])})
    b_auc = _num((base.get("auc_weighted") or {}).get("value"))
    b_acc = _num((base.get("accuracy") or {}).get("value"))
    better: bool | None = None
    if all(math.isfinite(v) for v in (auc, acc, b_auc, b_acc)):
        better = bool(auc > b_auc and acc >= b_acc)
    rows.append({"issue": 7, "check": "MIL better than the rule-based baseline",
                 "bar": "higher AUC, accuracy not lower",
                 "value": f"AUC {_f(auc)} vs {_f(b_auc)}, accuracy {_f(acc)} vs {_f(b_acc)}",
                 "passed": better})
    return rows


# ============================================================================ figures


def mni_template_path() -> Path | None:
    """The MNI ICBM152 2009a T1 template inside the installed ``nilearn`` wheel (found
    without importing nilearn), or None."""
    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "datasets" / "data" / _MNI_T1
        if p.is_file():
            return p
    return None


@dataclass
class _Background:
    """Projection images of a template brain and its world bounding box (RAS mm)."""

    lo: np.ndarray  # [3] box minimum
    hi: np.ndarray  # [3] box maximum
    mips: dict[str, tuple[np.ndarray, tuple[float, float, float, float]]] | None


@functools.lru_cache(maxsize=1)
def _background() -> _Background:
    path = mni_template_path()
    if path is None:
        logger.info("MNI template not found (nilearn wheel); glass brain on an ellipse outline")
        return _Background(np.array([-70.0, -104.0, -72.0]), np.array([70.0, 70.0, 80.0]), None)
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    brain = data > 0
    aff = img.affine
    idx = np.argwhere(brain)
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    lo, hi = world.min(0), world.max(0)
    # World extent of each axis (RAS canonical: diagonal affine up to sign -> positive).
    ax_lo = aff[:3, 3]
    ax_hi = aff[:3, 3] + aff[:3, :3].diagonal() * (np.array(data.shape) - 1)
    mips = {}
    for name, axis, (a, b) in (("sagittal", 0, (1, 2)), ("coronal", 1, (0, 2)),
                               ("axial", 2, (0, 1))):
        mip = data.max(axis=axis).T  # rows = second axis
        extent = (float(ax_lo[a]), float(ax_hi[a]), float(ax_lo[b]), float(ax_hi[b]))
        mips[name] = (mip, extent)
    return _Background(lo, hi, mips)


_VIEWS = (("sagittal", 1, 2, "posterior <- y (mm) -> anterior", "z (mm)"),
          ("coronal", 0, 2, "left <- x (mm) -> right", "z (mm)"),
          ("axial", 0, 1, "left <- x (mm) -> right", "y (mm)"))


def brain_box(brain_mask: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) bounding box ``(lo, hi)`` of the voxel centres of a brain mask."""
    import nibabel as nib

    img = nib.load(str(brain_mask))
    m = np.asarray(img.dataobj) > 0
    if m.ndim != 3 or not m.any():
        raise ValueError(f"brain mask {brain_mask} is empty or not 3D")
    # World coordinates are linear in the voxel index, so along each voxel row their
    # extremes lie at the row's first or last mask voxel: only those are transformed.
    rows = m.any(0)
    first = m.argmax(0)
    last = m.shape[0] - 1 - m[::-1].argmax(0)
    jj, kk = np.nonzero(rows)
    pts = np.concatenate([np.stack([first[jj, kk], jj, kk], 1),
                          np.stack([last[jj, kk], jj, kk], 1)]).astype(np.float64)
    world = pts @ img.affine[:3, :3].T + img.affine[:3, 3]
    return world.min(0), world.max(0)


def normalised_positions(lesions: pd.DataFrame, boxes: Mapping[str, tuple[np.ndarray, np.ndarray]]
                         ) -> pd.DataFrame:
    """``lesions`` (``patient_id, x_mm, y_mm, z_mm``) plus ``pos_lr, pos_ap, pos_si``:
    the centre relative to its patient's brain box, -1..1 inside (rows of patients
    without a box are dropped)."""
    rows = lesions[lesions["patient_id"].astype(str).isin(boxes)].copy()
    if rows.empty:
        return rows.assign(pos_lr=[], pos_ap=[], pos_si=[])
    xyz = rows[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
    lo = np.stack([boxes[str(p)][0] for p in rows["patient_id"]])
    hi = np.stack([boxes[str(p)][1] for p in rows["patient_id"]])
    pos = (xyz - (lo + hi) / 2) / np.maximum((hi - lo) / 2, 1e-6)
    rows["pos_lr"], rows["pos_ap"], rows["pos_si"] = pos[:, 0], pos[:, 1], pos[:, 2]
    return rows


def plot_glass_brain(points: pd.DataFrame, path: str | os.PathLike, title: str = "",
                     classes: Sequence[str] = CLASSES,
                     patients_per_class: Mapping[str, int] | None = None) -> Path:
    """Glass-brain plot: one row per class, sagittal / coronal / axial projections of the
    lesion centres (``label``, ``region``, ``pos_lr/ap/si`` columns), coloured by region,
    on the MNI template (module docstring)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Ellipse

    bg = _background()
    centre, half = (bg.lo + bg.hi) / 2, (bg.hi - bg.lo) / 2
    fig, axes = plt.subplots(len(classes), 3, figsize=(11, 3.4 * len(classes)), squeeze=False)
    for r, cls in enumerate(classes):
        sub = points[points["label"] == cls] if len(points) else points
        mm = (sub[["pos_lr", "pos_ap", "pos_si"]].to_numpy(float) * half + centre
              if len(sub) else np.zeros((0, 3)))
        regions = sub["region"].astype(str).to_numpy() if len(sub) else np.array([])
        for c, (view, a, b, xlab, ylab) in enumerate(_VIEWS):
            ax = axes[r, c]
            if bg.mips is not None:
                mip, extent = bg.mips[view]
                ax.imshow(mip, cmap="gray_r", origin="lower", extent=extent, alpha=0.35,
                          interpolation="bilinear")
                ax.contour(mip > 0, levels=[0.5], colors="0.3", linewidths=0.8,
                           extent=extent, origin="lower")
            else:
                ax.add_patch(Ellipse((centre[a], centre[b]), 2 * half[a], 2 * half[b],
                                     fill=False, color="0.3"))
            for reg in (*REGION_COLORS, None):
                sel = (~np.isin(regions, list(REGION_COLORS)) if reg is None
                       else regions == reg)
                if sel.any():
                    ax.scatter(mm[sel, a], mm[sel, b], s=9, alpha=0.6, linewidths=0,
                               color=REGION_COLORS.get(reg, "0.5"))
            ax.set_xlim(bg.lo[a] - 8, bg.hi[a] + 8)
            ax.set_ylim(bg.lo[b] - 8, bg.hi[b] + 8)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
            if r == len(classes) - 1:
                ax.set_xlabel(xlab, fontsize=8)
            if c == 0:
                n_pat = (patients_per_class or {}).get(cls)
                who = f"{cls}\n{len(sub)} lesions" + (f", {n_pat} patients" if n_pat else "")
                ax.set_ylabel(f"{who}\n{ylab}", fontsize=8)
            if r == 0:
                ax.set_title(view, fontsize=9)
    handles = [Line2D([], [], marker="o", ls="", color=col, label=reg)
               for reg, col in REGION_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return _save_fig(fig, Path(path))


def plot_froc_curves(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Several FROC curves (``froc`` dicts of :mod:`detection.evaluation.lesions`) on one
    log2 axis, with the study's mean patient recall as a reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    rates = None
    for i, (name, fr) in enumerate(curves.items()):
        if not fr or "curve" not in fr:
            continue
        rates = np.array(fr["fp_rates"], float)
        fps = np.array(fr["curve"]["fp_per_patient"], float)
        sens = np.nan_to_num(np.array(fr["curve"]["sensitivity"], float))
        order = np.argsort(fps, kind="stable")
        best = np.maximum.accumulate(sens[order])
        lo = rates.min() / 2
        xs = np.append(np.maximum(fps[order], lo), max(rates.max() * 1.5, fps.max()))
        ax.step(xs, np.append(best, best[-1]), where="post", color=f"C{i}", label=name)
        ax.plot(rates, np.array(fr["sensitivity"], float), "o", color=f"C{i}", ms=4)
    if rates is not None:
        ax.set_xlim(rates.min() / 2, rates.max() * 1.5)
    ax.set_xscale("log", base=2)
    ax.axhline(STUDY_DETECTION["recall"][0], color="0.4", ls="--", lw=0.8,
               label="study: mean patient recall 0.706")
    ax.axhline(ACCEPTANCE["sensitivity_at_1fp"], color="C3", ls=":", lw=0.8,
               label="bar: 0.85 at <= 1 FP")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per patient")
    ax.set_ylabel("lesion sensitivity (VALDO 5 mm rule)")
    ax.set_title("FROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _save_fig(fig, Path(path))


def _overlays(layout: RunLayout, cohort: pd.DataFrame, patients: Sequence[str],
              fig_dir: Path) -> list[dict[str, Any]]:
    """Overlay montages (prediction red, reference green) for ``patients``."""
    from .data.volume import load_case, load_mask
    from .inference import save_overlay

    out = []
    rows = cohort.set_index(cohort["patient_id"].astype(str))
    for pid in patients:
        r = rows.loc[pid]
        pred_path = layout.predict / pid / "cmb_pred.nii.gz"
        try:
            case = load_case(r["swi"], r.get("cmb_mask") or None, r.get("brain_mask") or None)
            pred = load_mask(pred_path, case.swi, "prediction")
        except Exception as exc:  # a figure, not a result: log and go on
            logger.warning("overlay for %s skipped: %s", pid, exc)
            continue
        path = fig_dir / f"overlay_{pid}.png"
        n_ref = len(np.unique(case.lesions[case.lesions > 0])) if case.lesions is not None else 0
        n_pred = len(np.unique(pred[pred > 0]))
        title = (f"{pid} ({r['label']}): detected {n_pred} (red) / reference {n_ref} (green)")
        with atomic_output(path, ".png") as tmp:
            save_overlay(case.swi.data, pred, tmp, title=title, max_panels=8,
                         truth_ras=case.lesions)
        out.append({"patient_id": pid, "label": str(r["label"]), "n_pred": n_pred,
                    "n_ref": n_ref, "path": path})
    return out


def _pick_overlay_patients(cohort: pd.DataFrame, per_patient: pd.DataFrame | None,
                           centers: Sequence[str], n: int) -> list[str]:
    """Up to ``n`` external patients, one per class in turn, the one with the most
    reference lesions first (so the figure shows lesions)."""
    ext = cohort[cohort["center"].astype(str).isin(centers)].copy()
    if ext.empty or n <= 0:
        return []
    ext["patient_id"] = ext["patient_id"].astype(str)
    if per_patient is not None and "n_ref" in per_patient.columns:
        counts = per_patient.set_index(per_patient["patient_id"].astype(str))["n_ref"]
        ext["n_ref"] = ext["patient_id"].map(counts).fillna(0)
    else:
        ext["n_ref"] = 0
    ext = ext.sort_values(["n_ref", "patient_id"], ascending=[False, True])
    queues = {c: list(ext.loc[ext["label"] == c, "patient_id"]) for c in CLASSES}
    queues[""] = list(ext.loc[~ext["label"].isin(CLASSES), "patient_id"])
    picked: list[str] = []
    while len(picked) < n and any(queues.values()):
        for c in (*CLASSES, ""):
            if queues[c] and len(picked) < n:
                picked.append(queues[c].pop(0))
    return picked


# ============================================================================ markdown


def _f(x: Any, nd: int = 3) -> str:
    v = _num(x)
    return "n/a" if not math.isfinite(v) else f"{v:.{nd}f}"


def _msd(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "n/a"
    m, s = _num(d.get("mean")), _num(d.get("sd"))
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.3f} ± {s:.3f}" if math.isfinite(s) else f"{m:.3f}"


def _ci(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "n/a"
    v = _f(d.get("value"))
    lo, hi = (d.get("ci95") or [None, None])[:2]
    if v == "n/a":
        return v
    if lo is None or hi is None or not (math.isfinite(_num(lo)) and math.isfinite(_num(hi))):
        return v
    return f"{v} ({_f(lo)}–{_f(hi)})"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _verdict(p: bool | None) -> str:
    return "n/a" if p is None else ("**pass**" if p else "**FAIL**")


def _timings_block(stages: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    total_run = total_built = 0.0
    for s in stages:
        sec = _num(s.get("seconds"))
        built = _num(s.get("built_seconds"))
        total_run += sec if math.isfinite(sec) else 0.0
        total_built += built if math.isfinite(built) else 0.0
        rows.append((s.get("stage", "?"), s.get("status", "?"),
                     f"{sec:.1f}" if math.isfinite(sec) else "-",
                     f"{built:.1f}" if math.isfinite(built) else "-", s.get("note", "") or ""))
    rows.append(("**total**", "", f"{total_run:.1f}", f"{total_built:.1f}", ""))
    body = _table(("stage", "status (this invocation)", "seconds (this invocation)",
                   "seconds (when built)", "note"), rows)
    return f"{_TIMINGS_START}\n{body}\n{_TIMINGS_END}"


def update_stage_timings(layout: RunLayout, stages: Sequence[Mapping[str, Any]]) -> None:
    """Replace the stage-timings table of ``report.md`` and ``metrics.json["stages"]``
    (the runner calls this after the last stage, whose time the report cannot know)."""
    if layout.report.is_file():
        text = layout.report.read_text()
        i, j = text.find(_TIMINGS_START), text.find(_TIMINGS_END)
        if i >= 0 and j > i:
            text = text[:i] + _timings_block(stages) + text[j + len(_TIMINGS_END):]
            write_text_atomic(layout.report, text)
    m = _read_json(layout.metrics)
    if m is not None:
        m["stages"] = list(stages)
        write_json_atomic(layout.metrics, m)


# ============================================================================ the report


def _rel(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(path, root).replace(os.sep, "/")
    except ValueError:
        return str(path)


def _cohort(layout: RunLayout) -> pd.DataFrame:
    from .data.manifest import read_cohort

    df = read_cohort(layout.manifest)
    df["patient_id"] = df["patient_id"].astype(str)
    return df


def _lesion_points(layout: RunLayout, cohort: pd.DataFrame, boxes: Mapping[str, Any]
                   ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Normalised lesion centres: detected (``lesions_all.csv`` / per-patient tables) and
    reference (the cohort's ``lesions_gt.csv`` when it exists)."""
    labels = cohort.set_index("patient_id")["label"].astype(str)
    all_csv = layout.predict / "lesions_all.csv"
    if all_csv.is_file():
        det = pd.read_csv(all_csv, dtype={"patient_id": str})
    else:
        tables = [pd.read_csv(p, dtype={"patient_id": str})
                  for p in sorted(layout.predict.glob("*/lesions.csv"))]
        tables = [t for t in tables if len(t)]
        det = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
            columns=["patient_id", "x_mm", "y_mm", "z_mm", "region"])
    det = normalised_positions(det, boxes)
    det["label"] = det["patient_id"].map(labels)
    gt = None
    gt_csv = layout.manifest.parent / "lesions_gt.csv"
    if gt_csv.is_file():
        gt = normalised_positions(pd.read_csv(gt_csv, dtype={"patient_id": str}), boxes)
        gt["label"] = gt["patient_id"].map(labels)
    return det, gt


def build_report(layout: RunLayout | str | os.PathLike, *,
                 run_info: Mapping[str, Any] | None = None,
                 stages: Sequence[Mapping[str, Any]] = (),
                 external_centers: Sequence[str] = ("C",), n_overlays: int = 3,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``figures/``, ``report.md`` and ``metrics.json`` of a run; return the metrics.

    Args:
        layout: the run folder (or its :class:`RunLayout`).
        run_info: parameters of the run (written into the report and metrics.json).
        stages: stage summaries so far (``stage, status, seconds, built_seconds, note``).
        external_centers: the held-out centre(s) (overlays and the headline tables).
        n_overlays: external patients shown as overlay montages.
        progress: optional callback given a short message per step.
    """
    layout = layout if isinstance(layout, RunLayout) else RunLayout(layout)
    say = progress or (lambda msg: logger.info("report: %s", msg))
    t0 = time.perf_counter()
    fig_dir = layout.figures
    fig_dir.mkdir(parents=True, exist_ok=True)
    cohort = _cohort(layout)
    ext_c = [str(c) for c in external_centers]
    n_ext = int(cohort["center"].astype(str).isin(ext_c).sum())

    # ---------------------------------------------------------------- metrics
    lm_ext = _read_json(layout.lesion_split("external") / "metrics.json")
    lm_dev = _read_json(layout.lesion_split("development") / "metrics.json")
    det_ext, det_dev = detection_summary(lm_ext), detection_summary(lm_dev)
    coco = coco_ap(layout.train)
    mil_m = _read_json(layout.mil / "metrics.json")
    cls_ext = classification_summary(mil_m, "external")
    cls_cv = classification_summary(mil_m, "cv")
    checks = acceptance_checks(det_ext, cls_ext, coco)
    bag_meta = _read_json(layout.bags / "bags_meta.json")
    bag_src = (mil_m or {}).get("bags", {}).get("bag_source")

    # ---------------------------------------------------------------- figures
    figures: dict[str, Any] = {}
    curves = {}
    if lm_ext:
        curves[f"external ({', '.join(ext_c)}; n={det_ext['n_patients']})"] = lm_ext["froc"]
    if lm_dev:
        curves[f"development, in-fold (n={det_dev['n_patients']})"] = lm_dev["froc"]
    if curves:
        say("FROC")
        figures["froc"] = plot_froc_curves(curves, fig_dir / "froc.png")
    for name in ("roc_external", "confusion_external", "roc_cv", "confusion_cv"):
        src = layout.mil / f"{name}.png"
        if src.is_file():
            figures[name] = copy_atomic(src, fig_dir / f"{name}.png")
    pp_path = layout.lesion_split("external") / "per_patient.csv"
    per_patient = pd.read_csv(pp_path, dtype={"patient_id": str}) if pp_path.is_file() else None
    say("overlays")
    picked = _pick_overlay_patients(cohort, per_patient, ext_c, n_overlays)
    overlays = _overlays(layout, cohort, picked, fig_dir)
    figures["overlays"] = [o["path"] for o in overlays]
    say("glass brain")
    boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for r in cohort.itertuples(index=False):
        bm = getattr(r, "brain_mask", "") or ""
        if bm:
            try:
                boxes[str(r.patient_id)] = brain_box(bm)
            except Exception as exc:
                logger.warning("%s: no brain box (%s); left out of the glass brain",
                               r.patient_id, exc)
    det_pts, gt_pts = _lesion_points(layout, cohort, boxes)
    n_per_class = cohort["label"].astype(str).value_counts().to_dict()
    figures["glass_brain_detected"] = plot_glass_brain(
        det_pts, fig_dir / "glass_brain_detected.png",
        "Detected CMBs by true class (all centres; normalised to each brain's box)",
        patients_per_class=n_per_class)
    if gt_pts is not None:
        figures["glass_brain_reference"] = plot_glass_brain(
            gt_pts, fig_dir / "glass_brain_reference.png",
            "Reference CMBs by class (synthetic ground truth)", patients_per_class=n_per_class)
    region_counts = {}
    for name, pts in (("detected", det_pts), ("reference", gt_pts)):
        if pts is not None and len(pts):
            tab = pd.crosstab(pts["label"], pts["region"])
            region_counts[name] = {str(k): {str(c): int(v) for c, v in row.items()}
                                   for k, row in tab.iterrows()}

    # ---------------------------------------------------------------- metrics.json
    metrics: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run": dict(run_info or {}),
        "cohort": {
            "n_patients": int(len(cohort)),
            "by_center": {str(k): int(v) for k, v in cohort["center"].value_counts().items()},
            "by_class": {str(k): int(v) for k, v in cohort["label"].value_counts().items()},
            "external_centers": ext_c, "n_external": n_ext,
        },
        "study_reference": {
            "detection_external_mean_sd": {k: list(v) for k, v in STUDY_DETECTION.items()},
            "classification_external": {k: {"value": v, "ci95": list(ci)}
                                        for k, (v, ci) in STUDY_CLASSIFICATION.items()},
        },
        "detection": {"external": det_ext, "development_in_fold": det_dev, "coco_ap": coco},
        "classification": {"external": cls_ext, "cv_development": cls_cv},
        "acceptance": checks,
        "bags": {"meta": bag_meta, "bag_source": bag_src},
        "lesion_regions_by_class": region_counts,
        "stages": list(stages),
        "figures": {k: ([_rel(p, layout.root) for p in v] if isinstance(v, list)
                        else _rel(v, layout.root)) for k, v in figures.items()},
        "sources": {
            "lesion_metrics_external": _rel(layout.lesion_split("external") / "metrics.json",
                                            layout.root),
            "lesion_metrics_development": _rel(layout.lesion_split("development")
                                               / "metrics.json", layout.root),
            "mil_metrics": _rel(layout.mil / "metrics.json", layout.root),
            "train_metrics": _rel(layout.train / "metrics.json", layout.root),
        },
    }
    write_json_atomic(layout.metrics, metrics)

    # ---------------------------------------------------------------- report.md
    say("report.md")
    md = _markdown(layout, metrics, det_ext, det_dev, coco, cls_ext, cls_cv, checks, overlays,
                   figures, mil_m, stages)
    write_text_atomic(layout.report, md)
    logger.info("report written to %s in %.1f s", layout.report, time.perf_counter() - t0)
    return metrics


def _markdown(layout: RunLayout, m: Mapping[str, Any], det_ext, det_dev, coco, cls_ext, cls_cv,
              checks, overlays, figures, mil_m, stages) -> str:
    root = layout.root
    run = m.get("run", {})
    coh = m["cohort"]
    ext_c = ", ".join(coh["external_centers"])
    out: list[str] = []
    add = out.append
    add("# cmb-csvd demo report\n")
    add(f"Generated {m['generated']}. Cohort: {coh['n_patients']} patients "
        f"(centres {', '.join(f'{k}: {v}' for k, v in sorted(coh['by_center'].items()))}; "
        f"classes {', '.join(f'{k}: {v}' for k, v in sorted(coh['by_class'].items()))}). "
        f"External (held-out) centre: **{ext_c}** ({coh['n_external']} patients), never used "
        "to train the detector or the MIL classifier.")
    if run:
        keys = ("patients_per_class", "seed", "config_file", "weights", "mil_config", "opts")
        add("\nRun parameters: " + "; ".join(f"`{k}` = `{run[k]}`" for k in keys
                                            if k in run and run[k] not in (None, "", [])) + ".")
    add("\n## Headline: external centre beside the study\n")
    rows = []
    for key, name in (("iou", "IoU (voxel-wise, per patient)"), ("dice", "Dice (per patient)"),
                      ("recall", "lesion recall (per patient)")):
        sm, ssd = STUDY_DETECTION[key]
        rows.append((name, _msd((det_ext or {}).get(key)), f"{sm:.3f} ± {ssd:.3f}"))
    add("Detection (mean ± SD over patients):\n")
    add(_table(("metric", f"ours, external {ext_c}", "study, external"), rows))
    add("")
    rows = []
    model = (cls_ext or {}).get("model") or {}
    base = (cls_ext or {}).get("baseline") or {}
    for key, label in _METRIC_LABELS.items():
        st = STUDY_CLASSIFICATION.get(key)
        st_s = f"{st[0]:.3f} ({st[1][0]:.3f}–{st[1][1]:.3f})" if st else "not reported"
        rows.append((label, _ci(model.get(key)), _ci(base.get(key)), st_s))
    add("CSVD classification (aSVD / CAA / CADASIL; value and 95% bootstrap CI over patients):\n")
    add(_table(("metric", "MIL (ours)", "rule-based baseline", "study"), rows))
    add("\nAcceptance bars (external centre):\n")
    add(_table(("issue", "check", "bar", "value", "result"),
               [(c["issue"], c["check"], c["bar"],
                 c["value"] if isinstance(c["value"], str) else _f(c["value"]),
                 _verdict(c["passed"])) for c in checks]))

    add("\n## Detection\n")
    rows = []
    spec = (("IoU", "iou", "msd"), ("Dice", "dice", "msd"), ("lesion recall", "recall", "msd"),
            ("VALDO F1 (per patient)", "valdo_f1", "msd"),
            ("lesion Dice (matched)", "lesion_dice", "msd"),
            ("sensitivity (pooled, VALDO 5 mm)", "sensitivity_pooled", "f"),
            ("precision (pooled)", "precision_pooled", "f"),
            ("FP per patient", "fp_per_patient", "f"),
            ("count ICC(2,1)", "count_icc_2_1", "f"),
            ("count Spearman rho", "count_spearman_rho", "f"),
            ("sensitivity at <= 1 FP/patient (FROC)", "sensitivity_at_1fp", "f"),
            ("FROC mean sensitivity (1/8 ... 8 FP)", None, "froc"),
            ("patients / reference / detected lesions", None, "n"))
    for label, key, kind in spec:
        cells = []
        for d in (det_ext, det_dev):
            if not d:
                cells.append("n/a")
            elif kind == "msd":
                cells.append(_msd(d.get(key)))
            elif kind == "froc":
                cells.append(_f(d["froc"]["mean_sensitivity"]))
            elif kind == "n":
                cells.append(f"{d['n_patients']} / {d['n_reference_lesions']} / "
                             f"{d['n_predicted_lesions']}")
            else:
                cells.append(_f(d.get(key)))
        st = ""
        if key in STUDY_DETECTION:
            st = f"{STUDY_DETECTION[key][0]:.3f} ± {STUDY_DETECTION[key][1]:.3f}"
        rows.append((label, *cells, st))
    add(_table(("metric", f"external {ext_c}", "development (in-fold)", "study (external)"),
               rows))
    if det_ext:
        fr = det_ext["froc"]
        add("\nFROC, external: sensitivity at "
            + ", ".join(f"{r:g}: {_f(s)}" for r, s in zip(fr["fp_rates"], fr["sensitivity"]))
            + " FP/patient.")
    size_rows = size_table_rows(det_ext, det_dev)
    if size_rows:
        add("\nBy reference bleed size (equivalent-sphere diameter): bleeds, sensitivity "
            "(VALDO), lesion Dice and median predicted / reference volume of the matched. "
            "A ratio under 1 means the detector draws those bleeds too small.\n")
        add(_table(("reference diameter", f"external {ext_c}", "development (in-fold)"),
                   size_rows))
    if coco:
        add(f"\nCOCO (slice level, Detectron2 evaluation of the final model on the external "
            f"slices): segm AP {_f(coco.get('segm_ap'))}, segm AP50 {_f(coco.get('segm_ap50'))}, "
            f"bbox AP {_f(coco.get('bbox_ap'))}, bbox AP50 {_f(coco.get('bbox_ap50'))}.")
        if "segm_ap50_raw" in coco:
            add("These count the instances of a slice whose masks overlap as one (union "
                "mask and box, highest score), as the volume predictor unites them into "
                "one lesion. The model's instances as they are, each duplicate a false "
                f"positive: segm AP {_f(coco.get('segm_ap_raw'))}, segm AP50 "
                f"{_f(coco.get('segm_ap50_raw'))}, bbox AP {_f(coco.get('bbox_ap_raw'))}, "
                f"bbox AP50 {_f(coco.get('bbox_ap50_raw'))}.")
    else:
        add("\nCOCO AP: not available (no evaluation in `train/metrics.json`, e.g. with "
            "`--skip-train`).")
    if "froc" in figures:
        add(f"\n![FROC]({_rel(figures['froc'], root)})")
    if overlays:
        add("\n### Detections against the reference (external patients)\n")
        add("Red: detected CMBs; green: reference. The slices with the most lesion voxels "
            "are shown.\n")
        for o in overlays:
            add(f"![{o['patient_id']}]({_rel(o['path'], root)})")

    add("\n## CSVD classification (MIL)\n")
    for title, summ in ((f"External centre {ext_c} (final model)", cls_ext),
                        ("Development centres, cross-validation (out-of-fold patients)",
                         cls_cv)):
        if not summ:
            continue
        mo, ba = summ.get("model") or {}, summ.get("baseline") or {}
        add(f"{title}, n = {mo.get('n', 'n/a')}:\n")
        add(_table(("metric", "MIL", "rule-based baseline"),
                   [(lab, _ci(mo.get(k)), _ci(ba.get(k))) for k, lab in _METRIC_LABELS.items()]))
        if mo.get("auc_per_class"):
            add("\nPer-class AUC (MIL): " + ", ".join(
                f"{c} {_f(v)}" for c, v in mo["auc_per_class"].items()) + ".")
        if mo.get("confusion_matrix"):
            bcm = ba.get("confusion_matrix") or [["-"] * len(CLASSES)] * len(CLASSES)
            add("\nConfusion matrices (rows = true class, columns = predicted; MIL | "
                "rule-based baseline):\n")
            add(_table(("true \\ predicted", *(f"MIL {c}" for c in CLASSES),
                        *(f"baseline {c}" for c in CLASSES)),
                       [(c, *row, *brow) for c, row, brow in
                        zip(CLASSES, mo["confusion_matrix"], bcm)]))
        add("")
    for key in ("roc_external", "confusion_external", "roc_cv", "confusion_cv"):
        if key in figures:
            add(f"![{key}]({_rel(figures[key], root)})")
    pred_csv = layout.mil / "predictions.csv"
    base_csv = layout.mil / "baseline_predictions.csv"
    if pred_csv.is_file():
        pr = pd.read_csv(pred_csv, dtype={"patient_id": str})
        pr = pr[pr["fold"].astype(str) == "external"]
        if len(pr):
            if base_csv.is_file():
                bp = pd.read_csv(base_csv, dtype={"patient_id": str}).set_index("patient_id")
                pr["baseline"] = pr["patient_id"].map(bp["pred_label"])
            add("\n<details><summary>External patients: MIL and baseline calls</summary>\n")
            cols = ["patient_id", "label", "pred_label",
                    *[c for c in pr.columns if c.startswith("prob_")],
                    *(["baseline"] if "baseline" in pr else [])]
            add(_table(cols, [[(_f(v) if isinstance(v, float) else v) for v in r]
                              for r in pr[cols].itertuples(index=False)]))
            add("\n</details>")

    add("\n## Where the lesions lie\n")
    add("Lesion centres projected on the MNI ICBM152 brain (sagittal, coronal, axial), one row "
        "per class, coloured by MARS-style region; positions are normalised to each "
        "patient's brain bounding box (no registration, so approximate).\n")
    for key in ("glass_brain_detected", "glass_brain_reference"):
        if key in figures:
            add(f"![{key}]({_rel(figures[key], root)})")
    rc = m.get("lesion_regions_by_class", {})
    if rc:
        rows = []
        for name, tab in rc.items():
            for cls in CLASSES:
                d = tab.get(cls, {})
                rows.append((name, cls, *(d.get(r, 0) for r in REGION_COLORS),
                             sum(d.values())))
        add("\n" + _table(("lesions", "class", *REGION_COLORS, "total"), rows))

    add("\n## Stage timings\n")
    add(_timings_block(stages))

    add("\n## Notes: what these numbers are and are not\n")
    notes = [
        "**Synthetic data.** The cohort is generated (`detection/data/synthetic.py`): a "
        "template brain with simulated scanners, lesions and mimics. The figures show that "
        "the pipeline works and how it behaves; they are not clinical performance and are "
        "not directly comparable with the study's real-patient figures.",
        f"**External centre.** Centre {ext_c} has its own simulated scanner and is used "
        "only for testing: neither the detector nor the MIL classifier saw it.",
        "**In-fold development bags.** The detector was trained on all development "
        "patients, so their detections (and the MIL training bags built from them) are "
        "in-fold: cleaner than on unseen patients. The MIL cross-validation figures are "
        "therefore optimistic and the MIL model meets other bags on the external centre: on "
        "the synthetic cohort, fewer lesions and many empty bags (in-fold bags are never "
        "empty). Training-time lesion dropout (`instance_dropout` in the MIL config, which "
        "may empty a bag) makes the classifier robust to that; out-of-fold detector "
        "predictions would remove the mismatch at 5x the training cost.",
        "**Development detection metrics are in-fold** (training patients) and shown only "
        "for comparison with the external ones.",
        "**Small external test set.** The confidence intervals are wide; the study's "
        "external set (28 patients) had the same limitation.",
        "**Rule-based baseline** (`mil/baseline.py`, Boston v2.0 style, from the detected "
        "lesions' regions and age) stands in for the clinical reading the study compared "
        "against; it is not a neurologist.",
        "**CPU schedule.** The detector is trained from scratch for a short schedule on 2 "
        "CPU cores (the CPU config); the GPU config trains longer.",
    ]
    weights = str(run.get("weights", ""))
    if weights and weights != "trained in this run":
        notes.append(f"**Detector reused** (`--skip-train`): weights `{weights}`, trained "
                     "elsewhere; the training time is not in the stage timings below and "
                     "its COCO AP is not part of this run.")
    if bag_src := (m.get("bags") or {}).get("bag_source"):
        notes.append(f"Bag provenance (index column `bag_source`): `{json.dumps(bag_src)}`.")
    add("\n".join(f"- {n}" for n in notes))
    add("\n## Files\n")
    files = (("cohort/manifest.csv", "the synthetic cohort"),
             ("coco/", "COCO export (2.5D slices)"),
             ("train/", "detector: config.yaml, model_final.pth, Detectron2 logs"),
             ("predict/", "per patient: cmb_pred.nii.gz, lesions.csv, rejected.csv, overlay.png; "
                          "lesions_all.csv, predict_summary.csv"),
             ("lesions/external/, lesions/development/", "lesion metrics: metrics.json, "
                                                         "per_patient.csv, froc.png"),
             ("bags/", "MIL bags and index.csv"),
             ("mil/", "MIL predictions.csv, attention.csv, metrics.json, model/"),
             ("metrics.json", "every figure of this report"))
    add(_table(("path", "what"), files))
    try:
        run_arg = str(root.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        run_arg = str(root)
    add(f"\nNew patients: `python tools/predict_patient.py --run {run_arg} --swi SWI.nii.gz "
        "[--brain-mask BRAIN.nii.gz] [--age YEARS] --output DIR`.")
    return "\n".join(out) + "\n"
