#!/usr/bin/env python
"""Export a cohort of SWI volumes to 2.5D PNG slices + COCO json for Detectron2.

Examples::

    python tools/export_coco.py --manifest datasets/synthetic/manifest.csv \\
        --out datasets/cmb_coco --external-center C --workers 2
    python tools/export_coco.py --manifest datasets/my_nnunet_folder --labels labels.csv \\
        --out datasets/my_coco --target-spacing 0 --slices all

Re-running skips patients whose outputs are up to date; ``--force`` re-exports all.
Writes ``images/``, ``annotations/{fold{k}_train,fold{k}_val,dev,external}.json``,
``splits.json`` and ``export_meta.json`` under ``--out`` (docs/CONTRACTS.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.data.export_coco import (  # noqa: E402
    DEFAULT_CONTEXT_OFFSET,
    DEFAULT_TARGET_SPACING,
    export_coco,
)
from detection.data.volume import CohortError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--manifest", required=True, help="manifest CSV, or an nnU-Net-style folder")
    ap.add_argument("--labels", default=None, help="labels CSV of an nnU-Net-style folder")
    ap.add_argument("--out", required=True, help="export folder")
    ap.add_argument("--context-offset", type=int, default=DEFAULT_CONTEXT_OFFSET,
                    help="k: channels are slices z-k, z, z+k (default %(default)s)")
    ap.add_argument("--target-spacing", type=float, default=DEFAULT_TARGET_SPACING,
                    help="in-plane spacing in mm; 0 keeps the native grid (default %(default)s)")
    ap.add_argument("--slices", choices=("brain", "all"), default="brain",
                    help="export slices with brain (or lesion) voxels, or all slices")
    ap.add_argument("--brain-margin-mm", type=float, default=-1.0,
                    help="set voxels farther than this (mm) from the brain mask to 0 "
                         "(skull strip; match the detector config's CMB.BRAIN_MARGIN_MM); "
                         "negative keeps the whole head (default %(default)s)")
    ap.add_argument("--bias-degree", type=int, default=0,
                    help="divide out a smooth intensity field (polynomial of this degree fitted "
                         "in the brain) before scaling; match CMB.BIAS_DEGREE; 0 = off")
    ap.add_argument("--percentiles", type=float, nargs=2, default=(0.0, 99.0),
                    metavar=("LOW", "HIGH"),
                    help="brain intensity percentiles mapped to 0..255; match the detector "
                         "config's CMB.INTENSITY_PERCENTILES (default %(default)s, as in the "
                         "configs; 1 99 for detectors trained before Nov 2026)")
    ap.add_argument("--folds", type=int, default=5, help="patient-level folds (0: none)")
    ap.add_argument("--external-center", action="append", default=[], metavar="C",
                    help="held-out centre (repeatable, or comma separated)")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes")
    ap.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    ap.add_argument("--nonfinite", choices=("error", "zero"), default="error",
                    help="NaN/inf voxels in an SWI: fail (default) or replace by 0 with a warning")
    ap.add_argument("--force", action="store_true", help="re-export up-to-date patients too")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the export; exit status 2 on bad cohort input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    centers = [c.strip() for arg in args.external_center for c in arg.split(",") if c.strip()]
    try:
        summary = export_coco(
            args.manifest,
            args.out,
            context_offset=args.context_offset,
            target_spacing=args.target_spacing,
            brain_margin_mm=args.brain_margin_mm,
            bias_degree=args.bias_degree,
            percentiles=tuple(args.percentiles),
            slices=args.slices,
            folds=args.folds,
            external_centers=centers,
            workers=args.workers,
            seed=args.seed,
            nonfinite=args.nonfinite,
            labels_csv=args.labels,
            force=args.force,
            progress=not args.quiet,
        )
    except CohortError as exc:
        logging.getLogger("export_coco").error("%s", exc)
        return 2
    print(
        f"{summary.out}: {summary.n_images} slices, {summary.n_annotations} annotations; "
        f"{len(summary.exported)} patient(s) exported, {len(summary.skipped)} up to date"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
