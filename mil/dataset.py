"""Bag dataset: patients with bags, instance/summary features, padding collation.

Instance features are chosen by name (any subset of :data:`mil.FEATURE_NAMES`, or
any other columns common to the training bags). Heavy-tailed columns named in
``log_features`` are mapped through ``sign(x) * log1p(|x|)``. Standardisation
statistics are fitted on training bags only (:func:`fit_normalisation`) and
stored as buffers of the model, so they travel with its ``state_dict``.

Bag-level summary features (cheap, computed from the whole bag before any
instance subsampling): ``log_n`` = log1p(number of instances); when the three
MARS region one-hot columns are present, per-region log1p(count) and fraction of
instances, and ``strictly_lobar`` (>= 2 lobar, no deep/infratentorial); when
``score`` is one of the selected instance features, ``mean_score``; when the index
has an ``age`` column, ``age`` and ``age_missing`` (missing age is imputed with the
training mean).

Empty bags (N = 0) are kept: they carry a fully masked instance set and are
pooled by the model into a learned "empty bag" embedding (see :mod:`mil.model`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mil import CLASSES, REGION_COLUMNS
from mil.bagio import Bag, load_bag

logger = logging.getLogger(__name__)


@dataclass
class PatientBag:
    """A bag together with the patient's index row."""

    patient_id: str
    center: str
    label: int  # index into CLASSES, -1 when unknown
    age: float  # NaN when unknown
    bag: Bag

    @property
    def label_name(self) -> str:
        """Class name, or '' when unknown."""
        return CLASSES[self.label] if self.label >= 0 else ""


def load_patient_bags(
    index: pd.DataFrame, centers: Sequence[str] | None = None
) -> list[PatientBag]:
    """Load the bags of an index (from :func:`mil.bagio.read_index`), optionally by centre."""
    out: list[PatientBag] = []
    has_age = "age" in index.columns
    for row in index.itertuples(index=False):
        if centers is not None and row.center not in centers:
            continue
        bag = load_bag(row.bag_path)
        if bag.patient_id != row.patient_id:
            logger.warning(
                "bag %s holds patient_id %r, index says %r", row.bag_path, bag.patient_id,
                row.patient_id,
            )
        label = CLASSES.index(row.label) if row.label in CLASSES else -1
        age = float(row.age) if has_age and row.age is not None else math.nan
        out.append(PatientBag(row.patient_id, row.center, label, age, bag))
    return out


@dataclass
class FeatureSpec:
    """Which inputs the model sees; fitted on training bags, saved in model.json."""

    feature_names: list[str]
    log_features: list[str] = field(default_factory=list)
    summary_names: list[str] = field(default_factory=list)
    use_crops: bool = True
    crop_channels: int = 3
    crop_size: int = 32

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def fit_spec(
    bags: Sequence[PatientBag],
    features: Sequence[str] | None = None,
    log_features: Sequence[str] = (),
    use_crops: bool = True,
    use_summary: bool = True,
    use_age: bool = True,
) -> FeatureSpec:
    """Choose the instance features and summary features from the training bags.

    ``features=None`` uses every column common to all training bags (in the first
    bag's order); a list keeps the listed columns that all training bags have.
    """
    if not bags:
        raise ValueError("no training bags")
    common = list(bags[0].bag.feature_names)
    for pb in bags[1:]:
        common = [n for n in common if n in pb.bag.feature_names]
    if features is None:
        names = common
    else:
        names = [n for n in features if n in common]
        dropped = [n for n in features if n not in common]
        if dropped:
            logger.warning("feature column(s) %s not in every training bag: not used", dropped)
    sizes = {pb.bag.crops.shape[1:] for pb in bags if pb.bag.n_instances > 0}
    if not sizes:  # only empty bags: take the shape they declare
        sizes = {pb.bag.crops.shape[1:] for pb in bags[:1]}
    if use_crops and len(sizes) > 1:
        raise ValueError(f"training bags have different crop shapes {sorted(sizes)}")
    shape = next(iter(sizes)) if sizes else (3, 32, 32)
    if use_crops and shape[-1] == 0:
        use_crops = False
    summary: list[str] = []
    if use_summary:
        # The mean detector score joins the summary only when the score is an instance
        # feature: a config that leaves the score out (it moves with the scanner) must
        # not let it back in through the summary.
        summary = summary_feature_names(names_available=common, score="score" in names)
        if use_age and any(not math.isnan(pb.age) for pb in bags):
            summary += ["age", "age_missing"]
    if not names and not use_crops and not summary:
        raise ValueError("no model input: no common feature column, crops off, summary off")
    return FeatureSpec(
        feature_names=list(names),
        log_features=[n for n in log_features if n in names],
        summary_names=summary,
        use_crops=use_crops,
        crop_channels=int(shape[0]),
        crop_size=int(shape[-1]),
    )


def summary_feature_names(names_available: Sequence[str], score: bool = True) -> list[str]:
    """Summary feature names computable from bags with ``names_available`` columns
    (``mean_score`` only with ``score``)."""
    out = ["log_n"]
    if all(c in names_available for c in REGION_COLUMNS):
        for c in REGION_COLUMNS:
            r = c.removeprefix("region_")
            out += [f"log_n_{r}", f"frac_{r}"]
        out.append("strictly_lobar")
    if score and "score" in names_available:
        out.append("mean_score")
    return out


def summary_features(
    pb: PatientBag, names: Sequence[str], idx: np.ndarray | None = None
) -> np.ndarray:
    """The bag-level summary vector (float32, NaN for a missing age).

    ``idx`` restricts the counts and scores to those instances (training-time instance
    dropout); None uses the whole bag.
    """
    bag = pb.bag
    n = bag.n_instances if idx is None else len(idx)

    def col(name: str) -> np.ndarray:
        v = bag.feature(name)
        return v if idx is None else v[idx]

    vals: dict[str, float] = {"log_n": math.log1p(n)}
    if all(bag.has_feature(c) for c in REGION_COLUMNS):
        counts = {}
        for c in REGION_COLUMNS:
            r = c.removeprefix("region_")
            counts[r] = float(np.clip(col(c), 0, 1).sum()) if n else 0.0
            vals[f"log_n_{r}"] = math.log1p(counts[r])
            vals[f"frac_{r}"] = counts[r] / n if n else 0.0
        vals["strictly_lobar"] = float(
            counts["lobar"] >= 2 and counts["deep"] < 0.5 and counts["infratentorial"] < 0.5
        )
    if bag.has_feature("score"):
        vals["mean_score"] = float(col("score").mean()) if n else 0.0
    vals["age"] = pb.age
    vals["age_missing"] = float(math.isnan(pb.age))
    missing = [k for k in names if k not in vals]
    if missing:
        raise KeyError(f"bag {pb.patient_id!r}: cannot compute summary feature(s) {missing}")
    return np.array([vals[k] for k in names], np.float32)


def instance_features(bag: Bag, spec: FeatureSpec) -> np.ndarray:
    """Instance feature matrix [N, F] in ``spec`` order, log-transformed where asked."""
    x = bag.select_features(spec.feature_names).astype(np.float32, copy=True)
    for j, name in enumerate(spec.feature_names):
        if name in spec.log_features:
            x[:, j] = np.sign(x[:, j]) * np.log1p(np.abs(x[:, j]))
    return x


@dataclass
class Normalisation:
    """Standardisation statistics fitted on training bags."""

    feat_mean: np.ndarray
    feat_std: np.ndarray
    summary_mean: np.ndarray
    summary_std: np.ndarray
    crop_mean: float
    crop_std: float


def _safe_std(x: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(x, nan=1.0)
    return np.where(x < 1e-6, 1.0, x).astype(np.float32)


def fit_normalisation(bags: Sequence[PatientBag], spec: FeatureSpec) -> Normalisation:
    """Mean/std of instance features, summary features and crop intensities (train only)."""
    f = len(spec.feature_names)
    feats = [instance_features(pb.bag, spec) for pb in bags if pb.bag.n_instances]
    x = np.concatenate(feats) if feats else np.zeros((0, f), np.float32)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of empty slice (all-NaN age)
        feat_mean = np.nan_to_num(np.nanmean(x, 0)) if len(x) else np.zeros(f, np.float32)
        feat_std = _safe_std(np.nanstd(x, 0)) if len(x) else np.ones(f, np.float32)
        s = np.stack([summary_features(pb, spec.summary_names) for pb in bags])
        k = len(spec.summary_names)
        s_mean = np.nan_to_num(np.nanmean(s, 0)) if k else np.zeros(0, np.float32)
        s_std = _safe_std(np.nanstd(s, 0)) if k else np.ones(0, np.float32)
    crop_mean, crop_std = 0.0, 1.0
    if spec.use_crops:
        total, total_sq, count = 0.0, 0.0, 0
        for pb in bags:
            c = pb.bag.crops
            if c.size:
                total += float(c.sum(dtype=np.float64))
                total_sq += float(np.square(c, dtype=np.float64).sum())
                count += c.size
        if count:
            crop_mean = total / count
            crop_std = math.sqrt(max(total_sq / count - crop_mean**2, 0.0)) or 1.0
    return Normalisation(
        feat_mean.astype(np.float32), feat_std, s_mean.astype(np.float32), s_std,
        float(crop_mean), float(crop_std),
    )


class BagDataset(Dataset):
    """Torch dataset over :class:`PatientBag` items for a fitted :class:`FeatureSpec`.

    Items are dicts of tensors: ``crops`` [N, C, S, S], ``feats`` [N, F], ``summary``
    [K], ``label`` (long, -1 unknown), ``index`` (position in ``bags``). With
    ``max_instances`` (training only) bags larger than that are randomly
    subsampled each time they are drawn; summary features use the whole bag.

    ``instance_dropout`` p > 0 (training only) imitates a detector that finds fewer
    lesions than the one that made the bags, as at an unseen scanner: each time a bag is
    drawn a keep rate r is drawn from [1 - p, 1], each lesion is kept with probability
    r, and the summary features are recomputed on what is kept. A bag may be emptied:
    a new scanner's detector finds nothing in many patients with one or two bleeds, and
    in-fold development bags are never empty, so empty bags must be seen in training.

    ``instance_injection`` q > 0 (training only) imitates a detector's false positives at
    an unseen scanner: with probability q per draw, 1 to ``max_injected`` lesions taken
    at random from *other* training bags (any class) are added to the bag, and the
    summary features are recomputed on the result. The bag keeps its label, so one
    stray deep or lobar finding must not flip the call: at a new centre the external
    errors were bags of 1-3 detections in which one false positive decided the class.
    """

    def __init__(
        self,
        bags: Sequence[PatientBag],
        spec: FeatureSpec,
        max_instances: int | None = None,
        seed: int = 0,
        instance_dropout: float = 0.0,
        instance_injection: float = 0.0,
        max_injected: int = 2,
    ) -> None:
        if not 0.0 <= instance_dropout < 1.0:
            raise ValueError(f"instance_dropout must be in [0, 1), got {instance_dropout}")
        if not 0.0 <= instance_injection <= 1.0:
            raise ValueError(f"instance_injection must be in [0, 1], got {instance_injection}")
        if int(max_injected) < 1:
            raise ValueError(f"max_injected must be >= 1, got {max_injected}")
        self.instance_injection = float(instance_injection)
        self.max_injected = int(max_injected)
        self.bags = list(bags)
        self.spec = spec
        self.max_instances = max_instances
        self.instance_dropout = float(instance_dropout)
        self._rng = np.random.default_rng(seed)
        for pb in self.bags:
            missing = [n for n in spec.feature_names if not pb.bag.has_feature(n)]
            if missing:
                raise KeyError(f"bag of {pb.patient_id!r} lacks feature column(s) {missing}")
            if spec.use_crops and pb.bag.n_instances and pb.bag.crops.shape[1:] != (
                spec.crop_channels, spec.crop_size, spec.crop_size
            ):
                raise ValueError(
                    f"bag of {pb.patient_id!r}: crops {pb.bag.crops.shape[1:]} != model's "
                    f"{(spec.crop_channels, spec.crop_size, spec.crop_size)}"
                )
        self._summary = [summary_features(pb, spec.summary_names) for pb in self.bags]
        self._feats = [instance_features(pb.bag, spec) for pb in self.bags]
        # (bag, instance) pairs that can be injected into another bag
        self._donors = np.array([(b, r) for b, pb in enumerate(self.bags)
                                 for r in range(pb.bag.n_instances)], dtype=np.int64)

    def _inject(self, i: int, idx: np.ndarray) -> tuple[Bag, np.ndarray] | None:
        """Bag ``i`` restricted to ``idx`` plus 1..max_injected lesions of other bags, and
        its instance feature rows; None when no other bag has a lesion."""
        pool = self._donors[self._donors[:, 0] != i] if len(self._donors) else self._donors
        if not len(pool):
            return None
        k = int(self._rng.integers(1, self.max_injected + 1))
        picks = pool[self._rng.choice(len(pool), size=min(k, len(pool)), replace=False)]
        bag = self.bags[i].bag
        rows = [bag.features[idx]]
        crops = [bag.crops[idx]] if self.spec.use_crops else []
        feats = [self._feats[i][idx]]
        for b, r in picks:
            donor = self.bags[int(b)].bag
            rows.append(donor.select_features(bag.feature_names, rows=[int(r)]))
            feats.append(self._feats[int(b)][int(r)][None])
            if self.spec.use_crops:
                crops.append(donor.crops[int(r)][None])
        merged = Bag(
            patient_id=bag.patient_id,
            crops=np.concatenate(crops) if crops else bag.crops[:0],
            features=np.concatenate(rows).astype(np.float32, copy=False),
            feature_names=bag.feature_names,
            lesion_ids=np.zeros(sum(len(x) for x in rows), dtype=np.int64),
        )
        return merged, np.concatenate(feats)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pb = self.bags[i]
        n = pb.bag.n_instances
        idx = np.arange(n)
        bag, feats, summary = pb.bag, self._feats[i], self._summary[i]
        altered: PatientBag | None = None  # the bag whose summary must be recomputed
        if self.instance_dropout > 0 and n:
            rate = self._rng.uniform(1.0 - self.instance_dropout, 1.0)
            idx = idx[self._rng.random(n) < rate]
            altered = pb
        if self.instance_injection > 0 and self._rng.random() < self.instance_injection:
            injected = self._inject(i, idx)
            if injected is not None:
                bag, feats = injected
                idx = np.arange(bag.n_instances)
                altered = PatientBag(pb.patient_id, pb.center, pb.label, pb.age, bag)
        if altered is not None:
            summary = summary_features(altered, self.spec.summary_names, idx)
        if self.max_instances is not None and len(idx) > self.max_instances:
            idx = np.sort(self._rng.choice(idx, self.max_instances, replace=False))
        s = self.spec
        if s.use_crops:
            crops = torch.from_numpy(np.ascontiguousarray(bag.crops[idx]))
        else:
            crops = torch.zeros((len(idx), s.crop_channels, 0, 0))
        return {
            "crops": crops,
            "feats": torch.from_numpy(np.ascontiguousarray(feats[idx])),
            "summary": torch.from_numpy(summary),
            "label": torch.tensor(pb.label, dtype=torch.long),
            "index": torch.tensor(i, dtype=torch.long),
        }


def collate_bags(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad a list of bags to ``[B, Nmax, ...]`` with a boolean ``mask`` [B, Nmax].

    ``Nmax`` is at least 1 so that a batch of empty bags still has a (fully masked)
    instance axis.
    """
    b = len(items)
    n_max = max([1] + [int(it["feats"].shape[0]) for it in items])
    c0 = items[0]["crops"]
    f = int(items[0]["feats"].shape[1])
    crops = torch.zeros((b, n_max, *c0.shape[1:]), dtype=torch.float32)
    feats = torch.zeros((b, n_max, f), dtype=torch.float32)
    mask = torch.zeros((b, n_max), dtype=torch.bool)
    for j, it in enumerate(items):
        n = int(it["feats"].shape[0])
        if n:
            crops[j, :n] = it["crops"]
            feats[j, :n] = it["feats"]
            mask[j, :n] = True
    return {
        "crops": crops,
        "feats": feats,
        "mask": mask,
        "summary": torch.stack([it["summary"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "index": torch.stack([it["index"] for it in items]),
    }
