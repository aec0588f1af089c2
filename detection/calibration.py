"""Per-site choice of the test-time zoom (``CMB.INFER.ZOOM``) and of the mask threshold
(``CMB.INFER.MASK_THRESH``) on a few labelled patients.

A detector learns the apparent size of its training scanners' bleeds. Blooming - the
signal void around a bleed - depends on field strength and echo time, so a new scanner
can show the same bleeds narrower or wider, and the detector then misses or over-calls
them. On the synthetic cohort the demo detector (trained on centres A and B) found more
of centre C's bleeds when C's slices were magnified 1.3x, and fewer of centre B's when B
was magnified (README, "Test-time zoom").

:func:`calibrate_zoom` predicts the calibration patients at each candidate zoom,
evaluates them against their masks and picks the zoom with the highest lesion
sensitivity at ``fp_rate`` false positives per patient (FROC); ties go to the higher
mean FROC sensitivity, then to the zoom closest to 1. The calibration patients must not
be the ones a study then reports on.

With ``mask_threshs`` other than the config's, the calibration patients are then predicted
at the selected zoom with each mask threshold, and the one with the highest mean Dice per
patient is kept (ties: the value closest to the config's). Blooming sets how far the
visible dark blob exceeds the bleed, so a detector trained on scanners that bloom more
draws a new scanner's large bleeds too small; a lower threshold draws them larger.
:func:`select_mask_thresh` holds the rule.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from detectron2.config import CfgNode

from .config import mask_threshold
from .evaluation.lesions import CohortEval, evaluate_prediction_dir, froc
from .fileio import json_ready, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ZOOMS", "MASK_THRESHS", "calibrate_zoom", "mask_candidates",
           "predict_at_zoom", "select_mask_thresh", "select_zoom", "write_eval_manifest"]

#: Candidate zooms: from slightly shrunk (scanners that bloom more) to 1.45x.
DEFAULT_ZOOMS = (0.85, 1.0, 1.15, 1.3, 1.45)
#: Candidate mask thresholds when a site's masks are calibrated (the config's is added).
MASK_THRESHS = (0.3, 0.4, 0.5)
#: Fewer reference lesions than this in the calibration patients draw a warning.
MIN_RELIABLE_LESIONS = 30


def select_zoom(trials: Sequence[Mapping[str, float]]) -> float:
    """The zoom of the best trial: highest ``sensitivity_at_fp``, then highest
    ``froc_mean``, then the smallest ``|log zoom|``. NaN sensitivities rank last."""
    if not trials:
        raise ValueError("no zoom trials to choose from")

    def key(t: Mapping[str, float]) -> tuple[float, float, float]:
        s, m = float(t["sensitivity_at_fp"]), float(t["froc_mean"])
        return (s if math.isfinite(s) else -1.0, m if math.isfinite(m) else -1.0,
                -abs(math.log(float(t["zoom"]))))

    return float(max(trials, key=key)["zoom"])


def mask_candidates(values: Sequence[float] | None) -> list[float] | None:
    """The tools' ``--mask-threshs`` (``nargs="*"``) as :func:`calibrate_zoom` reads it:
    absent (None) keeps the config's threshold, the bare option gives :data:`MASK_THRESHS`."""
    if values is None:
        return None
    return [float(v) for v in values] or list(MASK_THRESHS)


def select_mask_thresh(trials: Sequence[Mapping[str, float]], default: float = 0.5) -> float:
    """The mask threshold of the best trial: highest mean ``dice`` per patient, then the
    value closest to ``default``. NaN Dice ranks last."""
    if not trials:
        raise ValueError("no mask threshold trials to choose from")

    def key(t: Mapping[str, float]) -> tuple[float, float]:
        d = float(t["dice"])
        return (d if math.isfinite(d) else -1.0, -abs(float(t["mask_thresh"]) - default))

    return float(max(trials, key=key)["mask_thresh"])


def write_eval_manifest(cohort: pd.DataFrame, path: str | Path) -> Path:
    """``patient_id, swi, cmb_mask`` of ``cohort`` with absolute paths, written atomically
    (what :func:`~detection.evaluation.lesions.evaluate_prediction_dir` reads)."""
    table = cohort[["patient_id", "swi", "cmb_mask"]].copy()
    for col in ("swi", "cmb_mask"):
        table[col] = [str(Path(p).resolve()) for p in table[col]]
    return write_text_atomic(path, table.to_csv(index=False))


def predict_at_zoom(
    cfg: CfgNode,
    weights: str,
    cohort: pd.DataFrame,
    zoom: float,
    out_dir: str | Path,
    manifest: str | Path,
    progress: bool = True,
    mask_thresh: float | None = None,
) -> tuple[CohortEval, float]:
    """Predict ``cohort`` with ``CMB.INFER.ZOOM`` = ``zoom`` (and ``CMB.INFER.MASK_THRESH``
    = ``mask_thresh`` unless None) into ``out_dir/<patient_id>/`` and evaluate it against
    ``manifest`` (report in ``out_dir/evaluation``). Returns the evaluation and the
    prediction seconds per patient."""
    from .inference import VolumePredictor

    zcfg = cfg.clone()
    zcfg.defrost()
    zcfg.CMB.INFER.ZOOM = float(zoom)
    if mask_thresh is not None:
        zcfg.CMB.INFER.MASK_THRESH = float(mask_thresh)
    predictor = VolumePredictor(zcfg, weights)
    out = Path(out_dir)
    rows = list(cohort.to_dict("records"))
    t0 = time.perf_counter()
    if progress:
        import tqdm

        desc = f"zoom {zoom:g}" + ("" if mask_thresh is None else f", mask {mask_thresh:g}")
        rows = tqdm.tqdm(rows, desc=desc)
    for rec in rows:
        pred = predictor(rec["swi"], rec.get("brain_mask") or None,
                         patient_id=rec["patient_id"])
        pred.write(out / rec["patient_id"], overlay=False)
    seconds = (time.perf_counter() - t0) / max(len(cohort), 1)
    return evaluate_prediction_dir(out, manifest, out / "evaluation"), seconds


def calibrate_zoom(
    cfg: CfgNode,
    weights: str,
    cohort: pd.DataFrame,
    output: str | Path,
    zooms: Sequence[float] = DEFAULT_ZOOMS,
    fp_rate: float = 1.0,
    progress: bool = True,
    mask_threshs: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Predict ``cohort`` (a manifest table with ``swi`` and ``cmb_mask``) at each zoom
    into ``output/zoom_<z>/``, evaluate, and write ``output/zoom_selection.json``. With
    mask thresholds other than the config's in ``mask_threshs``, predict at the selected
    zoom with each of them into ``output/zoom_<z>_mask_<t>/`` too.

    Returns the selection: the trials (sensitivity at ``fp_rate``, mean FROC
    sensitivity, recall, Dice, FP per patient at the operating threshold), the selected
    zoom, the mask trials and threshold when calibrated, and the config overrides that
    apply them. ``mask_threshs`` None: the config's mask threshold only.
    """
    zooms = [float(z) for z in zooms]
    if not zooms or any(not (z > 0 and math.isfinite(z)) for z in zooms):
        raise ValueError(f"zooms must be positive numbers, got {zooms}")
    if len(set(zooms)) != len(zooms):
        raise ValueError(f"duplicate zooms in {zooms}")
    base_mask = mask_threshold(cfg)
    mask_threshs = [base_mask] if mask_threshs is None else [float(t) for t in mask_threshs]
    if not mask_threshs or any(not 0.0 < t < 1.0 for t in mask_threshs):
        raise ValueError(f"mask thresholds must be in (0, 1), got {mask_threshs}")
    if len(set(mask_threshs)) != len(mask_threshs):
        raise ValueError(f"duplicate mask thresholds in {mask_threshs}")
    if not fp_rate > 0:
        raise ValueError(f"fp_rate must be positive, got {fp_rate}")
    if cohort.empty:
        raise ValueError("no calibration patients")
    missing = [str(p) for p, m in zip(cohort["patient_id"], cohort["cmb_mask"]) if not m]
    if missing:
        raise ValueError(f"calibration patients need a cmb_mask; missing for {missing[:10]}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_eval_manifest(cohort, out / "calibration_manifest.csv")

    trials = []
    for z in zooms:
        result, _ = predict_at_zoom(cfg, weights, cohort, z, out / f"zoom_{z:g}", manifest,
                                    progress=progress)
        at = froc(result.cases, fp_rates=[fp_rate])["sensitivity"][0]
        pp = result.metrics["per_patient"]
        trials.append({
            "zoom": z,
            "sensitivity_at_fp": at,
            "froc_mean": result.metrics["froc"]["mean_sensitivity"],
            "recall": pp["recall"]["mean"],
            "dice": pp["dice"]["mean"],
            "fp_per_patient": result.metrics["pooled"]["fp_per_patient"],
            "n_reference_lesions": result.metrics["froc"]["n_reference_lesions"],
        })
        logger.info("zoom %g: sensitivity %.3f at %g FP/patient, FROC mean %.3f, Dice %.3f",
                    z, at, fp_rate, trials[-1]["froc_mean"], trials[-1]["dice"])
    n_ref = max(int(t["n_reference_lesions"]) for t in trials)
    if n_ref == 0:
        raise ValueError(f"{manifest}: the calibration patients have no reference lesions")
    if n_ref < MIN_RELIABLE_LESIONS:
        logger.warning("only %d reference lesions in the calibration patients: sensitivities "
                       "move in steps of %.2f and zooms may tie; label more patients (>= %d "
                       "lesions) for a firmer choice", n_ref, 1.0 / n_ref,
                       MIN_RELIABLE_LESIONS)
    best = select_zoom(trials)
    opts: list[Any] = ["CMB.INFER.ZOOM", best]
    mask_part: dict[str, Any] = {}
    if mask_threshs != [base_mask]:
        at_best = next(t for t in trials if t["zoom"] == best)
        mask_trials = []
        for t in sorted(set(mask_threshs) | {base_mask}):
            if t == base_mask:
                dice, recall, fpp = at_best["dice"], at_best["recall"], at_best["fp_per_patient"]
            else:
                result, _ = predict_at_zoom(cfg, weights, cohort, best,
                                            out / f"zoom_{best:g}_mask_{t:g}", manifest,
                                            progress=progress, mask_thresh=t)
                pp = result.metrics["per_patient"]
                dice, recall = pp["dice"]["mean"], pp["recall"]["mean"]
                fpp = result.metrics["pooled"]["fp_per_patient"]
            mask_trials.append({"mask_thresh": t, "dice": dice, "recall": recall,
                                "fp_per_patient": fpp})
            logger.info("zoom %g, mask threshold %g: Dice %.3f, recall %.3f, %.2f FP/patient",
                        best, t, dice, recall, fpp)
        best_mask = select_mask_thresh(mask_trials, default=base_mask)
        opts += ["CMB.INFER.MASK_THRESH", best_mask]
        mask_part = {"mask_trials": mask_trials, "selected_mask_thresh": best_mask,
                     "mask_rule": "max mean Dice per patient at the selected zoom; ties: "
                                  f"the threshold closest to {base_mask:g}"}
    selection = {
        "fp_rate": float(fp_rate),
        "trials": trials,
        "selected_zoom": best,
        **mask_part,
        "opts": opts,
        "patients": [str(p) for p in cohort["patient_id"]],
        "weights": str(weights),
        "rule": "max sensitivity at fp_rate FP/patient; ties: max mean FROC sensitivity, "
                "then the zoom closest to 1",
        "n_reference_lesions": n_ref,
    }
    write_text_atomic(out / "zoom_selection.json",
                      json.dumps(json_ready(selection), indent=2) + "\n")
    logger.info("selected %s from %d patients", " ".join(f"{o:g}" if isinstance(o, float)
                                                          else str(o) for o in opts),
                len(cohort))
    return selection
