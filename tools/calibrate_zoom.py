#!/usr/bin/env python
"""Choose the test-time zoom (CMB.INFER.ZOOM) for a new site on a few labelled patients.

    python tools/calibrate_zoom.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml \\
        --weights output/demo/train/model_final.pth --manifest site_calibration.csv \\
        --output output/zoom_site_X [--mask-threshs]
    python tools/predict.py ... <the selection's opts>   # then the site's other patients

Predicts the manifest's patients (they need ``cmb_mask``) at each ``--zooms`` value into
``OUTPUT/zoom_<z>/``, evaluates them, and writes ``OUTPUT/zoom_selection.json`` with the
zoom that finds the most bleeds at ``--fp-rate`` false positives per patient. With
``--mask-threshs`` (candidates 0.3 0.4 0.5 when none are given), the patients are then
predicted at that zoom with each mask threshold (CMB.INFER.MASK_THRESH), and the one
with the best mean Dice is kept too.
Report a site's figures on patients other than the calibration ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401
from detection.calibration import (  # noqa: E402
    DEFAULT_ZOOMS,
    MASK_THRESHS,
    calibrate_zoom,
    mask_candidates,
)
from detection.data.manifest import read_cohort  # noqa: E402
from detection.engine import setup_cfg  # noqa: E402

from detectron2.utils.logger import setup_logger  # noqa: E402

logger = logging.getLogger("cmb.calibrate_zoom")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="model_final.pth / model_best.pth")
    p.add_argument("--manifest", required=True,
                   help="manifest CSV or nnU-Net folder of labelled calibration patients")
    p.add_argument("--output", required=True)
    p.add_argument("--centers", nargs="*", default=None, help="only these centres")
    p.add_argument("--zooms", type=float, nargs="+", default=list(DEFAULT_ZOOMS),
                   help="candidate zooms (default %(default)s)")
    p.add_argument("--mask-threshs", type=float, nargs="*", default=None,
                   help="also choose CMB.INFER.MASK_THRESH by Dice at the selected zoom "
                        f"among these (none given: {' '.join(map(str, MASK_THRESHS))}); "
                        "without the option the config's value is kept")
    p.add_argument("--fp-rate", type=float, default=1.0,
                   help="false positives per patient at which sensitivity is compared")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    setup_logger(name="cmb")
    setup_logger(name="detection")
    cfg = setup_cfg(args.config_file, list(args.opts))
    try:
        cohort = read_cohort(args.manifest, require_masks=True)
        if args.centers:
            cohort = cohort[cohort["center"].isin(args.centers)]
            if cohort.empty:
                raise ValueError(f"{args.manifest}: no patient of centre(s) {args.centers}")
        sel = calibrate_zoom(cfg, args.weights, cohort, args.output, zooms=args.zooms,
                             fp_rate=args.fp_rate, mask_threshs=mask_candidates(args.mask_threshs))
    except ValueError as exc:
        raise SystemExit(f"calibrate_zoom: {exc}") from exc
    logger.info("trials:\n%s", json.dumps(sel["trials"], indent=1))
    if "mask_trials" in sel:
        logger.info("mask trials:\n%s", json.dumps(sel["mask_trials"], indent=1))
    logger.info("selected: %s (%s)", " ".join(str(o) for o in sel["opts"]),
                Path(args.output) / "zoom_selection.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
