#!/usr/bin/env python
"""The whole study on the embedded synthetic cohort (what ``make demo`` runs).

Stages, each in its own folder under ``--output`` (default ``output/demo``)::

    cohort    synthetic cohort (centres A, B: development; C: external)  cohort/
    export    2.5D COCO export                                           coco/
    train     Mask R-CNN from scratch (a tools/train_net.py subprocess)  train/
    predict   every patient's volume -> 3D lesions                       predict/
    evaluate  lesion metrics, external and development separately        lesions/
    bags      MIL bags from the detections                               bags/
    mil       MIL cross-validation + external test, rule-based baseline  mil/
    report    report.md, figures/, metrics.json                          (top level)

Examples::

    python tools/run_pipeline.py                              # = make demo
    python tools/run_pipeline.py --skip-train --weights output/x/model_final.pth
    python tools/run_pipeline.py --force mil --stop-after report
    python tools/run_pipeline.py --output /tmp/tiny --patients-per-class 2 \\
        --config-file configs/quick_schedules/cmb_R_18_FPN_instant_test.yaml \\
        --mil-config configs/mil/quick_test.yaml SOLVER.MAX_ITER 4

Up to date: a stage is skipped when ``.pipeline/<stage>.json`` (its stamp) records the
same parameters and the same stamps of the stages it reads, and its outputs exist. A
stage that runs gets a new stamp token, so every stage downstream of it runs too. A
stage's stamp is removed before it starts and written only after it finished and its
outputs were checked, so a failed or interrupted stage is never marked done; its next
attempt with unchanged inputs resumes (keeps finished patients / the last training
checkpoint), otherwise the stage's folder is cleared first. Trailing ``KEY VALUE``
pairs override Detectron2 config keys for training and prediction.

Writes ``pipeline.log`` and a stage-by-stage summary (also in ``metrics.json`` and
``report.md``); exit status 1 names the stage that failed, 2 flags bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from detection.report import (  # noqa: E402
    RunLayout,
    copy_atomic,
    update_stage_timings,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger("cmb.pipeline")
#: Tracebacks of failed stages: into pipeline.log, kept off the console.
_trace_logger = logging.getLogger("cmb.pipeline.traceback")

STAGES: tuple[str, ...] = ("cohort", "export", "train", "predict", "evaluate", "bags", "mil",
                           "report")
DEFAULT_CONFIG = "configs/CMB-RCNN-Lite-FPN-cpu.yaml"
DEFAULT_MIL_CONFIG = "configs/mil/gated_attention.yaml"
BUILTIN_CENTERS: tuple[str, ...] = ("A", "B", "C")
STAMP_VERSION = 1
#: Bag crops and features (detection/bags.py); predict_patient reads them from bags_meta.json.
BAG_PARAMS: dict[str, Any] = {"crop_mm": 16.0, "crop_px": 32, "context_offset": 1,
                              "shell_mm": 3.0}


# ============================================================================ stage runner


class StageFailed(RuntimeError):
    """A stage could not produce its outputs; the message says which file or step."""


@dataclass
class StageResult:
    """What happened to one stage in this invocation."""

    stage: str
    status: str  # ran | up to date | failed | not run
    seconds: float | None = None  # time spent in this invocation
    built_seconds: float | None = None  # time the outputs took when they were built
    note: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass
class Stage:
    """One pipeline step.

    ``params`` (a mapping, or a callable evaluated when the stage is reached) and the
    stamp tokens of ``deps`` decide whether the stage is up to date; ``outputs`` must
    exist afterwards; ``dirs`` / ``files`` are the stage's own outputs, removed before
    a fresh (non-resumed) run.
    """

    name: str
    run: Callable[[StageContext], Any]
    params: Mapping[str, Any] | Callable[[], Mapping[str, Any]] = field(default_factory=dict)
    deps: tuple[str, ...] = ()
    outputs: tuple[Path, ...] = ()
    dirs: tuple[Path, ...] = ()
    files: tuple[Path, ...] = ()
    description: str = ""


@dataclass
class StageContext:
    """Handed to a stage's ``run``."""

    stage: Stage
    resume: bool  # an earlier attempt with the same inputs failed: reuse finished parts
    reason: str  # why the stage runs
    results: list[StageResult]  # the stages before it in this invocation

    def summaries(self) -> list[dict[str, Any]]:
        """Earlier stages' results as dicts (for the report)."""
        return [r.as_dict() for r in self.results]


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if json.dumps(old.get(k), sort_keys=True, default=str)
            != json.dumps(new.get(k), sort_keys=True, default=str)]


def _remove(path: Path, root: Path | None) -> None:
    """Remove a stage output (file or folder); refuses anything outside ``root``."""
    path = Path(path)
    if root is not None:
        r, p = Path(root).resolve(), path.resolve()
        if p == r or r not in p.parents:
            raise StageFailed(f"refusing to clear {path}: not inside the run folder {root}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run_stages(
    stages: Sequence[Stage],
    state_dir: str | os.PathLike,
    *,
    force: Sequence[str] = (),
    stop_after: str | None = None,
    root: str | os.PathLike | None = None,
) -> list[StageResult]:
    """Run ``stages`` in order, skipping those that are up to date (module docstring).

    Args:
        stages: the stages; ``deps`` must name earlier stages.
        state_dir: where stamps (``<stage>.json``) and in-progress markers live.
        force: stage names to run even when up to date (``"all"`` for every stage).
        stop_after: stop after this stage (later stages are reported as not run).
        root: stage outputs may only be cleared inside this folder.

    Returns:
        One :class:`StageResult` per stage; a failed stage has ``status == "failed"``
        and ``error`` set, and the stages after it are ``not run``.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate stage names in {names}")
    unknown = [f for f in force if f != "all" and f not in names]
    if unknown or (stop_after is not None and stop_after not in names):
        raise ValueError(f"unknown stage(s) {unknown or [stop_after]}; stages: {names}")
    for i, s in enumerate(stages):
        bad = [d for d in s.deps if d not in names[:i]]
        if bad:
            raise ValueError(f"stage {s.name!r} depends on {bad}, which do not come before it")
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    tokens: dict[str, str] = {}
    results: list[StageResult] = []
    stopped = failed = False
    for st in stages:
        if stopped or failed:
            results.append(StageResult(st.name, "not run",
                                       note="after --stop-after" if stopped else
                                       "an earlier stage failed"))
            continue
        stamp_path, marker_path = state / f"{st.name}.json", state / f"{st.name}.running.json"
        t0 = time.perf_counter()
        try:
            params = dict(st.params() if callable(st.params) else st.params)
        except Exception as exc:
            msg = f"stage {st.name!r}: cannot determine its parameters: {exc}"
            logger.error("%s", msg)
            results.append(StageResult(st.name, "failed", time.perf_counter() - t0, error=msg))
            failed = True
            continue
        upstream = {d: tokens[d] for d in st.deps}
        key = _digest({"version": STAMP_VERSION, "params": params, "upstream": upstream})
        stamp = _read_json(stamp_path)
        reason = None
        if st.name in force or "all" in force:
            reason = "forced"
        elif stamp is None:
            reason = "never built" if not marker_path.exists() else "last attempt did not finish"
        elif stamp.get("key") != key:
            changed = _diff(stamp.get("params", {}), params)
            reran = [d for d in st.deps if stamp.get("upstream", {}).get(d) != upstream[d]]
            parts = ([f"parameters changed: {', '.join(changed)}"] if changed else []) + (
                [f"upstream re-ran: {', '.join(reran)}"] if reran else [])
            reason = "; ".join(parts) or "stamp format changed"
        else:
            missing = [str(p) for p in st.outputs if not Path(p).exists()]
            if missing:
                reason = f"output missing: {missing[0]}"
        if reason is None:
            tokens[st.name] = stamp["token"]
            logger.info("[%s] up to date (built %s in %.1f s)", st.name,
                        stamp.get("finished", "?"), stamp.get("seconds", float("nan")))
            results.append(StageResult(st.name, "up to date", 0.0, stamp.get("seconds"),
                                       note=stamp.get("note", "")))
            if stop_after == st.name:
                stopped = True
            continue
        marker = _read_json(marker_path)
        resume = bool(marker and marker.get("key") == key and reason != "forced")
        logger.info("[%s] running (%s)%s%s", st.name, reason,
                    "; resuming the unfinished attempt" if resume else "",
                    f": {st.description}" if st.description else "")
        stamp_path.unlink(missing_ok=True)
        ctx = StageContext(st, resume, reason, list(results))
        try:
            if not resume:
                for p in (*st.dirs, *st.files):
                    _remove(Path(p), Path(root) if root else None)
            write_json_atomic(marker_path, {"stage": st.name, "key": key, "params": params,
                                            "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
            note = st.run(ctx)
            missing = [str(p) for p in st.outputs if not Path(p).exists()]
            if missing:
                raise StageFailed(f"finished without writing {', '.join(missing)}")
        except (Exception, KeyboardInterrupt) as exc:
            dt = time.perf_counter() - t0
            kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
            msg = f"stage {st.name!r} failed after {dt:.1f} s ({kind}): {exc}"
            logger.error("%s", msg)
            _trace_logger.error("traceback of stage %s", st.name, exc_info=True)
            where = ", ".join(str(d) for d in st.dirs)
            logger.error("[%s] not marked done%s; the next run retries it (finished parts "
                         "are reused while its inputs stay the same)", st.name,
                         f" (partial outputs in {where})" if where else "")
            results.append(StageResult(st.name, "failed", dt, error=msg))
            failed = True
            if isinstance(exc, KeyboardInterrupt):
                raise
            continue
        dt = time.perf_counter() - t0
        token = uuid.uuid4().hex
        write_json_atomic(stamp_path, {
            "stage": st.name, "key": key, "token": token, "params": params,
            "upstream": upstream, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(dt, 2), "reason": reason, "resumed": resume,
            "note": note if isinstance(note, str) else "",
            "outputs": {str(p): Path(p).stat().st_size for p in st.outputs if Path(p).is_file()},
        })
        marker_path.unlink(missing_ok=True)
        tokens[st.name] = token
        logger.info("[%s] done in %.1f s", st.name, dt)
        results.append(StageResult(st.name, "ran", dt, dt,
                                   note=note if isinstance(note, str) else ""))
        if stop_after == st.name:
            stopped = True
    return results


def format_summary(results: Sequence[StageResult]) -> str:
    """A plain-text table of the stage results."""
    rows = [("stage", "status", "this run (s)", "when built (s)", "note")]
    for r in results:
        rows.append((r.stage, r.status,
                     "-" if r.seconds is None else f"{r.seconds:.1f}",
                     "-" if r.built_seconds is None else f"{r.built_seconds:.1f}",
                     (r.error or r.note or "")[:70]))
    total = sum(r.seconds or 0.0 for r in results)
    rows.append(("total", "", f"{total:.1f}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ============================================================================ the demo's stages


def _resolve(path: str | os.PathLike) -> Path:
    """An existing path as given (cwd-relative), else relative to the repository."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO / p).resolve()


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


PREDICT_OUTPUTS: tuple[str, ...] = ("cmb_pred.nii.gz", "lesions.csv", "overlay.png")
_PREDICTOR: Any = None


def _predict_init(config: str, weights: str) -> None:
    """Build this process's volume predictor (one intra-op thread: next to other processes,
    spinning OpenMP threads made inference several times slower)."""
    global _PREDICTOR
    import torch

    torch.set_num_threads(1)
    import detection  # noqa: F401  (compat shims before detectron2)
    from detection.engine import setup_cfg
    from detection.inference import VolumePredictor

    cfg = setup_cfg(config, [])
    # VolumePredictor raises the ROI heads' score filter to the lowest score it keeps
    # (CMB.INFER.CANDIDATE_THRESH or SCORE_THRESH) itself.
    _PREDICTOR = VolumePredictor(cfg, weights)


def _predict_one(job: tuple[str, str, str, str]) -> tuple[str, str, str | None]:
    """Predict and write one patient; returns ``(patient_id, swi, error or None)``."""
    pid, swi, brain, out = job
    try:
        pred = _PREDICTOR(swi, brain or None, patient_id=pid)
        pred.write(out, overlay=True)
    except Exception as exc:  # reported by the parent with the patient's files
        return pid, swi, f"{type(exc).__name__}: {exc}"
    return pid, swi, None


class Demo:
    """The demo's stages over one run folder (:class:`detection.report.RunLayout`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.L = RunLayout(Path(args.output).resolve())
        self.config_file = _resolve(args.config_file)
        self.mil_config = _resolve(args.mil_config)
        self.weights = _resolve(args.weights) if args.weights else None
        self.external = [args.external_center]
        self.development = [c for c in BUILTIN_CENTERS if c not in self.external]
        self._cfg = None

    # ------------------------------------------------------------------ helpers
    def train_opts(self) -> list[str]:
        """Detectron2 overrides of the run (user opts, then the run's own paths and seed)."""
        return [*self.args.opts, "CMB.DATA_ROOT", str(self.L.coco), "OUTPUT_DIR",
                str(self.L.train), "SEED", str(self.args.seed)]

    def cfg(self):
        """The resolved detector config (``--config-file`` + opts), built once."""
        if self._cfg is None:
            import detection  # noqa: F401  (compat shims before detectron2)
            from detection.engine import setup_cfg

            if not self.config_file.is_file():
                raise StageFailed(f"config file not found: {self.config_file}")
            self._cfg = setup_cfg(self.config_file, self.train_opts())
        return self._cfg

    def cohort(self):
        """The run's validated manifest (absolute paths)."""
        from detection.data.manifest import read_cohort

        return read_cohort(self.L.manifest)

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        """The eight stages with their parameters, dependencies and outputs."""
        a, L = self.args, self.L
        return [
            Stage("cohort", self.run_cohort,
                  {"patients_per_class": a.patients_per_class, "seed": a.seed,
                   "centers": list(BUILTIN_CENTERS)},
                  outputs=(L.manifest,), dirs=(L.cohort,),
                  description="synthetic SWI cohort"),
            Stage("export", self.run_export, self.export_params, deps=("cohort",),
                  outputs=(L.coco / "splits.json", L.coco / "annotations" / "dev.json"),
                  dirs=(L.coco,), description="2.5D COCO export"),
            Stage("train", self.run_train, self.train_params, deps=("export",),
                  outputs=(L.weights, L.config), dirs=(L.train,),
                  description="Mask R-CNN training" if not a.skip_train
                  else f"reuse weights {self.weights}"),
            Stage("predict", self.run_predict, {"overlay": True}, deps=("cohort", "train"),
                  outputs=(L.predict / "lesions_all.csv", L.predict / "predict_summary.csv"),
                  dirs=(L.predict,), description="volume inference, all patients"),
            Stage("evaluate", self.run_evaluate,
                  {"match_mm": 5.0, "external": self.external},
                  deps=("cohort", "predict"),
                  outputs=(L.lesion_split("external") / "metrics.json",
                           L.lesion_split("development") / "metrics.json"),
                  dirs=(L.lesions,), description="lesion metrics"),
            Stage("bags", self.run_bags,
                  {"source": "in-fold", "external": self.external, **BAG_PARAMS},
                  deps=("cohort", "predict"), outputs=(L.bag_index,), dirs=(L.bags,),
                  description="MIL bags from the detections"),
            Stage("mil", self.run_mil, self.mil_params, deps=("bags",),
                  outputs=(L.mil / "metrics.json", L.mil / "predictions.csv",
                           L.mil_model / "model.pth"),
                  dirs=(L.mil,), description="MIL cross-validation and external test"),
            Stage("report", self.run_report,
                  {"external": self.external, "n_overlays": a.n_overlays, "version": 1},
                  deps=("cohort", "train", "predict", "evaluate", "bags", "mil"),
                  outputs=(L.report, L.metrics), dirs=(L.figures,),
                  files=(L.report, L.metrics), description="report.md and metrics.json"),
        ]

    def export_params(self) -> dict[str, Any]:
        """Export parameters: how the detector config prepares slices
        (``detection.config.export_params``), the folds, the external centres, the seed."""
        from detection.config import EXPORT_PARAM_KEYS, export_params

        cfg = self.cfg()
        centers = self.cohort()["center"].astype(str)
        n_dev = int((~centers.isin(self.external)).sum())
        params = export_params(cfg).as_dict()
        return {**{k: params[k] for k in EXPORT_PARAM_KEYS},
                # patient folds for users' CV runs (the demo trains on all of cmb_dev)
                "folds": 5 if n_dev >= 10 else 0,
                "external": self.external, "seed": self.args.seed}

    def train_params(self) -> dict[str, Any]:
        """The resolved config (hash) and, with ``--skip-train``, the weights file."""
        cfg = self.cfg()
        p: dict[str, Any] = {"config": _digest(cfg.dump()),
                             "config_file": str(self.config_file),
                             "opts": list(self.args.opts)}
        if self.args.skip_train:
            if self.weights is None or not self.weights.is_file():
                raise StageFailed(f"--weights {self.args.weights}: file not found")
            p["mode"] = "reuse"
            p["weights"] = _file_stamp(self.weights)
        else:
            p["mode"] = "train"
            procs = self.train_procs()
            if procs > 1:  # the detector depends on how the batch is split
                p["cpu_procs"] = procs
        return p

    def train_procs(self) -> int:
        """Data-parallel CPU training processes (``--train-procs``; 1 on a GPU)."""
        if not str(self.cfg().MODEL.DEVICE).startswith("cpu"):
            return 1
        return max(1, int(self.args.train_procs))

    def mil_params(self) -> dict[str, Any]:
        """The resolved MIL config, less the keys that do not change its results (threads,
        worker processes: every model seeds itself), so ``--workers`` alone re-runs nothing."""
        params = dataclasses.asdict(self.mil_cfg())
        for key in ("num_threads", "workers"):
            params.pop(key, None)
        return params

    def mil_cfg(self):
        """MIL config: ``--mil-config`` + the run's external centre and seed + ``--mil-opt``."""
        from mil.train import load_config, parse_overrides

        if not self.mil_config.is_file():
            raise StageFailed(f"MIL config not found: {self.mil_config}")
        over: dict[str, Any] = {"external_centers": self.external, "seed": self.args.seed}
        over.update(parse_overrides(self.args.mil_opt))
        base = load_config(self.mil_config, over)
        if base.num_threads is None:
            # One thread unless asked otherwise: measured 5x faster than torch's default
            # next to other processes (the MIL network is small).
            over["num_threads"] = 1
        import yaml

        if "workers" not in over and "workers" not in (
                yaml.safe_load(self.mil_config.read_text()) or {}):
            # The fold / member models train side by side in --workers processes.
            over["workers"] = max(1, int(self.args.workers))
        return load_config(self.mil_config, over)

    # ------------------------------------------------------------------ 1 cohort
    def run_cohort(self, ctx: StageContext) -> str:
        """Generate the synthetic cohort."""
        from detection.data.synthetic import generate_cohort

        manifest = generate_cohort(self.L.cohort, patients_per_class=self.args.patients_per_class,
                                   centers=BUILTIN_CENTERS, seed=self.args.seed,
                                   workers=max(1, self.args.workers), progress=True)
        n = sum(1 for _ in open(manifest)) - 1
        return f"{n} patients"

    # ------------------------------------------------------------------ 2 export
    def run_export(self, ctx: StageContext) -> str:
        """COCO export with the detector config's spacing / context."""
        from detection.data.export_coco import export_coco

        p = self.export_params()
        s = export_coco(self.L.manifest, self.L.coco, context_offset=p["context_offset"],
                        target_spacing=p["target_spacing"], folds=p["folds"],
                        brain_margin_mm=p["brain_margin_mm"],
                        bias_degree=p["bias_degree"], percentiles=p["percentiles"],
                        external_centers=self.external, workers=max(1, self.args.workers),
                        seed=self.args.seed, progress=True)
        return f"{s.n_images} slices, {s.n_annotations} annotations"

    # ------------------------------------------------------------------ 3 train
    def run_train(self, ctx: StageContext) -> str:
        """Train in a subprocess (Detectron2's setup is process-global), or copy weights."""
        L = self.L
        L.train.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg()
        write_text_atomic(L.config, cfg.dump())
        if self.args.skip_train:
            assert self.weights is not None
            copy_atomic(self.weights, L.weights)
            return f"weights reused from {self.weights}"
        cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
               str(self.config_file)]
        if ctx.resume and (L.train / "last_checkpoint").is_file():
            cmd.append("--resume")
        if self.train_procs() > 1:
            cmd += ["--cpu-procs", str(self.train_procs())]
        cmd += self.train_opts()
        log_path = L.train / "train_stdout.log"
        logger.info("training: %s (log: %s)", " ".join(cmd), log_path)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if str(cfg.MODEL.DEVICE).startswith("cpu"):
            # One intra-op thread: the light model's convolutions are small, and spinning
            # OpenMP threads made CPU iterations up to 40x slower next to other processes.
            env.setdefault("OMP_NUM_THREADS", "1")
        max_iter = int(cfg.SOLVER.MAX_ITER)
        from tqdm import tqdm

        tail: list[str] = []
        it_re = re.compile(r"\biter: (\d+)")
        with open(log_path, "w") as log, tqdm(total=max_iter, desc="train", unit="it") as bar:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, env=env, cwd=str(REPO))
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    tail = (tail + [line.rstrip()])[-25:]
                    m = it_re.search(line)
                    if m:
                        bar.update(max(0, min(int(m.group(1)) + 1, max_iter) - bar.n))
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            if rc == 0:
                bar.update(max_iter - bar.n)
        if rc != 0:
            raise StageFailed(f"tools/train_net.py exited with status {rc}; full log "
                              f"{log_path}; last lines:\n    " + "\n    ".join(tail[-12:]))
        if not L.weights.is_file():
            raise StageFailed(f"training finished but {L.weights} is missing (see {log_path})")
        write_text_atomic(L.config, cfg.dump())  # Detectron2 rewrote it; keep the run's own dump
        return f"{max_iter} iterations"

    # ------------------------------------------------------------------ 4 predict
    def run_predict(self, ctx: StageContext) -> str:
        """Volume inference for every patient (development: in-fold; external: unseen),
        ``--workers`` processes of one thread each."""
        import pandas as pd
        from tqdm import tqdm

        L = self.L
        cohort = self.cohort()
        L.predict.mkdir(parents=True, exist_ok=True)
        jobs, reused = [], 0
        for rec in cohort.itertuples(index=False):
            out = L.predict / str(rec.patient_id)
            if ctx.resume and all((out / f).is_file() for f in PREDICT_OUTPUTS):
                reused += 1
                continue
            jobs.append((str(rec.patient_id), str(rec.swi), str(rec.brain_mask or ""),
                         str(out)))
        workers = max(1, min(int(self.args.workers), len(jobs)))
        t0 = time.perf_counter()
        init = (str(L.config), str(L.weights))
        bar = tqdm(total=len(jobs), desc="predict", unit="patient")
        try:
            if not jobs:
                results, pool = iter(()), None
            elif workers == 1 or "fork" not in mp.get_all_start_methods():
                _predict_init(*init)
                results = map(_predict_one, jobs)
                pool = None
            else:
                # fork: workers inherit this process's modules (no re-import by name); no
                # torch op has run in this process, so no OpenMP pool is copied.
                pool = mp.get_context("fork").Pool(workers, _predict_init, init)
                results = pool.imap_unordered(_predict_one, jobs)
            for pid, swi, error in results:
                if error:
                    raise StageFailed(f"patient {pid} ({swi}): {error}")
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        tables, summary = [], []
        for rec in cohort.itertuples(index=False):
            pid = str(rec.patient_id)
            df = pd.read_csv(L.predict / pid / "lesions.csv", dtype={"patient_id": str})
            if len(df):
                tables.append(df)
            counts = df["region"].value_counts() if len(df) else {}
            summary.append({"patient_id": pid, "center": rec.center, "label": rec.label,
                            "n_lesions": len(df),
                            **{f"n_{r}": int(counts.get(r, 0))
                               for r in ("lobar", "deep", "infratentorial")}})
        all_df = (pd.concat(tables, ignore_index=True) if tables
                  else pd.read_csv(L.predict / str(cohort.iloc[0]["patient_id"]) / "lesions.csv"))
        write_text_atomic(L.predict / "lesions_all.csv", all_df.to_csv(index=False))
        write_text_atomic(L.predict / "predict_summary.csv",
                     pd.DataFrame(summary).to_csv(index=False))
        dt = time.perf_counter() - t0
        return (f"{len(cohort)} patients, {len(all_df)} lesions"
                + (f", {dt / len(jobs):.1f} s/patient wall ({workers} process(es))"
                   if jobs else "")
                + (f" ({reused} reused)" if reused else ""))

    # ------------------------------------------------------------------ 5 evaluate
    def run_evaluate(self, ctx: StageContext) -> str:
        """Lesion metrics of the external and (in-fold) development centres."""
        from detection.evaluation.lesions import evaluate_prediction_dir

        cohort = self.cohort()
        notes = []
        for split, centers in (("external", self.external), ("development", self.development)):
            sub = cohort[cohort["center"].astype(str).isin(centers)
                         & (cohort["cmb_mask"].astype(str) != "")]
            out = self.L.lesion_split(split)
            out.mkdir(parents=True, exist_ok=True)
            if sub.empty:
                raise StageFailed(f"no {split} patient with a cmb_mask (centres {centers}) "
                                  f"in {self.L.manifest}")
            man = out / "manifest.csv"
            cols = [c for c in ("patient_id", "center", "label", "swi", "cmb_mask", "brain_mask",
                                "age") if c in sub.columns]
            write_text_atomic(man, sub[cols].to_csv(index=False))
            res = evaluate_prediction_dir(self.L.predict, man, out)
            pp = res.metrics["per_patient"]
            notes.append(f"{split}: Dice {pp['dice']['mean']:.3f}, recall "
                         f"{pp['recall']['mean']:.3f}")
        return "; ".join(notes)

    # ------------------------------------------------------------------ 6 bags
    def run_bags(self, ctx: StageContext) -> str:
        """Bags from the detections; external rows re-labelled as unseen by the detector."""
        from detection.bags import write_bags

        import pandas as pd

        from mil.bagio import read_index

        L = self.L
        index = write_bags(L.predict, L.manifest, L.bags, source="in-fold",
                           workers=max(1, self.args.workers), progress=True, **BAG_PARAMS)
        # The external centre's detections come from a model that never saw the centre.
        df = pd.read_csv(index, dtype=str, keep_default_na=False)
        ext = df["center"].isin(self.external)
        df.loc[ext, "bag_source"] = "external-unseen"
        write_text_atomic(index, df.to_csv(index=False))
        df = read_index(index)
        return (f"{len(df)} bags ({int((~ext).sum())} in-fold development, {int(ext.sum())} "
                f"external), {int(df['n_instances'].sum())} lesions")

    # ------------------------------------------------------------------ 7 mil
    def run_mil(self, ctx: StageContext) -> str:
        """MIL cross-validation on the development centres, final model, external test."""
        from mil.train import train_cv

        m = train_cv(self.L.bag_index, self.L.mil, self.mil_cfg())
        ext = (m.get("external") or {}).get("model") or {}
        if not ext.get("n"):
            return "no external patients"
        return f"external AUC {ext.get('auc_weighted') or float('nan'):.3f}, " \
               f"accuracy {ext.get('accuracy') or float('nan'):.3f}"

    # ------------------------------------------------------------------ 8 report
    def run_report(self, ctx: StageContext) -> str:
        """report.md, figures/ and metrics.json."""
        from detection.report import build_report

        info = self.run_info()
        build_report(self.L, run_info=info, stages=ctx.summaries(),
                     external_centers=self.external, n_overlays=self.args.n_overlays)
        return str(self.L.report)

    def run_info(self) -> dict[str, Any]:
        """Parameters of this run (for the report)."""
        a = self.args
        return {"output": str(self.L.root), "patients_per_class": a.patients_per_class,
                "seed": a.seed, "workers": a.workers, "train_procs": a.train_procs,
                "config_file": _rel_repo(self.config_file),
                "mil_config": _rel_repo(self.mil_config),
                "external_center": a.external_center, "opts": list(a.opts),
                "mil_opts": list(a.mil_opt),
                "weights": str(self.weights) if a.skip_train else "trained in this run",
                "python": sys.version.split()[0]}


def _rel_repo(p: Path) -> str:
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="output/demo", help="run folder (default %(default)s)")
    ap.add_argument("--patients-per-class", type=int, default=30,
                    help="synthetic patients per class, spread over centres A, B, C "
                         "(default %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="cohort, folds, detector and MIL seed (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2,
                    help="processes for cohort, export, predict, bags and the MIL models "
                         "(one thread each) "
                         "(default %(default)s)")
    ap.add_argument("--train-procs", type=int, default=2,
                    help="data-parallel processes that train a CPU detector (tools/"
                         "train_net.py --cpu-procs; the CPU config is tuned for 2; changing "
                         "it retrains) (default %(default)s)")
    ap.add_argument("--config-file", default=DEFAULT_CONFIG,
                    help="Detectron2 config (default %(default)s)")
    ap.add_argument("--mil-config", default=DEFAULT_MIL_CONFIG,
                    help="MIL config (default %(default)s)")
    ap.add_argument("--mil-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="MIL config override (repeatable), e.g. max_epochs=5")
    ap.add_argument("--external-center", default="C", choices=BUILTIN_CENTERS,
                    help="held-out centre (default %(default)s)")
    ap.add_argument("--force", action="append", default=[], choices=(*STAGES, "all"),
                    metavar="STAGE", help="re-run this stage (and so everything after it); "
                                          "repeatable; 'all' for every stage")
    ap.add_argument("--stop-after", choices=STAGES, default=None, metavar="STAGE",
                    help="stop after this stage")
    ap.add_argument("--skip-train", action="store_true",
                    help="do not train: reuse --weights (trained with the same config)")
    ap.add_argument("--weights", default=None, help="model weights for --skip-train")
    ap.add_argument("--n-overlays", type=int, default=3,
                    help="external patients shown as overlays in the report")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("opts", nargs=argparse.REMAINDER,
                    help="Detectron2 config overrides KEY VALUE ... (training and prediction)")
    return ap


def _setup_logging(log_path: Path, verbose: bool) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        console.addFilter(lambda rec: not rec.name.startswith(_trace_logger.name))
    fileh = logging.FileHandler(log_path)
    fileh.setFormatter(fmt)
    fileh.setLevel(logging.DEBUG)
    root.addHandler(console)
    root.addHandler(fileh)
    for noisy in ("matplotlib", "PIL", "fvcore", "detectron2.checkpoint"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline; 0 on success, 1 when a stage failed, 2 on bad arguments."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        ap.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    if args.train_procs < 1:
        ap.error(f"--train-procs must be >= 1, got {args.train_procs}")
    if args.skip_train != bool(args.weights):
        ap.error("--skip-train and --weights go together")
    if args.patients_per_class < 3:
        ap.error("--patients-per-class must be >= 3 (MIL cross-validation needs at least two "
                 "development patients per class)")
    demo = Demo(args)
    L = demo.L

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)  # stop like Ctrl-C: child ended, stage unmarked
    _setup_logging(L.log, args.verbose)
    logger.info("run folder %s", L.root)
    from tqdm.contrib.logging import logging_redirect_tqdm

    t0 = time.perf_counter()
    try:
        with logging_redirect_tqdm():
            results = run_stages(demo.stages(), L.state, force=args.force,
                                 stop_after=args.stop_after, root=L.root)
    except KeyboardInterrupt:
        logger.error("interrupted; finished stages keep their stamps")
        return 130
    summary = [r.as_dict() for r in results]
    write_json_atomic(L.state / "last_run.json", {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - t0, 2), "stages": summary,
        "argv": sys.argv[1:] if argv is None else list(argv)})
    if any(r.stage == "report" and r.status in ("ran", "up to date") for r in results):
        update_stage_timings(L, summary)
    table = format_summary(results)
    print("\nStage summary\n" + table, flush=True)
    logging.getLogger("cmb.pipeline").debug("stage summary\n%s", table)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"\nFAILED: {failed[0].error}\nlog: {L.log}", file=sys.stderr)
        return 1
    if (L.report).is_file():
        print(f"\nreport: {L.report}\nmetrics: {L.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
