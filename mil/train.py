"""MIL training: cross-validation, final model, external evaluation, outputs.

Protocol (:func:`train_cv`):

1. Development patients (centres not listed as external) are split into
   ``n_folds`` patient-level stratified folds (or the folds of an index column
   ``fold`` with ``folds: index``, e.g. the detector's folds).
2. For each fold, a model is trained on the other folds. Early stopping uses an
   inner stratified validation split of those training patients (``val_fraction``),
   so the held-out fold is never seen during training or model selection and its
   predictions are genuinely out-of-fold (``val_fraction: 0`` stops on the held-out
   fold instead, which is optimistic). Standardisation is fitted on the training
   patients of the fold only.
3. A final model is trained on all development patients for the median best epoch
   of the folds (``final_epochs: median``, or a fixed integer).
4. The final model is evaluated on the external centre(s). The rule-based baseline
   (:mod:`mil.baseline`) is evaluated on the same patients.

With ``ensemble_size: E > 1`` every fold model and the final model is a
:class:`mil.model.MILEnsemble` of E members: member m uses seed ``seed + 1000 m``
(and the fold's offset), its own inner validation split and its own early-stopping
epoch; the final member m trains for the median best epoch of member m over the
folds. CV and external predictions are the members' mean probabilities, so the CV
estimate describes the same procedure as the final model.

Outputs in ``out_dir`` (DESIGN.md contract 5; every file written atomically):
``predictions.csv`` (patient_id, center, label, pred_label, prob_<class>..., fold:
the CV fold number or ``external``), ``baseline_predictions.csv`` (same columns),
``attention.csv`` (patient_id, lesion_id, attention, fold), ``metrics.json`` (CV and
external, ``model`` and ``baseline`` side by side, with 95% bootstrap CIs),
``roc_cv.png``, ``roc_external.png``, ``confusion_cv.png``, ``confusion_external.png``,
``model/model.pth`` + ``model/model.json`` (final model), ``model/fold<k>.pth|json``
(ensemble members 1.. as ``model_m<i>`` / ``fold<k>_m<i>``).

Bags come from the detector (``detection/bags.py``). If the index has a
``bag_source`` column (e.g. ``out_of_fold`` / ``in_fold``), its counts are
reported in ``metrics.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mil import CLASSES, FEATURE_NAMES
from mil.bagio import read_index
from mil.baseline import BaselineRule, predict_baseline
from mil.dataset import (
    BagDataset,
    FeatureSpec,
    PatientBag,
    collate_bags,
    fit_normalisation,
    fit_spec,
    load_patient_bags,
)
from mil.metrics import classification_report, plot_confusion, plot_roc
from mil.model import (
    GatedAttentionMIL,
    MILEnsemble,
    ModelParams,
    load_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

PROB_COLUMNS: tuple[str, ...] = tuple(f"prob_{c}" for c in CLASSES)
PREDICTION_COLUMNS: tuple[str, ...] = (
    "patient_id", "center", "label", "pred_label", *PROB_COLUMNS, "fold",
)
ATTENTION_COLUMNS: tuple[str, ...] = ("patient_id", "lesion_id", "attention", "fold")


@dataclass
class MILConfig:
    """MIL hyper-parameters (``configs/mil/*.yaml``; unknown keys are an error)."""

    seed: int = 0
    # cross-validation / early stopping
    n_folds: int = 5
    folds: str = "stratified"  # or "index": use the index column `fold`
    val_fraction: float = 0.2  # inner split for early stopping; 0 = stop on the held-out fold
    max_epochs: int = 100
    min_epochs: int = 5
    patience: int = 15
    early_stopping: str = "loss"  # "loss" (validation log loss) or "auc" (weighted AUC)
    final_epochs: int | str = "median"  # "median" of the folds' best epochs, or an int
    # optimisation
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    class_weights: str = "balanced"  # or "none"
    max_instances: int | None = 64  # training-time random subsample of large bags
    # Training-time lesion dropout: keep rate drawn from [1 - p, 1] per draw (0 = off);
    # a detector at a new scanner finds fewer lesions than in its own training centres.
    instance_dropout: float = 0.0
    # Training-time false positives: with this probability per draw, 1..max_injected
    # lesions of other training bags are added to the bag (0 = off; mil.dataset.BagDataset).
    instance_injection: float = 0.0
    max_injected: int = 2
    # Seed ensemble: each fold model and the final model is the mean of this many
    # members trained alike (member m: seed + 1000 m, its own inner split and epochs).
    ensemble_size: int = 1
    # inputs
    features: list[str] | None = field(default_factory=lambda: list(FEATURE_NAMES))
    log_features: list[str] = field(default_factory=lambda: ["volume_mm3", "n_slices"])
    use_crops: bool = True
    use_summary: bool = True
    use_age: bool = True
    # architecture
    model: dict[str, Any] = field(default_factory=dict)  # ModelParams fields
    # data split / evaluation
    external_centers: list[str] = field(default_factory=list)
    dev_centers: list[str] | None = None  # None: every centre not external
    n_bootstrap: int = 1000
    baseline: dict[str, Any] = field(default_factory=dict)  # BaselineRule fields
    num_threads: int | None = None
    # Processes training the fold / member models side by side (1: in this process).
    # Each job is seeded on its own, so the models do not depend on this number.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.folds not in ("stratified", "index"):
            raise ValueError(f"folds must be 'stratified' or 'index', got {self.folds!r}")
        if self.early_stopping not in ("loss", "auc"):
            raise ValueError(f"early_stopping must be 'loss' or 'auc', got {self.early_stopping!r}")
        if self.class_weights not in ("balanced", "none"):
            raise ValueError(f"class_weights must be 'balanced'/'none', got {self.class_weights!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if not isinstance(self.ensemble_size, int) or self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be an int >= 1, got {self.ensemble_size!r}")
        if not (isinstance(self.final_epochs, int) or self.final_epochs == "median"):
            raise ValueError(f"final_epochs must be an int or 'median', got {self.final_epochs!r}")
        for name, cls, value in (("model", ModelParams, self.model),
                                 ("baseline", BaselineRule, self.baseline)):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown {name} key(s) {unknown}; known: {sorted(known)}")


def load_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> MILConfig:
    """Load a MIL config YAML (``yaml.safe_load``) and apply ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data.update(loaded)
    data.update(overrides or {})
    known = {f.name for f in dataclasses.fields(MILConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path or 'config'}: unknown MIL config key(s) {unknown}")
    return MILConfig(**data)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict, values parsed as YAML (``max_epochs=5``)."""
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"override {p!r} is not KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@dataclass
class FitResult:
    """A trained model and its training history."""

    model: GatedAttentionMIL
    best_epoch: int
    history: list[dict[str, float]]


def _class_weights(bags: Sequence[PatientBag], mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount([pb.label for pb in bags], minlength=len(CLASSES)).astype(float)
    w = np.where(counts > 0, counts.sum() / (len(CLASSES) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _loader(ds: BagDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate_bags,
        num_workers=0,
    )


def _run(model: GatedAttentionMIL | MILEnsemble, batch: Mapping[str, torch.Tensor]) -> Any:
    return model(batch["crops"], batch["feats"], batch["mask"], batch["summary"])


def fit_model(
    train: Sequence[PatientBag],
    val: Sequence[PatientBag] | None,
    cfg: MILConfig,
    epochs: int | None = None,
    seed: int | None = None,
    desc: str = "train",
    progress: bool = True,
) -> FitResult:
    """Train one model on ``train`` (labels required).

    With ``val``, train up to ``cfg.max_epochs`` with early stopping on ``val``
    (``cfg.early_stopping``; patience ``cfg.patience``) and restore the best epoch.
    Without, train exactly ``epochs`` (default ``cfg.max_epochs``) epochs.
    """
    if any(pb.label < 0 for pb in train):
        raise ValueError("training bags need labels")
    seed = cfg.seed if seed is None else seed
    spec = fit_spec(
        train, cfg.features, cfg.log_features, cfg.use_crops, cfg.use_summary, cfg.use_age
    )
    torch.manual_seed(seed)
    model = GatedAttentionMIL(spec, ModelParams(**cfg.model))
    model.set_normalisation(fit_normalisation(train, spec))
    loader = _loader(
        BagDataset(train, spec, cfg.max_instances, seed, cfg.instance_dropout,
                   cfg.instance_injection, cfg.max_injected),
        cfg.batch_size, True, seed,
    )
    val_loader = (
        _loader(BagDataset(val, spec), max(cfg.batch_size, 16), False, seed) if val else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(train, cfg.class_weights))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_epochs = cfg.max_epochs if (val or epochs is None) else int(epochs)
    best = (math.inf, 0)
    best_state = None
    bad = 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, n_epochs + 1), desc=desc, leave=False, disable=None if progress else True)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(_run(model, batch).logits, batch["label"])
            loss.backward()
            opt.step()
            total += loss.item() * len(batch["label"])
            count += len(batch["label"])
        rec = {"epoch": epoch, "train_loss": total / max(count, 1)}
        if val_loader is not None:
            probs, _ = _predict_loader(model, val_loader)
            y = np.array([pb.label for pb in val])
            rec["val_loss"] = _log_loss(y, probs)
            rec["val_auc"] = _weighted_auc(y, probs)
            crit = rec["val_loss"] if cfg.early_stopping == "loss" else -np.nan_to_num(
                rec["val_auc"], nan=0.0
            )
            if crit < best[0] - 1e-6:
                best, bad = (crit, epoch), 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
            bar.set_postfix(val_loss=f"{rec['val_loss']:.3f}", best=best[1])
        history.append(rec)
        if val_loader is not None and bad >= cfg.patience and epoch >= cfg.min_epochs:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    best_epoch = best[1] if val_loader is not None else n_epochs
    logger.info("%s: best epoch %d of %d", desc, best_epoch, len(history))
    model.eval()
    return FitResult(model, best_epoch, history)


@dataclass
class _FitJob:
    """One model to train: a CV fold's member (fold >= 0) or a final member (fold -1)."""

    fold: int
    member: int
    train: list[PatientBag]
    val: list[PatientBag] | None
    epochs: int | None
    seed: int
    desc: str


def _fit_in_worker(job: _FitJob, cfg: MILConfig) -> tuple[int, int, dict, dict, int, list]:
    """Worker side of :func:`_run_fits`: plain arrays back, no live tensors."""
    torch.set_num_threads(cfg.num_threads or 1)
    res = fit_model(job.train, job.val, cfg, epochs=job.epochs, seed=job.seed,
                    desc=job.desc, progress=False)
    state = {k: v.detach().cpu().numpy() for k, v in res.model.state_dict().items()}
    return job.fold, job.member, res.model.spec.to_dict(), state, res.best_epoch, res.history


def _run_fits(
    jobs: Sequence[_FitJob], cfg: MILConfig, desc: str
) -> dict[tuple[int, int], FitResult]:
    """Train every job, in ``cfg.workers`` spawned processes when more than one."""
    if cfg.workers <= 1 or len(jobs) <= 1:
        return {(j.fold, j.member): fit_model(j.train, j.val, cfg, epochs=j.epochs, seed=j.seed,
                                              desc=j.desc)
                for j in tqdm(jobs, desc=desc, disable=None)}
    by_key = {(j.fold, j.member): j for j in jobs}
    out: dict[tuple[int, int], FitResult] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs)), mp_context=ctx) as ex:
        futures = [ex.submit(_fit_in_worker, j, cfg) for j in jobs]
        for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=None):
            fold, member, spec, state, best, history = fut.result()
            model = GatedAttentionMIL(FeatureSpec.from_dict(spec), ModelParams(**cfg.model))
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
            model.eval()
            out[(fold, member)] = FitResult(model, best, history)
            logger.info("%s: best epoch %d of %d", by_key[(fold, member)].desc, best,
                        len(history))
    return out


def _log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    return float(-np.log(p).mean())


def _weighted_auc(y: np.ndarray, probs: np.ndarray) -> float:
    from mil.metrics import ovr_auc

    return ovr_auc(y, probs)[1]


@torch.no_grad()
def _predict_loader(
    model: GatedAttentionMIL | MILEnsemble, loader: DataLoader
) -> tuple[np.ndarray, list[np.ndarray]]:
    model.eval()
    probs, att = [], []
    for batch in loader:
        out = _run(model, batch)
        probs.append(torch.softmax(out.logits, 1).numpy())
        n = batch["mask"].sum(1)
        for j in range(len(n)):
            att.append(out.attention[j, : int(n[j])].numpy().copy())
    return np.concatenate(probs).astype(np.float64), att


def predict(
    model: GatedAttentionMIL | MILEnsemble, bags: Sequence[PatientBag], batch_size: int = 16
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities [n, 3] and per-bag attention vectors (length N each)."""
    if not bags:
        return np.zeros((0, len(CLASSES))), []
    return _predict_loader(model, _loader(BagDataset(bags, model.spec), batch_size, False, 0))


# ---------------------------------------------------------------------------- outputs


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_csv(path: Path, df: pd.DataFrame) -> None:
    _atomic_text(path, df.to_csv(index=False))


def prediction_frame(
    bags: Sequence[PatientBag], probs: np.ndarray, fold: Sequence[object] | object
) -> pd.DataFrame:
    """Rows of ``predictions.csv`` for ``bags``."""
    folds = list(fold) if isinstance(fold, list | tuple | np.ndarray) else [fold] * len(bags)
    df = pd.DataFrame({
        "patient_id": [pb.patient_id for pb in bags],
        "center": [pb.center for pb in bags],
        "label": [pb.label_name for pb in bags],
        "pred_label": [CLASSES[int(i)] for i in probs.argmax(1)] if len(bags) else [],
    })
    for j, col in enumerate(PROB_COLUMNS):
        df[col] = probs[:, j] if len(bags) else []
    df["fold"] = [str(f) for f in folds]
    return df[list(PREDICTION_COLUMNS)]


def attention_frame(
    bags: Sequence[PatientBag], attention: Sequence[np.ndarray], fold: Sequence[object] | object
) -> pd.DataFrame:
    """Rows of ``attention.csv`` (one per lesion; empty bags contribute none)."""
    folds = list(fold) if isinstance(fold, list | tuple | np.ndarray) else [fold] * len(bags)
    rows = []
    for pb, a, f in zip(bags, attention, folds, strict=True):
        for lid, w in zip(pb.bag.lesion_ids.tolist(), a.tolist(), strict=True):
            rows.append((pb.patient_id, int(lid), float(w), str(f)))
    return pd.DataFrame(rows, columns=list(ATTENTION_COLUMNS))


def _baseline(bags: Sequence[PatientBag], rule: BaselineRule) -> np.ndarray | None:
    try:
        probs, _, _ = predict_baseline([pb.bag for pb in bags], [pb.age for pb in bags], rule)
    except KeyError as exc:
        logger.warning("rule-based baseline skipped: %s", exc)
        return None
    return probs


def _report(
    bags: Sequence[PatientBag], probs: np.ndarray | None, n_boot: int, seed: int
) -> dict | None:
    if probs is None:
        return None
    labelled = np.array([pb.label >= 0 for pb in bags], bool)
    y = np.array([pb.label for pb in bags], int)[labelled]
    if labelled.sum() == 0:
        return {"n": 0}
    return classification_report(y, probs[labelled], CLASSES, n_boot, seed)


def _figures(
    out_dir: Path, split: str, bags: Sequence[PatientBag], model_probs: np.ndarray,
    base_probs: np.ndarray | None,
) -> list[str]:
    labelled = np.array([pb.label >= 0 for pb in bags], bool)
    if labelled.sum() == 0:
        return []
    y = np.array([pb.label for pb in bags], int)[labelled]
    curves = {"MIL": (y, model_probs[labelled])}
    if base_probs is not None:
        curves["baseline"] = (y, base_probs[labelled])
    from mil.metrics import confusion_matrix

    cms = {name: confusion_matrix(yy, pp.argmax(1), len(CLASSES)) for name, (yy, pp) in
           curves.items()}
    roc = plot_roc(curves, out_dir / f"roc_{split}.png", CLASSES, title=f"ROC ({split})")
    cm = plot_confusion(cms, out_dir / f"confusion_{split}.png", CLASSES, title=split)
    return [roc.name, cm.name]


def _json_default(o: object) -> object:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if math.isnan(float(o)) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _nan_to_none(o: object) -> object:
    """Undefined values (NaN, e.g. an AUC on a one-class split) become JSON null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_none(v) for v in o]
    return o


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(_nan_to_none(data), indent=2, default=_json_default, allow_nan=False)
    _atomic_text(path, text + "\n")


# ---------------------------------------------------------------------------- protocol


def _assign_folds(dev: Sequence[PatientBag], index: pd.DataFrame, cfg: MILConfig) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    if cfg.folds == "index":
        if "fold" not in index.columns:
            raise ValueError("folds: index needs a `fold` column in the bag index")
        by_id = dict(zip(index["patient_id"], index["fold"], strict=True))
        return np.array([int(by_id[pb.patient_id]) for pb in dev])
    y = np.array([pb.label for pb in dev])
    min_count = int(np.bincount(y, minlength=len(CLASSES))[np.unique(y)].min())
    n_folds = min(cfg.n_folds, min_count)
    if n_folds < cfg.n_folds:
        logger.warning("smallest class has %d patients: using %d folds instead of %d",
                       min_count, n_folds, cfg.n_folds)
    if n_folds < 2:
        raise ValueError(f"cannot cross-validate: smallest class has {min_count} patient(s)")
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=cfg.seed)
    folds = np.zeros(len(dev), int)
    for k, (_, test) in enumerate(skf.split(np.zeros(len(y)), y)):
        folds[test] = k
    return folds


def _inner_split(
    bags: Sequence[PatientBag], fraction: float, seed: int
) -> tuple[list[PatientBag], list[PatientBag]]:
    from sklearn.model_selection import train_test_split

    y = np.array([pb.label for pb in bags])
    idx = np.arange(len(bags))
    counts = np.bincount(y, minlength=len(CLASSES))
    n_val = max(int(round(fraction * len(bags))), 1)
    stratify = y if counts[counts > 0].min() >= 2 and n_val >= len(np.unique(y)) else None
    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=stratify)
    return [bags[i] for i in sorted(tr)], [bags[i] for i in sorted(va)]


def _member_seed(base: int, member: int) -> int:
    """Seed of ensemble member ``member`` (member 0 keeps ``base``: size 1 is unchanged)."""
    return int(base) + 1000 * int(member)


def _split_centres(index: pd.DataFrame, cfg: MILConfig) -> tuple[list[str], list[str]]:
    centres = list(dict.fromkeys(index["center"].tolist()))
    ext = [c for c in cfg.external_centers]
    unknown = [c for c in ext if c not in centres]
    if unknown:
        raise ValueError(f"external centre(s) {unknown} not in the index (centres: {centres})")
    dev = cfg.dev_centers if cfg.dev_centers is not None else [c for c in centres if c not in ext]
    overlap = set(dev) & set(ext)
    if overlap:
        raise ValueError(f"centre(s) {sorted(overlap)} both development and external")
    return dev, ext


def train_cv(
    index_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: MILConfig | None = None,
) -> dict:
    """Cross-validate, train the final model, evaluate externally; write all outputs.

    Args:
        index_csv: bag index (:func:`mil.bagio.read_index`).
        out_dir: output folder (created).
        cfg: configuration (defaults when None); ``cfg.external_centers`` names the
            held-out centre(s) (none: CV only).

    Returns:
        The ``metrics.json`` content.
    """
    cfg = cfg or MILConfig()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = read_index(index_csv)
    dev_c, ext_c = _split_centres(index, cfg)
    dev = load_patient_bags(index, dev_c)
    ext = load_patient_bags(index, ext_c) if ext_c else []
    unlabelled = [pb.patient_id for pb in dev if pb.label < 0]
    if unlabelled:
        raise ValueError(f"development patients without label: {unlabelled[:10]}")
    if not dev:
        raise ValueError(f"no development patients (centres {dev_c})")
    logger.info("MIL: %d development patients (%s), %d external (%s)", len(dev), dev_c,
                len(ext), ext_c)
    folds = _assign_folds(dev, index, cfg)
    fold_ids = sorted(set(folds.tolist()))
    oof = np.zeros((len(dev), len(CLASSES)))
    oof_att: list[np.ndarray] = [np.zeros(0)] * len(dev)
    fold_info = []
    n_members = cfg.ensemble_size
    jobs = []
    for k in fold_ids:
        train_b = [dev[i] for i in np.flatnonzero(folds != k)]
        for m in range(n_members):
            seed = _member_seed(cfg.seed + k, m)
            if cfg.val_fraction > 0:
                fit_b, val_b = _inner_split(train_b, cfg.val_fraction, seed)
            else:
                fit_b, val_b = train_b, [dev[i] for i in np.flatnonzero(folds == k)]
            desc = f"fold {k}" + (f" member {m}" if n_members > 1 else "")
            jobs.append(_FitJob(int(k), m, fit_b, val_b, None, seed, desc))
    fits = _run_fits(jobs, cfg, "CV models")
    job_of = {(j.fold, j.member): j for j in jobs}
    member_epochs: list[list[int]] = [[] for _ in range(n_members)]
    for k in fold_ids:
        test_i = np.flatnonzero(folds == k)
        test_b = [dev[i] for i in test_i]
        members, runs = [], []
        for m in range(n_members):
            job, res = job_of[(k, m)], fits[(k, m)]
            members.append(res.model)
            member_epochs[m].append(res.best_epoch)
            best = res.history[res.best_epoch - 1] if res.best_epoch else {}
            runs.append({
                "seed": job.seed, "n_train": len(job.train), "n_val": len(job.val or []),
                "best_epoch": int(res.best_epoch), "epochs_run": len(res.history),
                "val_loss": best.get("val_loss"), "val_auc": best.get("val_auc"),
            })
        model = members[0] if n_members == 1 else MILEnsemble(members)
        probs, att = predict(model, test_b)
        oof[test_i] = probs
        for i, a in zip(test_i, att, strict=True):
            oof_att[i] = a
        save_checkpoint(model, out / "model",
                        {"fold": k, "best_epoch": runs[0]["best_epoch"]}, name=f"fold{k}")
        fold_info.append({
            "fold": int(k), "n_test": len(test_b),
            **{key: runs[0][key] for key in ("n_train", "n_val", "best_epoch", "epochs_run",
                                             "val_loss", "val_auc")},
            **({"members": runs} if n_members > 1 else {}),
        })
    if cfg.final_epochs == "median":
        final_list = [max(int(round(float(np.median(e)))), cfg.min_epochs)
                      for e in member_epochs]
    else:
        final_list = [int(cfg.final_epochs)] * n_members
    final_jobs = [
        _FitJob(-1, m, list(dev), None, final_list[m], _member_seed(cfg.seed, m),
                "final" + (f" member {m}" if n_members > 1 else ""))
        for m in range(n_members)
    ]
    final_fits = _run_fits(final_jobs, cfg, "final models")
    finals = [final_fits[(-1, m)].model for m in range(n_members)]
    final_model = finals[0] if n_members == 1 else MILEnsemble(finals)
    final_epochs = final_list[0]
    save_checkpoint(final_model, out / "model", {
        "final_epochs": final_epochs, "member_final_epochs": final_list,
        "dev_centers": dev_c, "external_centers": ext_c,
        "config": dataclasses.asdict(cfg),
    })

    rule = BaselineRule(**cfg.baseline)
    pred_frames = [prediction_frame(dev, oof, list(folds))]
    att_frames = [attention_frame(dev, oof_att, list(folds))]
    base_dev = _baseline(dev, rule)
    base_frames = [prediction_frame(dev, base_dev, list(folds))] if base_dev is not None else []
    metrics: dict[str, Any] = {
        "classes": list(CLASSES),
        "protocol": {
            "dev_centers": dev_c, "external_centers": ext_c, "n_folds": len(fold_ids),
            "folds": cfg.folds,
            "early_stopping": (f"inner split ({cfg.val_fraction:.0%} of training patients)"
                               if cfg.val_fraction > 0 else "held-out fold (optimistic)"),
            "final_epochs": final_epochs,
            "ensemble_size": n_members,
            "member_final_epochs": final_list,
            "cv_predictions": "out-of-fold (pooled over folds)",
        },
        "bags": _bag_provenance(index, index_csv),
        "folds": fold_info,
        "cv": {
            "model": _report(dev, oof, cfg.n_bootstrap, cfg.seed),
            "baseline": _report(dev, base_dev, cfg.n_bootstrap, cfg.seed),
        },
        "external": None,
        "baseline_rule": dataclasses.asdict(rule),
        "config": dataclasses.asdict(cfg),
    }
    figures = _figures(out, "cv", dev, oof, base_dev)
    if ext:
        probs, att = predict(final_model, ext)
        base_ext = _baseline(ext, rule)
        pred_frames.append(prediction_frame(ext, probs, "external"))
        att_frames.append(attention_frame(ext, att, "external"))
        if base_ext is not None:
            base_frames.append(prediction_frame(ext, base_ext, "external"))
        metrics["external"] = {
            "model": _report(ext, probs, cfg.n_bootstrap, cfg.seed),
            "baseline": _report(ext, base_ext, cfg.n_bootstrap, cfg.seed),
        }
        figures += _figures(out, "external", ext, probs, base_ext)
    metrics["figures"] = figures
    _atomic_csv(out / "predictions.csv", pd.concat(pred_frames, ignore_index=True))
    if base_frames:
        _atomic_csv(out / "baseline_predictions.csv", pd.concat(base_frames, ignore_index=True))
    _atomic_csv(out / "attention.csv", pd.concat(att_frames, ignore_index=True))
    _write_json(out / "metrics.json", metrics)
    logger.info("MIL outputs written to %s", out)
    return metrics


def _bag_provenance(index: pd.DataFrame, index_csv: str | os.PathLike) -> dict:
    info: dict[str, Any] = {"index": str(Path(index_csv).resolve())}
    if "bag_source" in index.columns:
        info["bag_source"] = {str(k): int(v) for k, v in
                              index["bag_source"].value_counts().items()}
    else:
        info["bag_source"] = "not recorded in the index (column `bag_source`)"
    return info


def evaluate(
    model_dir: str | os.PathLike,
    index_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    centers: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    fold_name: str = "external",
    baseline_rule: BaselineRule | None = None,
) -> dict:
    """Apply a saved model (``model.pth`` + ``model.json``) to the bags of an index.

    Writes ``predictions.csv``, ``baseline_predictions.csv``, ``attention.csv``,
    ``metrics.json`` (labelled patients only; ``model`` and ``baseline``) and, when
    labels exist, ``roc_<fold_name>.png`` / ``confusion_<fold_name>.png``.
    Unlabelled bags get predictions only.

    Returns:
        The ``metrics.json`` content.
    """
    model, info = load_checkpoint(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = read_index(index_csv)
    bags = load_patient_bags(index, centers)
    if not bags:
        raise ValueError(f"no bags in {index_csv} for centres {centers}")
    probs, att = predict(model, bags)
    if baseline_rule is None:
        cfg_rule = info.get("meta", {}).get("config", {}).get("baseline", {})
        baseline_rule = BaselineRule(**cfg_rule)
    base = _baseline(bags, baseline_rule)
    _atomic_csv(out / "predictions.csv", prediction_frame(bags, probs, fold_name))
    if base is not None:
        _atomic_csv(out / "baseline_predictions.csv", prediction_frame(bags, base, fold_name))
    _atomic_csv(out / "attention.csv", attention_frame(bags, att, fold_name))
    metrics = {
        "classes": list(CLASSES),
        "model": str(Path(model_dir).resolve()),
        "bags": _bag_provenance(index, index_csv),
        fold_name: {
            "model": _report(bags, probs, n_bootstrap, seed),
            "baseline": _report(bags, base, n_bootstrap, seed),
        },
        "baseline_rule": dataclasses.asdict(baseline_rule),
        "figures": _figures(out, fold_name, bags, probs, base),
    }
    _write_json(out / "metrics.json", metrics)
    return metrics
