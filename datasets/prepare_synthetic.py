#!/usr/bin/env python
"""Generate the embedded synthetic multi-centre SWI cohort with cerebral microbleeds.

Examples::

    python datasets/prepare_synthetic.py --out datasets/synthetic
    python datasets/prepare_synthetic.py --out datasets/synthetic --patients-per-class 30 \\
        --centers A,B,C --seed 0 --workers 2 --preview
    python datasets/prepare_synthetic.py --out datasets/mine --centers A,B \\
        --center-profile configs/centers/example_1p5t.yaml

Writes ``manifest.csv``, ``lesions_gt.csv``, ``cohort.json`` and one folder per patient
(``swi.nii.gz``, ``cmb_mask.nii.gz``, ``brain_mask.nii.gz``, ``mimic_mask.nii.gz``) under
``--out`` (docs/CONTRACTS.md). ``--centers`` names built-in centres (A, B: development;
C: external) or centres defined by ``--center-profile`` files; without ``--centers`` the
built-ins are used, or only the profile files' centres when files are given.
The logic lives in ``detection/data/synthetic.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.data.synthetic import (  # noqa: E402
    CenterProfileError,
    generate_cohort,
    resolve_centers,
)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="output cohort folder")
    ap.add_argument("--patients-per-class", type=int, default=10,
                    help="patients per class (aSVD, CAA, CADASIL), spread evenly over the "
                         "centres (default %(default)s)")
    ap.add_argument("--centers", default=None,
                    help="comma-separated centre names (default: A,B,C, or the profile files')")
    ap.add_argument("--center-profile", action="append", default=[], metavar="FILE",
                    help="YAML/JSON centre profile (repeatable); see configs/centers/")
    ap.add_argument("--seed", type=int, default=0, help="cohort seed (default %(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes")
    ap.add_argument("--preview", action="store_true",
                    help="also write <out>/preview.png (axial slices with mask outlines)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and generate; exit status 2 on a bad centre profile."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.patients_per_class < 0:
        print("error: --patients-per-class must be >= 0", file=sys.stderr)
        return 2
    names = args.centers.split(",") if args.centers else None
    try:
        centers = resolve_centers(names, args.center_profile)
    except CenterProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = generate_cohort(
        args.out, patients_per_class=args.patients_per_class, centers=centers,
        seed=args.seed, workers=max(1, args.workers), progress=not args.quiet,
        preview=args.preview,
    )
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
