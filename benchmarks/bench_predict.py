#!/usr/bin/env python
"""Seconds per patient of ``VolumePredictor`` against the naive baseline, same model.

Baseline: Detectron2's ``DefaultPredictor`` on every slice of the volume, one slice at a
time, with its full-image mask pasting; its slice detections go through the same 3D
merging, rejection and lesion table. Candidate: ``VolumePredictor`` (brain slices only,
batched, masks pasted inside their boxes). Both include loading and preparing the
volume, both without the mirrored test-time pass (``CMB.INFER.TTA_HFLIP`` is forced
off: the baseline has none). The detections are compared: lesion counts, lesion centres
and the voxel Dice between the two label volumes. Both run on one thread (``OMP_NUM_THREADS=1``);
with ``--baseline-threads N`` the baseline is also timed with N torch threads.

With ``--workers N`` the candidate also runs the same patients the way
``tools/predict.py`` / ``tools/run_pipeline.py`` run a cohort: N single-thread processes,
one patient each at a time; its seconds per patient is the wall time over the patients.

    python benchmarks/bench_predict.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml \\
        --weights output/demo/detector/model_final.pth --manifest M --center C --patients 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401
from detection.data.export_coco import prepare_case  # noqa: E402
from detection.data.manifest import read_cohort  # noqa: E402
from detection.data.volume import load_case  # noqa: E402
from detection.engine import setup_cfg  # noqa: E402
from detection.inference import VolumePredictor  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402


def naive_patient(predictor: DefaultPredictor, vp: VolumePredictor, swi: str, brain: str | None,
                  pid: str):
    """Baseline: every slice, one at a time, DefaultPredictor; same 3D post-processing."""
    t0 = time.perf_counter()
    case = load_case(swi, None, brain or None, nonfinite=vp.params.nonfinite)
    prep = prepare_case(case, vp.params)
    detections = []
    for z in range(prep.images.shape[0]):
        # DefaultPredictor takes BGR and converts to the model's INPUT.FORMAT itself.
        inst = predictor(prep.rgb(z)[:, :, ::-1])["instances"].to("cpu")
        masks = list(inst.pred_masks.numpy()) if len(inst) else []
        detections.append((z, masks, inst.scores.numpy()))
    labels, table, _ = vp.to_lesions(prep, detections, case.swi, case.brain, pid)
    return time.perf_counter() - t0, labels, table, prep.images.shape[0]


def conv_floor(vp: VolumePredictor, swi: str, brain: str | None) -> dict:
    """Seconds the candidate's model spends in its convolutions alone on one patient.

    Every convolution (``Conv2d`` and ``ConvTranspose2d``: the backbone, FPN, RPN head and
    mask head) of ``vp.model`` is recorded with its input while the model runs each brain
    slice, and right after that slice the recorded convolutions are run again on their own
    (``F.conv2d`` / ``F.conv_transpose2d`` on the same tensors, in the model's memory
    layout) and timed. A predictor that runs this model on these slices and makes the
    same detections must compute at least these convolutions, so
    ``baseline seconds / these seconds`` bounds its speed-up on the same thread. Repeated
    on warm inputs, the convolutions run at least as fast as inside the model, so the
    bound is, if anything, too high.
    """
    import torch.nn.functional as F

    case = load_case(swi, None, brain or None, nonfinite=vp.params.nonfinite)
    prep = prepare_case(case, vp.params)
    calls: list[tuple[torch.nn.Module, torch.Tensor]] = []

    def record(module, inputs, _output):
        calls.append((module, inputs[0]))

    convs = [m for m in vp.model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    handles = [m.register_forward_hook(record) for m in convs]
    seconds = 0.0
    try:
        with torch.inference_mode():
            for z in prep.slice_indices:
                calls.clear()
                vp.model.inference([vp._to_input(prep.rgb(z))], do_postprocess=False)
                t0 = time.perf_counter()
                for m, x in calls:
                    if isinstance(m, torch.nn.ConvTranspose2d):
                        F.conv_transpose2d(x, m.weight, m.bias, m.stride, m.padding,
                                           m.output_padding, m.groups, m.dilation)
                    else:
                        F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation,
                                 m.groups)
                seconds += time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return {"conv_seconds": round(seconds, 2), "slices": len(prep.slice_indices)}


def compare(labels_a: np.ndarray, labels_b: np.ndarray, table_a, table_b) -> dict:
    """How far two predictions of one patient agree."""
    a, b = labels_a > 0, labels_b > 0
    denom = a.sum() + b.sum()
    dice = 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)
    ca = table_a[["x_mm", "y_mm", "z_mm"]].to_numpy()
    cb = table_b[["x_mm", "y_mm", "z_mm"]].to_numpy()
    max_shift = 0.0
    if len(ca) and len(ca) == len(cb):
        d = np.linalg.norm(ca[:, None] - cb[None], axis=-1)
        max_shift = float(d.min(axis=1).max())
    return {"n_lesions_baseline": int(len(table_a)), "n_lesions_candidate": int(len(table_b)),
            "voxel_dice": round(dice, 4), "max_centre_shift_mm": round(max_shift, 3),
            "identical_labels": bool(np.array_equal(labels_a, labels_b))}


_WORKER: dict = {}


def _worker_init(cfg, weights: str) -> None:
    torch.set_num_threads(1)
    _WORKER["vp"] = VolumePredictor(cfg, weights)


def _worker_predict(job: tuple[str, str, str]):
    swi, brain, pid = job
    pred = _WORKER["vp"](swi, brain or None, patient_id=pid)
    return pid, pred.labels_ras, pred.table


def cohort_run(cfg, weights: str, jobs: list[tuple[str, str, str]], workers: int):
    """Candidate as a cohort run: ``workers`` single-thread processes; wall seconds and
    each patient's (labels, table)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(cfg, weights)) as pool:
        pool.map(_worker_predict, jobs[:workers])  # warm-up: model load, first buffers
        t0 = time.perf_counter()
        out = pool.map(_worker_predict, jobs, chunksize=1)
        wall = time.perf_counter() - t0
    return wall, {pid: (lab, tab) for pid, lab, tab in out}


def main(argv: list[str] | None = None) -> int:
    """Run both predictors on the same patients and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--center", default=None, help="take patients of this centre")
    p.add_argument("--patients", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0,
                   help="also time the candidate as a cohort run with N processes")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="also time the baseline with N torch threads (what DefaultPredictor "
                        "uses on an N-core machine by default), the fair reference for a "
                        "cohort run in N processes")
    p.add_argument("--conv-floor", action="store_true",
                   help="also time the candidate model's convolutions alone on each patient: "
                        "the least any predictor of the same model and detections must "
                        "compute, and so the largest speed-up possible on one thread")
    p.add_argument("--output", default="benchmarks/results/predict.json")
    args = p.parse_args(argv)

    # One pass per slice on both sides (the baseline has no mirrored pass): the flip
    # test-time augmentation of the CPU config doubles the model time of any predictor.
    cfg = setup_cfg(args.config_file, ["MODEL.DEVICE", args.device,
                                       "MODEL.WEIGHTS", args.weights,
                                       "CMB.INFER.TTA_HFLIP", "False"])
    cohort = read_cohort(args.manifest)
    if args.center:
        cohort = cohort[cohort["center"] == args.center]
    cohort = cohort.head(args.patients)
    vp = VolumePredictor(cfg, args.weights)
    naive = DefaultPredictor(cfg)
    rows = []
    baseline_out = {}
    for rec in cohort.itertuples(index=False):
        # Warm-up excluded from timing: the first call of each allocates buffers.
        if not rows:
            naive_patient(naive, vp, rec.swi, rec.brain_mask, rec.patient_id)
            vp(rec.swi, rec.brain_mask or None, patient_id=rec.patient_id)
        t_base, lab_b, tab_b, n_all = naive_patient(naive, vp, rec.swi, rec.brain_mask,
                                                    rec.patient_id)
        baseline_out[rec.patient_id] = (lab_b, tab_b)
        threaded = {}
        if args.baseline_threads > 1:
            single = torch.get_num_threads()
            torch.set_num_threads(args.baseline_threads)
            try:
                if not rows:
                    naive_patient(naive, vp, rec.swi, rec.brain_mask, rec.patient_id)
                t_thr, lab_t, _, _ = naive_patient(naive, vp, rec.swi, rec.brain_mask,
                                                   rec.patient_id)
            finally:
                torch.set_num_threads(single)
            threaded = {"baseline_threads_s": round(t_thr, 2),
                        "baseline_threads_same_labels": bool(np.array_equal(lab_t, lab_b))}
        t0 = time.perf_counter()
        pred = vp(rec.swi, rec.brain_mask or None, patient_id=rec.patient_id)
        t_cand = time.perf_counter() - t0
        floor = {}
        if args.conv_floor:
            cf = conv_floor(vp, rec.swi, rec.brain_mask)
            floor = {"conv_floor_s": cf["conv_seconds"],
                     "max_speedup_one_thread": round(t_base / cf["conv_seconds"], 2)}
        row = {"patient_id": rec.patient_id, "slices_all": n_all, "slices_brain": pred.n_slices,
               "baseline_s": round(t_base, 2), "candidate_s": round(t_cand, 2),
               "speedup": round(t_base / t_cand, 2), **threaded, **floor,
               **compare(lab_b, pred.labels_ras, tab_b, pred.table)}
        rows.append(row)
        print(json.dumps(row))
    result = {
        "benchmark": "predict seconds per patient: VolumePredictor vs DefaultPredictor per slice",
        "config": args.config_file, "weights": Path(args.weights).name, "device": args.device,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "load_average": os.getloadavg(),
        "patients": rows,
        "mean_baseline_s": round(float(np.mean([r["baseline_s"] for r in rows])), 2),
        "mean_candidate_s": round(float(np.mean([r["candidate_s"] for r in rows])), 2),
    }
    result["speedup"] = round(result["mean_baseline_s"] / result["mean_candidate_s"], 2)
    if args.baseline_threads > 1:
        result["baseline_threads"] = args.baseline_threads
        result["mean_baseline_threads_s"] = round(
            float(np.mean([r["baseline_threads_s"] for r in rows])), 2)
    if args.conv_floor:
        result["mean_conv_floor_s"] = round(float(np.mean([r["conv_floor_s"] for r in rows])), 2)
        result["max_speedup_one_thread"] = round(
            result["mean_baseline_s"] / result["mean_conv_floor_s"], 2)
        bound = {"note": "the convolutions split perfectly over the processes, nothing else left"}
        if args.workers > 1:
            bound["workers"] = args.workers
            bound["vs_baseline"] = round(result["max_speedup_one_thread"] * args.workers, 2)
            if args.baseline_threads > 1:
                bound["vs_threaded_baseline"] = round(
                    result["mean_baseline_threads_s"] * args.workers
                    / result["mean_conv_floor_s"], 2)
        result["max_speedup_workers"] = bound
    if args.workers > 1:
        jobs = [(r.swi, r.brain_mask or "", r.patient_id) for r in cohort.itertuples(index=False)]
        wall, preds = cohort_run(cfg, args.weights, jobs, args.workers)
        same = [compare(baseline_out[pid][0], lab, baseline_out[pid][1], tab)
                for pid, (lab, tab) in preds.items()]
        per = wall / len(jobs)
        result["cohort_run"] = {
            "workers": args.workers, "patients": len(jobs), "wall_s": round(wall, 2),
            "seconds_per_patient": round(per, 2),
            "speedup_vs_baseline": round(result["mean_baseline_s"] / per, 2),
            **({"speedup_vs_threaded_baseline": round(result["mean_baseline_threads_s"] / per, 2)}
               if args.baseline_threads > 1 else {}),
            "identical_labels_all": all(c["identical_labels"] for c in same),
            "min_voxel_dice": min(c["voxel_dice"] for c in same),
        }
        print(json.dumps(result["cohort_run"]))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"speed-up x{result['speedup']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
