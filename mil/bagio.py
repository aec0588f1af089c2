"""Bag file format (DESIGN.md contract 4) and the bag index CSV.

One ``.npz`` file per patient, loadable with ``allow_pickle=False``:

========== ================= =============================================
key        dtype / shape     meaning
========== ================= =============================================
crops      float32 [N,C,S,S] one 2.5D patch per lesion (C = 3 slices)
features   float32 [N, F]    instance features, columns named below
feature_names  str [F]       column names (see :data:`mil.FEATURE_NAMES`)
lesion_ids int64 [N]         lesion ids (as in ``lesions.csv``), unique
patient_id str scalar        the patient
========== ================= =============================================

``N`` may be 0 (no lesion detected); the crops array then has shape ``[0, C, S, S]``.

The index CSV has the columns ``patient_id, center, label, n_instances, path``
(``path`` relative to the CSV's folder, or absolute) plus any extra columns (e.g.
``age``) which are kept. ``label`` may be empty for unlabelled (inference) bags.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mil import CLASSES

logger = logging.getLogger(__name__)

INDEX_COLUMNS: tuple[str, ...] = ("patient_id", "center", "label", "n_instances", "path")
BAG_KEYS: tuple[str, ...] = ("crops", "features", "feature_names", "lesion_ids", "patient_id")


class BagFormatError(ValueError):
    """A bag file or a bag index is malformed; the message names the file (and row)."""


@dataclass
class Bag:
    """One patient's bag of lesion instances."""

    patient_id: str
    crops: np.ndarray  # float32 [N, C, S, S]
    features: np.ndarray  # float32 [N, F]
    feature_names: tuple[str, ...]
    lesion_ids: np.ndarray  # int64 [N]

    @property
    def n_instances(self) -> int:
        """Number of instances (lesions) N."""
        return int(self.features.shape[0])

    @property
    def crop_size(self) -> int:
        """Crop side length S."""
        return int(self.crops.shape[-1])

    def has_feature(self, name: str) -> bool:
        """Whether the feature column ``name`` is present."""
        return name in self.feature_names

    def feature(self, name: str) -> np.ndarray:
        """The feature column ``name`` as a float32 vector of length N."""
        try:
            j = self.feature_names.index(name)
        except ValueError as exc:
            raise KeyError(
                f"bag {self.patient_id!r} has no feature {name!r} (has {list(self.feature_names)})"
            ) from exc
        return self.features[:, j]

    def select_features(self, names: Sequence[str],
                        rows: Sequence[int] | None = None) -> np.ndarray:
        """Feature matrix [N, len(names)] with the columns in the order of ``names``; only
        the instances ``rows`` (in that order) when given, without copying the rest."""
        missing = [n for n in names if n not in self.feature_names]
        if missing:
            raise KeyError(f"bag {self.patient_id!r} lacks feature column(s) {missing}")
        idx = [self.feature_names.index(n) for n in names]
        if rows is None:
            return self.features[:, idx]
        return self.features[np.ix_(np.asarray(rows, dtype=np.intp), idx)]


def _validate(
    crops: np.ndarray,
    features: np.ndarray,
    feature_names: Sequence[str],
    lesion_ids: np.ndarray,
    patient_id: str,
    where: str,
) -> None:
    if not isinstance(patient_id, str) or not patient_id:
        raise BagFormatError(f"{where}: patient_id must be a non-empty string, got {patient_id!r}")
    if features.ndim != 2:
        raise BagFormatError(f"{where}: features must be 2-D [N, F], got shape {features.shape}")
    n, f = features.shape
    if len(feature_names) != f:
        raise BagFormatError(
            f"{where}: {len(feature_names)} feature names for {f} feature columns"
        )
    if len(set(feature_names)) != len(feature_names):
        raise BagFormatError(f"{where}: duplicate feature names {list(feature_names)}")
    if crops.ndim != 4 or crops.shape[0] != n or crops.shape[2] != crops.shape[3]:
        raise BagFormatError(
            f"{where}: crops must be [N={n}, C, S, S], got shape {crops.shape}"
        )
    if lesion_ids.ndim != 1 or lesion_ids.shape[0] != n:
        raise BagFormatError(f"{where}: lesion_ids must be [N={n}], got shape {lesion_ids.shape}")
    if len(np.unique(lesion_ids)) != n:
        raise BagFormatError(f"{where}: lesion_ids are not unique")


def save_bag(
    path: str | os.PathLike,
    crops: np.ndarray,
    features: np.ndarray,
    feature_names: Sequence[str],
    lesion_ids: Sequence[int] | np.ndarray,
    patient_id: str,
) -> Path:
    """Write one patient's bag atomically (temporary file + rename) as ``.npz``.

    Args:
        path: destination, conventionally ``<bags>/<patient_id>.npz``.
        crops: ``[N, C, S, S]`` patches (cast to float32); ``[0, C, S, S]`` for an empty bag.
        features: ``[N, F]`` instance features (cast to float32).
        feature_names: the ``F`` column names (e.g. from :data:`mil.FEATURE_NAMES`).
        lesion_ids: ``N`` unique integer lesion ids.
        patient_id: the patient.

    Returns:
        The written path.
    """
    path = Path(path)
    crops = np.ascontiguousarray(crops, dtype=np.float32)
    features = np.asarray(features, dtype=np.float32)
    if features.ndim == 1 and features.size == 0:
        features = features.reshape(0, len(feature_names))
    lesion_ids = np.asarray(lesion_ids, dtype=np.int64).reshape(-1)
    names = [str(n) for n in feature_names]
    _validate(crops, features, names, lesion_ids, patient_id, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(
                fh,
                crops=crops,
                features=features,
                feature_names=np.asarray(names, dtype=np.str_).reshape(len(names)),
                lesion_ids=lesion_ids,
                patient_id=np.asarray(patient_id, dtype=np.str_),
            )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_bag(path: str | os.PathLike) -> Bag:
    """Read a bag written by :func:`save_bag` (``allow_pickle=False``).

    Raises:
        BagFormatError: the file is missing keys, unreadable or inconsistent.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bag file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in BAG_KEYS if k not in z.files]
            if missing:
                raise BagFormatError(f"{path}: missing key(s) {missing} (has {z.files})")
            crops = z["crops"].astype(np.float32, copy=False)
            features = z["features"].astype(np.float32, copy=False)
            names = tuple(str(s) for s in z["feature_names"].reshape(-1).tolist())
            lesion_ids = z["lesion_ids"].astype(np.int64, copy=False)
            patient_id = str(z["patient_id"].reshape(()).item())
    except BagFormatError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BagFormatError(f"{path}: not a readable bag file ({exc})") from exc
    if features.ndim == 2 and features.shape[0] == 0 and features.shape[1] != len(names):
        features = features.reshape(0, len(names))
    _validate(crops, features, names, lesion_ids, patient_id, str(path))
    return Bag(patient_id, crops, features, names, lesion_ids)


def bag_n_instances(path: str | os.PathLike) -> int:
    """Number of instances in a bag file, reading only its ``lesion_ids`` array."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(z["lesion_ids"].shape[0])
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BagFormatError(f"{path}: not a readable bag file ({exc})") from exc


def _atomic_write_csv(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            df.to_csv(fh, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_index(
    csv_path: str | os.PathLike,
    entries: Iterable[Mapping[str, object]],
) -> Path:
    """Write the bag index CSV atomically.

    Each entry maps ``patient_id``, ``center``, ``label`` (class name, or empty/None
    when unknown) and ``path`` (the bag file; absolute or relative to the current
    directory -- it is stored relative to the CSV's folder). ``n_instances`` is read
    from the bag when absent. Any other keys (e.g. ``age``) become extra columns.

    Returns:
        The written path.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent.resolve()
    rows = []
    for i, e in enumerate(entries):
        e = dict(e)
        for key in ("patient_id", "center", "path"):
            if key not in e:
                raise BagFormatError(f"{csv_path}: index entry {i} lacks {key!r}")
        bag_path = Path(str(e["path"]))
        abs_path = bag_path if bag_path.is_absolute() else Path.cwd() / bag_path
        if "n_instances" not in e or e["n_instances"] is None:
            e["n_instances"] = bag_n_instances(abs_path)
        label = e.get("label")
        missing_label = label is None or (isinstance(label, float) and np.isnan(label))
        e["label"] = "" if missing_label else label
        try:
            e["path"] = os.path.relpath(abs_path.resolve(), root)
        except ValueError:  # different drive (Windows)
            e["path"] = str(abs_path.resolve())
        rows.append(e)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=list(INDEX_COLUMNS))
    extra = [c for c in df.columns if c not in INDEX_COLUMNS]
    df = df[list(INDEX_COLUMNS) + extra]
    _validate_index(df, csv_path, check_files=True)
    _atomic_write_csv(df, csv_path)
    return csv_path


def _validate_index(df: pd.DataFrame, csv_path: Path, check_files: bool) -> None:
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise BagFormatError(f"{csv_path}: missing column(s) {missing} (has {list(df.columns)})")
    dup = df["patient_id"][df["patient_id"].duplicated()]
    if len(dup):
        rows = [int(i) + 2 for i in dup.index]  # header is line 1
        raise BagFormatError(
            f"{csv_path}: duplicate patient_id {sorted(set(dup))} (line(s) {rows})"
        )
    for i, row in df.iterrows():
        line = int(i) + 2
        label = row["label"]
        if label and label not in CLASSES:
            raise BagFormatError(
                f"{csv_path} line {line} ({row['patient_id']}): unknown label {label!r}; "
                f"expected one of {list(CLASSES)} or empty"
            )
        if not check_files:
            continue
        bag_path = Path(str(row["path"]))
        if not bag_path.is_absolute():
            bag_path = csv_path.parent / bag_path
        if not bag_path.is_file():
            raise BagFormatError(
                f"{csv_path} line {line} ({row['patient_id']}): bag file not found: {bag_path}"
            )
        n = bag_n_instances(bag_path)
        try:
            n_index = int(row["n_instances"])
        except (TypeError, ValueError) as exc:
            raise BagFormatError(
                f"{csv_path} line {line} ({row['patient_id']}): n_instances "
                f"{row['n_instances']!r} is not an integer"
            ) from exc
        if n != n_index:
            raise BagFormatError(
                f"{csv_path} line {line} ({row['patient_id']}): n_instances={n_index} but "
                f"bag file {bag_path} holds {n} instance(s)"
            )


def read_index(csv_path: str | os.PathLike, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a bag index CSV.

    Validation (each error names the CSV, line and patient): required columns,
    duplicate ``patient_id``, unknown label, missing bag file, ``n_instances`` not
    matching the bag file.

    Returns:
        DataFrame with the index columns (``patient_id``/``center``/``label`` as str,
        empty label = unknown), extra columns kept (``age`` as float when present),
        and ``bag_path``: the absolute bag path.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"bag index not found: {csv_path}")
    df = pd.read_csv(
        csv_path,
        dtype={"patient_id": str, "center": str, "label": str, "path": str},
        keep_default_na=False,
        na_values={"age": ["", "NA", "NaN", "nan"]},
    )
    _validate_index(df, csv_path, check_files=check_files)
    df["n_instances"] = df["n_instances"].astype(int)
    if "age" in df.columns:
        df["age"] = pd.to_numeric(df["age"], errors="coerce").astype(float)
    root = csv_path.parent.resolve()
    df["bag_path"] = [
        str(Path(p)) if Path(p).is_absolute() else str(root / p) for p in df["path"]
    ]
    return df.reset_index(drop=True)
