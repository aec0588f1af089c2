#!/usr/bin/env python
"""Write MIL lesion bags (one .npz per patient + index.csv) from volume predictions.

Examples::

    python tools/write_bags.py --pred output/predict_oof \\
        --manifest datasets/synthetic/manifest.csv --output output/bags \\
        --source out-of-fold --workers 2
    python tools/write_bags.py --manifest datasets/synthetic/manifest.csv \\
        --output output/bags_gt --source ground-truth

``--pred`` holds ``<patient_id>/cmb_pred.nii.gz`` and ``<patient_id>/lesions.csv``
(DESIGN.md contract 3); ``--source`` records how those predictions were made
(``in-fold``: by a model that saw the patient in training; ``out-of-fold``: by a model
that did not) and is written to the index as ``bag_source``. ``ground-truth`` builds
oracle bags from the manifest's ``cmb_mask`` and needs no ``--pred``. See
detection/bags.py for the features and crops.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pred", default=None,
                    help="prediction folder (<patient_id>/cmb_pred.nii.gz + lesions.csv)")
    ap.add_argument("--manifest", required=True, help="manifest CSV, or an nnU-Net-style folder")
    ap.add_argument("--output", required=True, help="bag folder (bags + index.csv)")
    ap.add_argument("--source", choices=("in-fold", "out-of-fold", "ground-truth"),
                    default="in-fold",
                    help="how the predictions were made (default %(default)s; prefer out-of-fold "
                         "for development bags)")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes")
    ap.add_argument("--crop-mm", type=float, default=16.0,
                    help="crop side in mm (default %(default)s)")
    ap.add_argument("--crop-px", type=int, default=32,
                    help="crop side in pixels (default %(default)s)")
    ap.add_argument("--context-offset", type=int, default=1,
                    help="k: crop channels are slices z-k, z, z+k (default %(default)s)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the bags; exit status 2 on bad input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("write_bags")
    if args.source != "ground-truth" and not args.pred:
        log.error("--pred is required unless --source ground-truth")
        return 2
    from detection.bags import write_bags
    from detection.data.volume import CohortError

    try:
        index = write_bags(
            args.pred,
            args.manifest,
            args.output,
            source=args.source,
            workers=args.workers,
            progress=not args.quiet,
            crop_mm=args.crop_mm,
            crop_px=args.crop_px,
            context_offset=args.context_offset,
        )
    except CohortError as exc:
        log.error("%s", exc)
        return 2
    log.info("index: %s", index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
