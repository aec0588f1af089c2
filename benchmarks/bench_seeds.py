#!/usr/bin/env python
"""Seed stability of a detector config: train from scratch with several seeds, then the
slice-level COCO AP (Detectron2's evaluation at the end of training) and the lesion-level
metrics on the external centre, one row per seed, in one JSON.

Each seed's folder ``<work>/seed<k>/`` holds ``train/`` (tools/train_net.py),
``pred/`` (tools/predict.py on the external patients) and ``eval/``
(tools/evaluate_lesions.py). A step whose output exists is not re-run, so an interrupted
study resumes, and seeds can run in parallel (``--jobs``, one thread each).

    python benchmarks/bench_seeds.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml \\
        --data-root output/demo/coco --manifest output/demo/cohort/manifest.csv \\
        --center C --seeds 0 1 2 --cpu-procs 2 --work output/seeds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {rc}; see {log}")


def coco_from_log(log: Path) -> dict[str, dict[str, float]]:
    """The last bbox / segm ``copypaste`` results of a Detectron2 training log."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    out: dict[str, dict[str, float]] = {}
    for task, vals in re.findall(r"copypaste: Task: (\w+)\n.*copypaste: AP,AP50.*\n"
                                 r".*copypaste: ([-\d.,nan]+)", text):
        ap, ap50, ap75 = (float(v) / 100.0 for v in vals.split(",")[:3])
        out[task] = {"AP": round(ap, 4), "AP50": round(ap50, 4), "AP75": round(ap75, 4)}
    return out


def losses(metrics_json: Path, log: Path | None = None) -> dict[str, float | bool | None]:
    """Final total loss (mean of the last 5 records) and whether any loss was not finite.

    Read from Detectron2's ``metrics.json``; where it is missing (weights trained
    elsewhere, only the log kept) from the ``total_loss:`` entries of ``log``. With no
    record at all, ``all_losses_finite`` is None (unknown), not True."""
    rows: list[float] = []
    if metrics_json.is_file():
        for line in metrics_json.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "total_loss" in rec:
                rows.append(float(rec["total_loss"]))
    elif log is not None and log.is_file():
        rows = [float(v) for v in re.findall(r"total_loss: (\S+)", log.read_text(errors="replace"))]
    last = rows[-5:]
    return {"iterations_logged": len(rows),
            "all_losses_finite": all(math.isfinite(v) for v in rows) if rows else None,
            "final_total_loss": round(sum(last) / len(last), 4) if last else None,
            "first_total_loss": round(rows[0], 4) if rows else None}


def add_run_args(p: argparse.ArgumentParser, work: str, output: str) -> None:
    """The arguments the training benchmarks share: training processes, work folder,
    result file, a note, and trailing config overrides."""
    p.add_argument("--cpu-procs", type=int, default=1,
                   help="data-parallel CPU processes per training (train_net --cpu-procs)")
    p.add_argument("--work", type=Path, default=Path(work))
    p.add_argument("--output", type=Path, default=Path(output))
    p.add_argument("--note", default="", help="free text kept in the JSON (e.g. where "
                   "weights already in --work were trained)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")


def one_seed(seed: int, args: argparse.Namespace, ext_manifest: Path) -> dict:
    d = args.work / f"seed{seed}"
    (d / "train").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.perf_counter()
    weights = d / "train" / "model_final.pth"
    if not weights.is_file():
        _run([py, "tools/train_net.py", "--config-file", args.config_file,
              "--cpu-procs", str(args.cpu_procs), "CMB.DATA_ROOT", str(args.data_root),
              "OUTPUT_DIR", str(d / "train"), "SEED", str(seed), *args.opts],
             d / "train_stdout.log")
    t_train = time.perf_counter() - t0
    if not (d / "pred" / ".done").is_file():
        _run([py, "tools/predict.py", "--config-file", args.config_file, "--weights",
              str(weights), "--manifest", str(ext_manifest), "--output", str(d / "pred"),
              "--no-overlay", "--overwrite", *args.opts], d / "predict.log")
        (d / "pred" / ".done").touch()
    if not (d / "eval" / "metrics.json").is_file():
        _run([py, "tools/evaluate_lesions.py", "--pred", str(d / "pred"), "--manifest",
              str(ext_manifest), "--output", str(d / "eval")], d / "evaluate.log")
    m = json.loads((d / "eval" / "metrics.json").read_text())
    pp, po = m["per_patient"], m["pooled"]
    froc = dict(zip(m["froc"]["fp_rates"], m["froc"]["sensitivity"], strict=True))
    return {
        "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds_this_run": round(t_train, 1),
        "losses": losses(d / "train" / "metrics.json", d / "train" / "log.txt"),
        "coco_external": coco_from_log(d / "train" / "log.txt"),
        "lesions_external": {
            "dice_mean": round(pp["dice"]["mean"], 4), "iou_mean": round(pp["iou"]["mean"], 4),
            "recall_mean": round(pp["recall"]["mean"], 4),
            "sensitivity_pooled": round(po["sensitivity"], 4),
            "precision_pooled": None if po["precision"] is None else round(po["precision"], 4),
            "fp_per_patient": round(po["fp_per_patient"], 3),
            "froc_sensitivity_at_1fp": froc.get(1.0),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--data-root", type=Path, required=True, help="COCO export folder")
    p.add_argument("--manifest", type=Path, required=True, help="cohort manifest CSV")
    p.add_argument("--center", required=True, help="external centre to evaluate on")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel")
    add_run_args(p, work="output/seeds", output="benchmarks/results/seeds_cpu.json")
    args = p.parse_args(argv)
    if args.cpu_procs < 1:
        p.error(f"--cpu-procs must be >= 1, got {args.cpu_procs}")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    cohort = pd.read_csv(args.manifest)
    ext = cohort[cohort["center"].astype(str) == args.center].copy()
    if ext.empty:
        raise SystemExit(f"{args.manifest}: no patient of centre {args.center!r}")
    base = args.manifest.resolve().parent
    for col in ("swi", "cmb_mask", "brain_mask"):
        if col in ext:
            ext[col] = [str((base / v).resolve()) if isinstance(v, str) and v else v
                        for v in ext[col]]
    ext_manifest = args.work / f"external_{args.center}.csv"
    ext.to_csv(ext_manifest, index=False)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda s: one_seed(s, args, ext_manifest), args.seeds))
    keys = ["dice_mean", "recall_mean", "fp_per_patient", "froc_sensitivity_at_1fp"]
    spread = {k: [r["lesions_external"][k] for r in rows] for k in keys}
    # "segm": overlapping slice instances fused (CMB.EVAL_FUSE_OVERLAPS); "segm_raw": as
    # the model gives them (absent from logs of runs before the fused evaluation).
    spread["segm_AP50"] = [r["coco_external"].get("segm", {}).get("AP50") for r in rows]
    spread["segm_AP50_raw"] = [r["coco_external"].get("segm_raw", {}).get("AP50") for r in rows]
    result = {
        "benchmark": "seed stability of the detector config, external centre",
        "config": args.config_file, "opts": args.opts, "center": args.center,
        "cpu_procs": args.cpu_procs, "cpu_count": os.cpu_count(), "machine": platform.platform(),
        "note": args.note,
        "diverged": [r["seed"] for r in rows if r["losses"]["all_losses_finite"] is False],
        "losses_unknown": [r["seed"] for r in rows if r["losses"]["all_losses_finite"] is None],
        "per_seed": rows, "across_seeds": spread,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.output)
    print(json.dumps(spread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
