#!/usr/bin/env python
"""How much of the external centre's slice AP is lost to the centre shift: the detector
config trained with some of the external centre's own patients (the in-domain ceiling)
against a detector trained without them, both evaluated on the same held-out patients.

From a COCO export (``tools/run_pipeline.py`` / ``detection.data.export_coco``) it
writes ``<work>/coco``, the same images with two splits: ``dev`` = the export's
development patients plus the first ``--train-patients`` patients of ``--center``
(sorted by id), ``external`` = that centre's other patients. ``tools/train_net.py``
trains the config on it (Detectron2's COCO evaluation of ``external`` at the end of
training), and ``tools/train_net.py --eval-only`` evaluates ``--reference-weights`` (e.g.
the demo's detector, trained on the development centres alone) on the same patients.
A step whose output exists is not re-run.

    python benchmarks/bench_ceiling.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml \\
        --data-root output/demo/coco --center C --train-patients 20 \\
        --reference-weights output/demo/train/model_final.pth --cpu-procs 2 \\
        --work output/ceiling --output benchmarks/results/ceiling_C.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.fileio import copy_atomic, write_json_atomic  # noqa: E402

from bench_seeds import _run, add_run_args, coco_from_log, losses  # noqa: E402


def _subset(coco: dict, patients: set[str]) -> dict:
    images = [im for im in coco["images"] if im["patient_id"] in patients]
    ids = {im["id"] for im in images}
    return {**coco, "images": images,
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def write_split(src: Path, dst: Path, center: str, n_train: int) -> dict:
    """``dst``: ``src``'s images with ``dev`` = its development patients + the first
    ``n_train`` patients of ``center``, ``external`` = the rest of ``center``. Returns the
    patient lists and instance counts."""
    ann = src / "annotations"
    for name in ("dev.json", "external.json"):
        if not (ann / name).is_file():
            raise SystemExit(f"{ann / name}: missing; --data-root must be a COCO export")
    dev = json.loads((ann / "dev.json").read_text())
    ext = json.loads((ann / "external.json").read_text())
    patients = sorted({im["patient_id"] for im in ext["images"] if im.get("center") == center})
    if not patients:
        raise SystemExit(f"{ann / 'external.json'}: no image of centre {center!r}")
    if not 0 < n_train < len(patients):
        raise SystemExit(f"--train-patients must lie in [1, {len(patients) - 1}] for centre "
                         f"{center!r} ({len(patients)} patients), got {n_train}")
    train_c, test_c = set(patients[:n_train]), set(patients[n_train:])
    add = _subset(ext, train_c)
    new_dev = {**dev, "images": dev["images"] + add["images"],
               "annotations": dev["annotations"] + add["annotations"]}
    new_ext = _subset(ext, test_c)
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    for name in ("images", "patients"):
        link = dst / name
        if not link.exists():
            os.symlink((src / name).resolve(), link, target_is_directory=True)
    copy_atomic(src / "export_meta.json", dst / "export_meta.json")
    for name, data in (("dev", new_dev), ("external", new_ext)):
        write_json_atomic(dst / "annotations" / f"{name}.json", data, indent=None)
    dev_patients = sorted({im["patient_id"] for im in new_dev["images"]})
    write_json_atomic(dst / "splits.json",
                      {"n_folds": 0, "external_centers": [center], "external": sorted(test_c),
                       "dev": dev_patients}, indent=1)
    return {"train_patients_of_center": sorted(train_c), "test_patients": sorted(test_c),
            "dev_slices": len(new_dev["images"]), "dev_instances": len(new_dev["annotations"]),
            "test_slices": len(new_ext["images"]),
            "test_instances": len(new_ext["annotations"])}


#: slice-instance area bins (px) for :func:`hits_by_size`
AREA_BINS = ((0, 16), (16, 36), (36, 64), (64, 144), (144, None))


def hits_by_size(gt_json: Path, results_json: Path, min_score: float = 0.3) -> list[dict]:
    """Per reference-area bin: the share of reference slice instances that a prediction
    scoring >= ``min_score`` on the same slice overlaps with mask IoU >= 0.5 (hit), with
    0.1-0.5 (partial) or < 0.1 (miss), and the median predicted / reference area of the
    partial matches (> 1: drawn too big, < 1: too small)."""
    import numpy as np
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    gt = COCO(str(gt_json))
    preds: dict[int, list[dict]] = {}
    for r in json.loads(results_json.read_text()):
        if r["score"] >= min_score:
            preds.setdefault(r["image_id"], []).append(r)
    rows = []  # (area, best IoU, predicted / reference area of the best match)
    for img in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=img))
        if not anns:
            continue
        ref = [gt.annToRLE(a) for a in anns]
        det = [r["segmentation"] for r in preds.get(img, [])]
        if det:
            iou = np.asarray(mask_util.iou(det, ref, [0] * len(ref)))  # det x ref
            best, arg = iou.max(0), iou.argmax(0)
            ratio = [float(mask_util.area(det[j])) / max(float(mask_util.area(ref[k])), 1.0)
                     for k, j in enumerate(arg)]
        else:
            best, ratio = np.zeros(len(ref)), [float("nan")] * len(ref)
        rows += [(float(a["area"]), float(b), r) for a, b, r in zip(anns, best, ratio)]
    arr = np.asarray(rows, dtype=float).reshape(-1, 3)
    out = []
    for lo, hi in AREA_BINS:
        sel = arr[(arr[:, 0] >= lo) & ((arr[:, 0] < hi) if hi is not None else True)]
        partial = (sel[:, 1] >= 0.1) & (sel[:, 1] < 0.5)
        out.append({
            "area_px": [lo, hi], "n": int(len(sel)),
            "hit": round(float(np.mean(sel[:, 1] >= 0.5)), 3) if len(sel) else None,
            "partial": round(float(np.mean(partial)), 3) if len(sel) else None,
            "miss": round(float(np.mean(sel[:, 1] < 0.1)), 3) if len(sel) else None,
            "partial_area_ratio": (round(float(np.median(sel[partial, 2])), 2)
                                   if partial.any() else None)})
    return out


def main(argv: list[str] | None = None) -> int:
    """Build the split, train, evaluate the reference, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--data-root", type=Path, required=True, help="COCO export folder")
    p.add_argument("--center", required=True, help="the external centre")
    p.add_argument("--train-patients", type=int, default=20,
                   help="patients of the centre added to training (the first, by id)")
    p.add_argument("--reference-weights", type=Path, required=True,
                   help="a detector trained without the centre, evaluated on the same patients")
    p.add_argument("--seed", type=int, default=0)
    add_run_args(p, work="output/ceiling", output="benchmarks/results/ceiling.json")
    args = p.parse_args(argv)
    if args.cpu_procs < 1:
        p.error(f"--cpu-procs must be >= 1, got {args.cpu_procs}")
    if not args.reference_weights.is_file():
        raise SystemExit(f"{args.reference_weights}: no such weights file")
    work = args.work.resolve()
    split = write_split(args.data_root.resolve(), work / "coco", args.center,
                        args.train_patients)
    py = sys.executable
    t0 = time.perf_counter()
    train = work / "train"
    train.mkdir(parents=True, exist_ok=True)
    if not (train / "model_final.pth").is_file():
        _run([py, "tools/train_net.py", "--config-file", args.config_file,
              "--cpu-procs", str(args.cpu_procs), "CMB.DATA_ROOT", str(work / "coco"),
              "OUTPUT_DIR", str(train), "SEED", str(args.seed), *args.opts],
             work / "train_stdout.log")
    t_train = time.perf_counter() - t0
    ref = work / "reference"
    ref_log = work / "reference_eval.log"
    if not coco_from_log(ref_log):
        ref.mkdir(parents=True, exist_ok=True)
        _run([py, "tools/train_net.py", "--config-file", args.config_file, "--eval-only",
              "--cpu-procs", str(args.cpu_procs), "CMB.DATA_ROOT", str(work / "coco"),
              "OUTPUT_DIR", str(ref), "MODEL.WEIGHTS", str(args.reference_weights.resolve()),
              *args.opts], ref_log)
    in_domain, reference = coco_from_log(train / "log.txt"), coco_from_log(ref_log)
    if not in_domain or not reference:
        raise SystemExit(f"no COCO results in {train / 'log.txt'} or {ref_log}")
    result = {
        "benchmark": "in-domain ceiling: slice AP on held-out patients of one centre, with and "
                     "without some of its patients in training",
        "config": args.config_file, "opts": args.opts, "center": args.center,
        "seed": args.seed, "cpu_procs": args.cpu_procs, "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "note": args.note,
        "reference_weights": args.reference_weights.name,
        "train_seconds_this_run": round(t_train, 1), **split,
        "losses": losses(train / "metrics.json", train / "log.txt"),
        "coco_in_domain": in_domain, "coco_reference": reference,
    }
    gt_json = work / "coco" / "annotations" / "external.json"
    found = {name: d / "inference" / "cmb_external" / "coco_instances_results.json"
             for name, d in (("in_domain", train), ("reference", ref))}
    if all(f.is_file() for f in found.values()):
        # Overlapping instances fused, as the "segm" AP; scores >= 0.3.
        result["hits_by_reference_area"] = {name: hits_by_size(gt_json, f)
                                            for name, f in found.items()}
    write_json_atomic(args.output, result)
    print(json.dumps({"in_domain": in_domain, "reference": reference}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
