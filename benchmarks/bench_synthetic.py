#!/usr/bin/env python
"""Benchmark: generate the default 90-patient synthetic cohort (30 per class, centres
A, B, C) with 2 workers into a temporary folder; write timings to
``benchmarks/results/synthetic.json``. Target: under 180 s on 2 cores.

    python benchmarks/bench_synthetic.py [--patients-per-class 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detection.data import synthetic as S  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients-per-class", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "synthetic.json"))
    ap.add_argument("--keep", default=None, help="keep the cohort in this folder")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    centers = [S.BUILTIN_CENTERS[c] for c in ("A", "B", "C")]
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "cohort"
        t0 = time.perf_counter()
        cpu0 = os.times()
        manifest = S.generate_cohort(out, patients_per_class=args.patients_per_class,
                                     centers=centers, seed=args.seed, workers=args.workers,
                                     progress=True)
        seconds = time.perf_counter() - t0
        cpu1 = os.times()
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        n_cmb = sum(int(r["n_cmb"]) for r in rows)
    load_after = os.getloadavg()
    n = len(rows)
    cpu = (cpu1.user - cpu0.user + cpu1.children_user - cpu0.children_user
           + cpu1.system - cpu0.system + cpu1.children_system - cpu0.children_system)
    result = {
        "benchmark": "synthetic cohort generation (datasets/prepare_synthetic.py)",
        "patients": n,
        "patients_per_class": args.patients_per_class,
        "centers": {c.name: {"spacing_mm": list(c.spacing), "matrix": list(c.matrix),
                             "voxels_per_volume": int(c.matrix[0] * c.matrix[1] * c.matrix[2])}
                    for c in centers},
        "workers": args.workers,
        "seconds": round(seconds, 2),
        "patients_per_second": round(n / seconds, 3),
        "seconds_per_patient_per_worker": round(seconds * args.workers / n, 3),
        "cpu_seconds_incl_workers": round(cpu, 1),
        "target_seconds": 180,
        "within_target": seconds < 180,
        "total_cmbs": n_cmb,
        "output_megabytes": round(size / 1e6, 1),
        "machine": {
            "cpu": _cpu_model(), "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in load_after],
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".json.tmp")
    tmp_dest.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_dest, dest)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
