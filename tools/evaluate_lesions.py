#!/usr/bin/env python
"""Lesion-level detection metrics of a prediction folder against a cohort manifest.

Reads ``<pred>/<patient_id>/cmb_pred.nii.gz`` and ``lesions.csv`` (``lesion_id``,
``max_score``) for every manifest patient with a ``cmb_mask`` and writes
``metrics.json``, ``per_patient.csv``, ``lesion_matches.csv`` and ``froc.png`` into
``--output``. Conventions: :mod:`detection.evaluation.lesions`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.evaluation.lesions import (  # noqa: E402
    STUDY_REFERENCE,
    LesionEvalError,
    evaluate_prediction_dir,
)

logger = logging.getLogger("evaluate_lesions")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", type=Path, required=True,
                        help="prediction folder with one <patient_id>/ folder per patient")
    parser.add_argument("--manifest", type=Path, required=True,
                        help="cohort manifest CSV (patient_id, cmb_mask)")
    parser.add_argument("--output", type=Path, required=True, help="report folder")
    parser.add_argument("--match-mm", type=float, default=5.0,
                        help="VALDO matching distance between centres of mass (mm)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="drop predicted lesions whose max_score is below this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s %(message)s")
    try:
        res = evaluate_prediction_dir(args.pred, args.manifest, args.output,
                                      match_mm=args.match_mm, score_thresh=args.score_thresh)
    except LesionEvalError as exc:
        logger.error("%s", exc)
        return 2
    pp, m = res.metrics["per_patient"], res.metrics
    for key in ("iou", "dice", "recall"):
        ref_mean, ref_sd = STUDY_REFERENCE[key]
        logger.info("%-7s %.3f ± %.3f   (study %.3f ± %.3f)", key, pp[key]["mean"],
                    pp[key]["sd"], ref_mean, ref_sd)
    logger.info("pooled %s", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                         for k, v in m["pooled"].items()}))
    logger.info("FROC sensitivity at %s FP/patient: %s", m["froc"]["fp_rates"],
                [None if v != v else round(v, 3) for v in m["froc"]["sensitivity"]])
    for row in m["by_reference_size"]:
        logger.info("reference %-9s n %3d  sensitivity %.3f  lesion Dice %.3f  "
                    "predicted/reference volume %.2f", row["diameter_mm"], row["n_ref"],
                    row["sensitivity"], row["lesion_dice"], row["volume_ratio"])
    logger.info("report written to %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
