#!/usr/bin/env python
"""Site calibration of the test-time zoom, measured on patients the calibration never saw.

For one centre of a labelled cohort: every ``--calib-every``-th patient (by patient id,
from the first) is a calibration patient; :func:`detection.calibration.calibrate_zoom`
picks ``CMB.INFER.ZOOM`` (and, with ``--mask-threshs``, ``CMB.INFER.MASK_THRESH``) on
them; the other patients of the centre are then predicted at zoom 1 and at the selected
zoom (plus any ``--also-zoom``), and at the selected zoom and mask threshold, and
evaluated. Results (calibration trials, selection, held-out lesion metrics per setting,
times) go to ``--json``: held-out keys are the zoom (``"1.3"``) or the zoom and mask
threshold (``"1.3_mask_0.4"``).

    python benchmarks/bench_zoom.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml \\
        --weights output/demo/train/model_final.pth --manifest output/demo/cohort/manifest.csv \\
        --center C --work /tmp/zoom_C --json benchmarks/results/zoom_C.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401
from detection.calibration import (  # noqa: E402
    DEFAULT_ZOOMS,
    calibrate_zoom,
    mask_candidates,
    predict_at_zoom,
    write_eval_manifest,
)
from detection.data.manifest import read_cohort  # noqa: E402
from detection.engine import setup_cfg  # noqa: E402
from detection.evaluation.lesions import headline_figures  # noqa: E402
from detection.fileio import json_ready, shown_path, write_text_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shown(path: str | Path) -> str:
    """``path`` as the results file names it (no machine paths)."""
    return shown_path(path, REPO)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--manifest", required=True, help="labelled cohort manifest")
    ap.add_argument("--center", required=True, help="the site to calibrate")
    ap.add_argument("--calib-every", type=int, default=5,
                    help="every k-th patient of the centre calibrates (default %(default)s)")
    ap.add_argument("--zooms", type=float, nargs="+", default=list(DEFAULT_ZOOMS))
    ap.add_argument("--also-zoom", type=float, nargs="*", default=[],
                    help="held-out patients are also predicted at these zooms")
    ap.add_argument("--mask-threshs", type=float, nargs="*", default=None,
                    help="also calibrate CMB.INFER.MASK_THRESH among these (none given: "
                         "the tool's default candidates)")
    ap.add_argument("--fp-rate", type=float, default=1.0)
    ap.add_argument("--work", required=True, help="folder for the predictions")
    ap.add_argument("--json", required=True, help="results file")
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.calib_every < 2:
        ap.error("--calib-every must be >= 2 (some patients must be held out)")

    cfg = setup_cfg(args.config_file, list(args.opts))
    cohort = read_cohort(args.manifest, require_masks=True)
    site = cohort[cohort["center"] == args.center].sort_values("patient_id")
    if site.empty:
        raise SystemExit(f"{args.manifest}: no patient of centre {args.center!r}")
    calib = site.iloc[::args.calib_every]
    held = site.drop(calib.index)
    work = Path(args.work)
    t0 = time.perf_counter()
    sel = calibrate_zoom(cfg, args.weights, calib, work / "calibration", zooms=args.zooms,
                         fp_rate=args.fp_rate, mask_threshs=mask_candidates(args.mask_threshs))
    t_cal = time.perf_counter() - t0

    manifest = write_eval_manifest(held, work / "heldout_manifest.csv")
    results = {}
    zooms = sorted({1.0, float(sel["selected_zoom"]), *map(float, args.also_zoom)})
    for z in zooms:
        ev, seconds = predict_at_zoom(cfg, args.weights, held, z, work / f"heldout_zoom_{z:g}",
                                      manifest)
        results[f"{z:g}"] = {**headline_figures(ev.metrics), "seconds_per_patient": seconds}
    if "selected_mask_thresh" in sel:
        z, t = float(sel["selected_zoom"]), float(sel["selected_mask_thresh"])
        key = f"{z:g}_mask_{t:g}"
        if t != float(cfg.CMB.INFER.MASK_THRESH):
            ev, seconds = predict_at_zoom(cfg, args.weights, held, z, work / f"heldout_zoom_{key}",
                                          manifest, mask_thresh=t)
            results[key] = {**headline_figures(ev.metrics), "seconds_per_patient": seconds}

    doc = {
        "what": "test-time zoom chosen on calibration patients of one site, evaluated on "
                "the site's other patients",
        "config": shown(args.config_file), "weights": shown(args.weights),
        "opts": list(args.opts), "center": args.center,
        "calibration": {"patients": sel["patients"], "rule": sel["rule"],
                        "fp_rate": sel["fp_rate"], "trials": sel["trials"],
                        "selected_zoom": sel["selected_zoom"],
                        "mask_trials": sel.get("mask_trials"),
                        "selected_mask_thresh": sel.get("selected_mask_thresh"),
                        "seconds": t_cal},
        "heldout_patients": list(held["patient_id"]),
        "heldout": results,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    write_text_atomic(args.json, json.dumps(json_ready(doc), indent=2) + "\n")
    print(json.dumps({k: {m: (round(v, 3) if isinstance(v, float) else v)
                          for m, v in r.items()} for k, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
