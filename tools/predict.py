#!/usr/bin/env python
"""Predict microbleeds for a whole cohort: one folder per patient (DESIGN.md contract 3).

    python tools/predict.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml \\
        --weights output/cmb_lite_cpu/model_final.pth --manifest M.csv --output DIR
    python tools/predict.py ... --num-gpus 4      # patients split across 4 processes

Each patient gets ``DIR/<patient_id>/{cmb_pred.nii.gz, lesions.csv, rejected.csv,
overlay.png}``; ``DIR/lesions_all.csv`` and ``DIR/predict_summary.csv`` gather the cohort.
Patients whose outputs already exist are skipped unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401
from detection.data.manifest import read_cohort  # noqa: E402
from detection.engine import setup_cfg  # noqa: E402
from detection.inference import VolumePredictor  # noqa: E402
from detection.lesions import AtlasRegionAssigner  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402
from detectron2.engine import launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

logger = logging.getLogger("cmb.predict")
OUTPUTS = ("cmb_pred.nii.gz", "lesions.csv")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="model_final.pth / model_best.pth")
    p.add_argument("--manifest", required=True, help="manifest CSV or nnU-Net folder")
    p.add_argument("--output", required=True)
    p.add_argument("--atlas", default="", help="MNI-space MARS atlas for finer regions")
    p.add_argument("--centers", nargs="*", default=None, help="only these centres")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-overlay", action="store_true", help="skip overlay PNGs")
    p.add_argument("--num-gpus", type=int, default=0, help="processes (one per GPU)")
    p.add_argument("--dist-url", default="auto")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def run(args: argparse.Namespace) -> None:
    """Predict this process's share of the patients (rank::world_size)."""
    setup_logger(name="cmb", distributed_rank=comm.get_rank())
    opts = list(args.opts)
    if args.num_gpus == 0:
        opts += ["MODEL.DEVICE", "cpu"]
    cfg = setup_cfg(args.config_file, opts)
    if args.num_gpus > 0:
        cfg.MODEL.DEVICE = "cuda"
    cohort = read_cohort(args.manifest)
    if args.centers:
        cohort = cohort[cohort["center"].isin(args.centers)]
    region_fn = AtlasRegionAssigner(args.atlas) if args.atlas else None
    predictor = VolumePredictor(cfg, args.weights, region_fn=region_fn)
    out_root = Path(args.output)
    rows = cohort.iloc[comm.get_rank()::comm.get_world_size()]
    bar = tqdm.tqdm(rows.itertuples(index=False), total=len(rows), desc="patients",
                    disable=not comm.is_main_process())
    for rec in bar:
        out = out_root / rec.patient_id
        if not args.overwrite and all((out / f).is_file() for f in OUTPUTS):
            continue
        pred = predictor(rec.swi, rec.brain_mask or None, patient_id=rec.patient_id)
        pred.write(out, overlay=not args.no_overlay)
    comm.synchronize()
    if comm.is_main_process():
        summarise(cohort, out_root)


def summarise(cohort: pd.DataFrame, out_root: Path) -> None:
    """Cohort-level ``lesions_all.csv`` and ``predict_summary.csv`` (counts per region)."""
    tables, summary = [], []
    for rec in cohort.itertuples(index=False):
        df = pd.read_csv(out_root / rec.patient_id / "lesions.csv")
        tables.append(df)
        counts = df["region"].value_counts() if len(df) else {}
        summary.append({"patient_id": rec.patient_id, "center": rec.center, "label": rec.label,
                        "n_lesions": len(df),
                        **{f"n_{r}": int(counts.get(r, 0))
                           for r in ("lobar", "deep", "infratentorial")}})
    pd.concat(tables, ignore_index=True).to_csv(out_root / "lesions_all.csv", index=False)
    pd.DataFrame(summary).to_csv(out_root / "predict_summary.csv", index=False)
    logger.info("predictions for %d patients in %s", len(summary), out_root)


def main(argv: list[str] | None = None) -> int:
    """Entry point: launch one process per GPU (or run in this process on CPU)."""
    args = build_parser().parse_args(argv)
    if args.num_gpus > 0 and not torch.cuda.is_available():
        raise SystemExit("--num-gpus needs CUDA; run without it on CPU")
    launch(run, max(args.num_gpus, 1), dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
