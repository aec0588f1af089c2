#!/usr/bin/env python
"""Train and evaluate the MIL CSVD classifier on lesion bags.

Patient-level stratified k-fold CV on the development centres, a final model on all
of them, and evaluation on the external centre(s); writes predictions.csv,
baseline_predictions.csv, attention.csv, metrics.json, ROC / confusion PNGs and
model/model.pth + model.json into --output. See mil/train.py.

Examples:
    python tools/train_mil.py --index bags/index.csv --external-center C --output output/mil
    python tools/train_mil.py --synthetic-demo --output output/mil_demo \
        --config configs/mil/quick_test.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "mil" / "gated_attention.yaml"


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--index", type=Path, help="bag index CSV (mil/bagio.py format)")
    src.add_argument("--synthetic-demo", action="store_true",
                     help="generate a synthetic bag set (centres A, B dev; C external) first")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="MIL config YAML")
    p.add_argument("--output", type=Path, required=True, help="output folder")
    p.add_argument("--external-center", action="append", default=None, metavar="C",
                   help="held-out centre (repeatable); overrides the config")
    p.add_argument("--dev-center", action="append", default=None, metavar="C",
                   help="development centre (repeatable); default: all non-external")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-folds", type=int, default=None)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--n-bootstrap", type=int, default=None)
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=None,
                   help="processes training the fold / ensemble-member models side by side")
    p.add_argument("--synthetic-patients", type=int, default=80,
                   help="patients per centre for --synthetic-demo")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="further config overrides, values parsed as YAML")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from mil.train import load_config, parse_overrides, train_cv

    overrides = parse_overrides(args.opts)
    for key, val in (("seed", args.seed), ("n_folds", args.n_folds),
                     ("max_epochs", args.max_epochs), ("n_bootstrap", args.n_bootstrap),
                     ("num_threads", args.num_threads), ("workers", args.workers),
                     ("external_centers", args.external_center),
                     ("dev_centers", args.dev_center)):
        if val is not None:
            overrides[key] = val
    index = args.index
    if args.synthetic_demo:
        from mil.synthetic_bags import write_synthetic_bags

        n = args.synthetic_patients
        index = write_synthetic_bags(
            args.output / "synthetic_bags", {"A": n, "B": n, "C": max(n // 2, 12)},
            seed=overrides.get("seed", 0),
        )
        overrides.setdefault("external_centers", ["C"])
    cfg = load_config(args.config, overrides)
    metrics = train_cv(index, args.output, cfg)
    summary = {}
    for split in ("cv", "external"):
        if metrics.get(split):
            summary[split] = {
                who: {k: (metrics[split][who] or {}).get(k)
                      for k in ("n", "auc_weighted", "accuracy", "f1_weighted")}
                for who in ("model", "baseline")
            }
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
