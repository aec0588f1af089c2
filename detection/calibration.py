"""Per-site choice of the test-time zoom (``CMB.INFER.ZOOM``) on a few labelled patients.

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

from .evaluation.lesions import CohortEval, evaluate_prediction_dir, froc
from .fileio import json_ready, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ZOOMS", "calibrate_zoom", "predict_at_zoom", "select_zoom",
           "write_eval_manifest"]

#: Candidate zooms: from slightly shrunk (scanners that bloom more) to 1.45x.
DEFAULT_ZOOMS = (0.85, 1.0, 1.15, 1.3, 1.45)
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
) -> tuple[CohortEval, float]:
    """Predict ``cohort`` with ``CMB.INFER.ZOOM`` = ``zoom`` into ``out_dir/<patient_id>/``
    and evaluate it against ``manifest`` (report in ``out_dir/evaluation``). Returns the
    evaluation and the prediction seconds per patient."""
    from .inference import VolumePredictor

    zcfg = cfg.clone()
    zcfg.defrost()
    zcfg.CMB.INFER.ZOOM = float(zoom)
    predictor = VolumePredictor(zcfg, weights)
    out = Path(out_dir)
    rows = list(cohort.to_dict("records"))
    t0 = time.perf_counter()
    if progress:
        import tqdm

        rows = tqdm.tqdm(rows, desc=f"zoom {zoom:g}")
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
) -> dict[str, Any]:
    """Predict ``cohort`` (a manifest table with ``swi`` and ``cmb_mask``) at each zoom
    into ``output/zoom_<z>/``, evaluate, and write ``output/zoom_selection.json``.

    Returns the selection: the trials (sensitivity at ``fp_rate``, mean FROC
    sensitivity, recall, Dice, FP per patient at the operating threshold) and the
    selected zoom with the config override that applies it.
    """
    zooms = [float(z) for z in zooms]
    if not zooms or any(not (z > 0 and math.isfinite(z)) for z in zooms):
        raise ValueError(f"zooms must be positive numbers, got {zooms}")
    if len(set(zooms)) != len(zooms):
        raise ValueError(f"duplicate zooms in {zooms}")
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
    selection = {
        "fp_rate": float(fp_rate),
        "trials": trials,
        "selected_zoom": best,
        "opts": ["CMB.INFER.ZOOM", best],
        "patients": [str(p) for p in cohort["patient_id"]],
        "weights": str(weights),
        "rule": "max sensitivity at fp_rate FP/patient; ties: max mean FROC sensitivity, "
                "then the zoom closest to 1",
        "n_reference_lesions": n_ref,
    }
    write_text_atomic(out / "zoom_selection.json",
                      json.dumps(json_ready(selection), indent=2) + "\n")
    logger.info("selected zoom %g (CMB.INFER.ZOOM %g) from %d patients", best, best,
                len(cohort))
    return selection
