#!/usr/bin/env python
"""Detector throughput: training iterations/s and inference slices/s (CPU or GPU).

Trains ``--iters`` iterations of ``--config-file`` on ``cmb_dev`` of an export (timing
from Detectron2's per-iteration timer, first iterations excluded) and runs inference on
``--slices`` exported external slices, one at a time (``DefaultPredictor``) and batched
(``VolumePredictor``'s path). With ``--cpu-procs N`` the training is also timed in N
data-parallel CPU processes (``tools/train_net.py --cpu-procs``), in the same run; the
slices per second of both are compared. Writes a JSON result.

    python benchmarks/bench_detector.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml \\
        --data-root output/demo/coco --iters 60 --cpu-procs 2 \\
        --output benchmarks/results/detector_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401
from detection.distributed import launch_cpu  # noqa: E402
from detection.engine import Trainer, setup_cfg  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402


def bench_training(cfg, iters: int, skip: int = 5) -> dict:
    """Median seconds per training iteration over ``iters`` iterations."""
    with tempfile.TemporaryDirectory() as out:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.OUTPUT_DIR = out
        cfg.SOLVER.MAX_ITER = iters
        cfg.SOLVER.CHECKPOINT_PERIOD = 10**9
        cfg.TEST.EVAL_PERIOD = 0
        cfg.DATASETS.TEST = ()  # EvalHook would otherwise evaluate after the last iteration
        cfg.freeze()
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        times = trainer.storage.history("time").values()
        per_iter = [t for t, _ in times][skip:]
    med = float(np.median(per_iter))
    return {"iterations": iters, "s_per_iter_median": round(med, 4),
            "iter_per_s": round(1.0 / med, 3), "wall_s": round(wall, 1),
            "images_per_batch": cfg.SOLVER.IMS_PER_BATCH,
            "images_per_s": round(cfg.SOLVER.IMS_PER_BATCH / med, 2)}


def _data_parallel_worker(config_file: str, opts: list[str], iters: int, out: str) -> None:
    """One process of the data-parallel timing; rank 0 writes the result to ``out``."""
    import detectron2.utils.comm as comm

    cfg = setup_cfg(config_file, opts)
    cfg.freeze()
    res = bench_training(cfg, iters)
    if comm.is_main_process():
        Path(out).write_text(json.dumps(res))


def bench_training_data_parallel(config_file: str, opts: list[str], iters: int,
                                 procs: int) -> dict:
    """:func:`bench_training` in ``procs`` single-thread CPU processes (gloo)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        launch_cpu(_data_parallel_worker, procs, args=(config_file, opts, iters, str(out)))
        if not out.is_file():
            raise RuntimeError("the data-parallel timing wrote no result")
        return {"processes": procs, **json.loads(out.read_text())}


@torch.inference_mode()
def bench_inference(cfg, files: list[str], batch: int) -> dict:
    """Slices/s: DefaultPredictor one slice at a time vs batched raw inference."""
    predictor = DefaultPredictor(cfg)
    model = predictor.model
    imgs = [cv2.imread(f, cv2.IMREAD_COLOR) for f in files]  # BGR
    predictor(imgs[0])  # warm-up
    t0 = time.perf_counter()
    for im in imgs:
        predictor(im)
    single = time.perf_counter() - t0

    def to_input(im):
        rgb = im[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else im
        return {"image": torch.as_tensor(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
                "height": im.shape[0], "width": im.shape[1]}

    model([to_input(imgs[0])])
    t0 = time.perf_counter()
    for s in range(0, len(imgs), batch):
        out = model.inference([to_input(im) for im in imgs[s:s + batch]], do_postprocess=False)
        if cfg.MODEL.DEVICE.startswith("cuda"):
            [o.to("cpu") for o in out]
    batched = time.perf_counter() - t0
    return {"slices": len(imgs), "image_hw": list(imgs[0].shape[:2]),
            "single_slices_per_s": round(len(imgs) / single, 2),
            "batched_slices_per_s": round(len(imgs) / batched, 2), "batch_size": batch}


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--data-root", required=True, help="COCO export folder")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cpu-procs", type=int, default=1,
                   help="also time training in N data-parallel CPU processes")
    p.add_argument("--output", default="benchmarks/results/detector.json")
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.cpu_procs < 1:
        p.error(f"--cpu-procs must be >= 1, got {args.cpu_procs}")
    setup_logger(name="cmb")
    cfg = setup_cfg(args.config_file, ["CMB.DATA_ROOT", args.data_root, *args.opts])
    cfg.freeze()
    result = {"config": args.config_file, "device": cfg.MODEL.DEVICE,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "machine": platform.platform(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    result["training"] = bench_training(cfg, args.iters)
    if args.cpu_procs > 1:
        dp = bench_training_data_parallel(
            args.config_file, ["CMB.DATA_ROOT", args.data_root, *args.opts], args.iters,
            args.cpu_procs)
        dp["images_per_s_vs_one_process"] = round(
            dp["images_per_s"] / result["training"]["images_per_s"], 2)
        result["training_data_parallel"] = dp
    records = DatasetCatalog.get("cmb_external")
    step = max(1, len(records) // args.slices)
    files = [r["file_name"] for r in records[::step]][: args.slices]
    result["inference"] = bench_inference(cfg, files, args.batch)
    result["load_average"] = os.getloadavg()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
