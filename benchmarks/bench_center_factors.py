#!/usr/bin/env python
"""Which acquisition factor of a centre costs the detector its sensitivity?

The synthetic cohort's external centre differs from the development centres in several
profile fields at once (field strength / blooming, SNR, in-plane and slice spacing,
contrast). This benchmark renders the same patients of that centre again with one
field set to another value at a time (everything else, lesions and noise included,
unchanged: every patient keeps its seed), predicts every version with the same detector
and evaluates it against that version's own reference masks. A field whose change
moves the figures much is what the detector does not generalise over.

    python benchmarks/bench_center_factors.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml \\
        --weights output/demo/train/model_final.pth --center C \\
        --variant blooming=1.0 --variant snr=24 --variant inplane_mm=0.95 --variant slice_mm=2.0 \\
        --work /tmp/factors --json benchmarks/results/center_factors_C.json --workers 2

``--patients-per-class``, ``--centers`` and ``--seed`` must be those of the cohort the
detector is judged on (the demo's: 30, A,B,C, 0) for the baseline to be the same
patients. A changed in-plane or slice spacing keeps the field of view (the matrix
follows).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401
from detection.data.synthetic import (  # noqa: E402
    BUILTIN_CENTERS,
    CenterProfile,
    CenterProfileError,
    cohort_specs,
    generate_patient,
)
from detection.fileio import json_ready, shown_path, write_text_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def varied_profile(base: CenterProfile, field: str, value: float) -> CenterProfile:
    """``base`` with ``field`` = ``value`` (validated like a profile file); a new in-plane
    or slice spacing rescales the matrix so the field of view stays."""
    data = base.to_dict()
    numeric = [k for k, v in data.items() if isinstance(v, (int, float))]
    if field not in numeric:
        raise SystemExit(f"--variant: {field!r} is not a numeric centre profile field "
                         f"(fields: {', '.join(numeric)})")
    data[field] = value
    nx, ny, nz = base.matrix
    if field == "inplane_mm":
        f = base.inplane_mm / value
        data["matrix"] = [int(round(nx * f)), int(round(ny * f)), nz]
    elif field == "slice_mm":
        data["matrix"] = [nx, ny, int(round(nz * base.slice_mm / value))]
    try:
        return CenterProfile.from_dict(data, source=f"--variant {field}={value:g}")
    except CenterProfileError as exc:
        raise SystemExit(str(exc)) from exc


def parse_variant(text: str) -> tuple[str, float]:
    """``field=value`` -> (field, float value)."""
    field, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return field.strip(), float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from exc


def run_variant(job: dict) -> dict:
    """Render the centre's patients with one profile, predict and evaluate them."""
    from detection.calibration import predict_at_zoom, write_eval_manifest
    from detection.data.manifest import read_cohort
    from detection.engine import setup_cfg
    from detection.evaluation.lesions import headline_figures

    import torch

    torch.set_num_threads(1)
    out = Path(job["work"]) / job["name"]
    cohort_dir = out / "cohort"
    t0 = time.perf_counter()
    rows, lesions = [], []
    for spec in job["specs"]:
        row, les = generate_patient(spec, job["profile"], cohort_dir)
        rows.append(row)
        lesions += les
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(cohort_dir / "manifest.csv", buf.getvalue())
    t_gen = time.perf_counter() - t0
    cohort = read_cohort(cohort_dir / "manifest.csv", require_masks=True)
    manifest = write_eval_manifest(cohort, out / "eval_manifest.csv")
    cfg = setup_cfg(job["config_file"], job["opts"])
    ev, seconds = predict_at_zoom(cfg, job["weights"], cohort, 1.0, out / "pred", manifest,
                                  progress=False)
    return {
        "variant": job["name"], "profile": job["profile"].to_dict(),
        "reference_voxels_per_lesion": (sum(r["n_voxels"] for r in lesions)
                                        / max(len(lesions), 1)),
        **headline_figures(ev.metrics),
        "seconds_render": t_gen, "seconds_predict_per_patient": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--center", default="C", help="built-in centre to vary")
    ap.add_argument("--variant", type=parse_variant, action="append", required=True,
                    help="FIELD=VALUE of the centre profile (repeatable)")
    ap.add_argument("--patients-per-class", type=int, default=30)
    ap.add_argument("--centers", default="A,B,C", help="the cohort's centres (for the ids)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="variants run in parallel")
    ap.add_argument("--work", required=True, help="folder for cohorts and predictions")
    ap.add_argument("--json", required=True, help="results file")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE overrides")
    args = ap.parse_args(argv)

    for what, path in (("--config-file", args.config_file), ("--weights", args.weights)):
        if not Path(path).is_file():
            ap.error(f"{what} {path}: no such file")
    if args.center not in BUILTIN_CENTERS:
        ap.error(f"--center must be a built-in centre ({', '.join(BUILTIN_CENTERS)})")
    names = [c.strip() for c in args.centers.split(",") if c.strip()]
    if args.center not in names:
        ap.error(f"--centers {args.centers!r} does not contain --center {args.center!r}")
    base = BUILTIN_CENTERS[args.center]
    specs = [s for s in cohort_specs(args.patients_per_class, names, args.seed)
             if s.center == args.center]
    common = {"specs": specs, "work": str(args.work), "config_file": args.config_file,
              "weights": args.weights, "opts": list(args.opts)}
    jobs = [{**common, "name": "as_built", "profile": base}]
    for field, value in args.variant:
        jobs.append({**common, "name": f"{field}={value:g}",
                     "profile": varied_profile(base, field, value)})
    t0 = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as ex:
            results = list(ex.map(run_variant, jobs))
    else:
        results = [run_variant(j) for j in jobs]
    doc = {
        "what": f"centre {args.center} re-rendered with one profile field changed at a time "
                "(same patients, lesions and noise), the same detector on every version",
        "config": shown_path(args.config_file, REPO),
        "weights": shown_path(args.weights, REPO),
        "opts": list(args.opts), "center": args.center, "patients": len(specs),
        "cohort": {"patients_per_class": args.patients_per_class, "centers": names,
                   "seed": args.seed},
        "results": results, "seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    write_text_atomic(args.json, json.dumps(json_ready(doc), indent=2) + "\n")
    keys = ("sensitivity_at_1fp", "recall_mean", "dice_mean", "fp_per_patient")
    for r in results:
        print(f"{r['variant']:>18s}  " + "  ".join(f"{k} {r[k]:.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
