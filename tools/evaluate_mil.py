#!/usr/bin/env python
"""Apply a trained MIL model to bags and report metrics (when labels exist).

Writes predictions.csv, baseline_predictions.csv, attention.csv, metrics.json and
ROC / confusion PNGs into --output. See mil/train.py:evaluate.

Example:
    python tools/evaluate_mil.py --model output/mil/model --index bags/index.csv \
        --center C --output output/mil_eval
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True,
                   help="model folder (model.pth + model.json) or the .pth file")
    p.add_argument("--index", type=Path, required=True, help="bag index CSV")
    p.add_argument("--output", type=Path, required=True, help="output folder")
    p.add_argument("--center", action="append", default=None, metavar="C",
                   help="only these centres (repeatable); default: all rows")
    p.add_argument("--fold-name", default="external",
                   help="value of the `fold` column and split name in metrics.json")
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from mil.train import evaluate

    metrics = evaluate(args.model, args.index, args.output, centers=args.center,
                       n_bootstrap=args.n_bootstrap, seed=args.seed, fold_name=args.fold_name)
    split = metrics[args.fold_name]
    summary = {who: {k: (split[who] or {}).get(k)
                     for k in ("n", "auc_weighted", "accuracy", "f1_weighted")}
               for who in ("model", "baseline")}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
