#!/usr/bin/env python
"""Seconds per MIL model fit: crops encoded for the real instances only, against every
padded position (the encoding until Nov 28 2026), same bags, same seed, same epochs.

A padded batch holds as many crop slots per bag as its largest bag; the demo's bags are
skewed (a third of the patients have 0-2 lesions, a few have 30-70), so most slots are
padding. The attention gives padding no weight, so the two encodings train the same
model up to float rounding; the JSON records how far the trained models' probabilities
on the external bags differ, and the fraction of crop slots that were real.

    python benchmarks/bench_mil.py --index output/demo/bags/index.csv --external-center C \\
        --epochs 20 --repeats 2 --output benchmarks/results/mil.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mil.bagio import read_index  # noqa: E402
from mil.dataset import load_patient_bags  # noqa: E402
from mil.model import GatedAttentionMIL  # noqa: E402
from mil.train import fit_model, load_config, predict  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mil" / "gated_attention.yaml"


def padded_embed_crops(self: GatedAttentionMIL, crops: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Baseline: the crop CNN over every slot of the padded batch, padding included."""
    b, n = mask.shape
    c = (crops.reshape(b * n, *crops.shape[2:]) - self.crop_mean) / self.crop_std
    return self.crop_encoder(c).reshape(b, n, -1)


def real_fraction(sizes: np.ndarray, batch_size: int, max_instances: int, epochs: int,
                  seed: int) -> float:
    """Share of crop slots holding a real crop over random batches (dropout ignored)."""
    rng = np.random.default_rng(seed)
    real = slots = 0
    n = np.minimum(sizes, max_instances)
    for _ in range(epochs):
        order = rng.permutation(len(n))
        for i in range(0, len(n), batch_size):
            b = n[order[i:i + batch_size]]
            real += int(b.sum())
            slots += max(1, int(b.max())) * len(b)
    return real / slots


def main(argv: list[str] | None = None) -> dict:
    """Time the fits and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", required=True, help="bag index CSV (tools/write_bags.py)")
    ap.add_argument("--external-center", nargs="+", default=["C"])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output", default="benchmarks/results/mil.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    index = read_index(args.index)
    dev_centres = sorted(set(index["center"]) - set(args.external_center))
    dev = [pb for pb in load_patient_bags(index, dev_centres) if pb.label >= 0]
    ext = load_patient_bags(index, args.external_center)
    if not dev or not ext:
        raise SystemExit(f"{args.index}: need labelled development bags and external bags")

    def fit(baseline: bool) -> tuple[float, np.ndarray]:
        patch = (mock.patch.object(GatedAttentionMIL, "embed_crops", padded_embed_crops)
                 if baseline else contextlib.nullcontext())
        with patch:
            t0 = time.perf_counter()
            res = fit_model(dev, None, cfg, epochs=args.epochs, seed=cfg.seed, progress=False)
            dt = time.perf_counter() - t0
            probs, _ = predict(res.model, ext)
        return dt, probs

    rows = []
    for r in range(args.repeats):  # alternate, so that machine load hits both alike
        tb, pb_ = fit(True)
        tc, pc = fit(False)
        rows.append({"repeat": r, "baseline_s": round(tb, 2), "candidate_s": round(tc, 2),
                     "speedup": round(tb / tc, 2),
                     "max_abs_prob_diff": float(np.abs(pb_ - pc).max()),
                     "same_argmax": bool((pb_.argmax(1) == pc.argmax(1)).all())})
        print(json.dumps(rows[-1]))
    sizes = np.array([pb.bag.n_instances for pb in dev])
    base = float(np.median([r["baseline_s"] for r in rows]))
    cand = float(np.median([r["candidate_s"] for r in rows]))
    result = {
        "benchmark": "MIL fit seconds: crop CNN on real instances vs every padded slot",
        "index": Path(args.index).name,
        "config": Path(args.config).name,
        "epochs": args.epochs,
        "batch_size": cfg.batch_size,
        "dev_bags": len(dev),
        "external_bags": len(ext),
        "instances_per_bag": {"median": float(np.median(sizes)), "max": int(sizes.max())},
        "real_slot_fraction": round(real_fraction(sizes, cfg.batch_size, cfg.max_instances,
                                                  50, 0), 3),
        "torch_threads": 1,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "load_average": list(os.getloadavg()),
        "runs": rows,
        "baseline_s_median": base,
        "candidate_s_median": cand,
        "speedup_median": round(base / cand, 2),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"speedup x{result['speedup_median']} ({base:.1f} s -> {cand:.1f} s per fit)")
    return result


if __name__ == "__main__":
    main()
