"""Cohort manifests: read and validate a manifest CSV or an nnU-Net-style folder.

Both readers return a :class:`pandas.DataFrame` with one row per patient and the
columns ``patient_id, center, label, swi, cmb_mask, brain_mask, age`` (paths made
absolute, ``""`` where absent, ``age`` float or NaN) followed by any extra columns
of the input, unchanged. Every problem found is collected and raised as ONE
:class:`~detection.data.volume.CohortError` that lists each bad row.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .volume import CohortError

__all__ = [
    "LABELS",
    "REQUIRED_COLUMNS",
    "read_manifest",
    "read_nnunet_folder",
    "read_cohort",
    "check_grids",
]

logger = logging.getLogger(__name__)

#: Class labels (DESIGN.md contract 1); matched case-insensitively, stored canonical.
LABELS = ("aSVD", "CAA", "CADASIL")
REQUIRED_COLUMNS = ("patient_id", "center", "label", "swi")
OPTIONAL_PATH_COLUMNS = ("cmb_mask", "brain_mask")
_CANONICAL = {lab.lower(): lab for lab in LABELS}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NIFTI_EXT = (".nii.gz", ".nii")


def _raise(source: str, problems: list[str]) -> None:
    if problems:
        head = f"{source}: {len(problems)} problem(s) in the cohort:"
        raise CohortError("\n  ".join([head, *problems]))


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _validate_rows(
    df: pd.DataFrame,
    base: Path,
    where: list[str],
    require_labels: bool,
    require_masks: bool,
    check_files: bool,
) -> tuple[pd.DataFrame, list[str]]:
    """Normalise columns in place; return (df, problems). ``where[i]`` names row i."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    labels, swis, masks, brains, ages = [], [], [], [], []
    for i, r in enumerate(df.to_dict("records")):
        pid = str(r["patient_id"]).strip()
        tag = f"{where[i]} (patient_id {pid!r})" if pid else where[i]
        if not pid:
            problems.append(f"{tag}: empty patient_id")
        elif not _SAFE_ID.match(pid):
            problems.append(
                f"{tag}: patient_id may hold only letters, digits, '.', '_', '-' "
                "(it names output folders)"
            )
        elif pid in seen:
            problems.append(f"{tag}: duplicate patient_id (first at {seen[pid]})")
        else:
            seen[pid] = where[i]
        if not str(r["center"]).strip():
            problems.append(f"{tag}: empty center")
        lab = str(r["label"]).strip()
        if lab:
            canon = _CANONICAL.get(lab.lower())
            if canon is None:
                problems.append(
                    f"{tag}: unknown label {lab!r} (expected one of {', '.join(LABELS)})"
                )
            lab = canon or lab
        elif require_labels:
            problems.append(f"{tag}: empty label (training needs one of {', '.join(LABELS)})")
        labels.append(lab)

        def path_of(col: str, required: bool, tag: str = tag, r: dict = r) -> str:
            val = str(r.get(col, "") or "").strip()
            if not val:
                if required:
                    problems.append(f"{tag}: empty {col}")
                return ""
            p = _resolve(val, base)
            if check_files and not p.is_file():
                problems.append(f"{tag}: {col} file not found: {p}")
            return str(p)

        swis.append(path_of("swi", True))
        masks.append(path_of("cmb_mask", require_masks))
        brains.append(path_of("brain_mask", False))
        age = str(r.get("age", "") or "").strip()
        if age:
            try:
                ages.append(float(age))
            except ValueError:
                problems.append(f"{tag}: age {age!r} is not a number")
                ages.append(np.nan)
        else:
            ages.append(np.nan)
    df["patient_id"] = df["patient_id"].astype(str).str.strip()
    df["center"] = df["center"].astype(str).str.strip()
    df["label"] = labels
    df["swi"] = swis
    df["cmb_mask"] = masks
    df["brain_mask"] = brains
    df["age"] = np.asarray(ages, dtype=np.float64)
    return df, problems


def _order(df: pd.DataFrame) -> pd.DataFrame:
    first = ["patient_id", "center", "label", "swi", "cmb_mask", "brain_mask", "age"]
    return df[first + [c for c in df.columns if c not in first]].reset_index(drop=True)


def read_manifest(
    path: str | Path,
    require_labels: bool = False,
    require_masks: bool = False,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate a cohort manifest CSV (DESIGN.md contract 1).

    Relative paths are resolved against the CSV's folder. Raises one
    :class:`CohortError` listing every problem (missing columns, empty cohort,
    duplicate ids, unknown labels, missing files, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"manifest {path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise CohortError(f"manifest {path}: empty file (no header, no rows)") from None
    except Exception as exc:
        raise CohortError(
            f"manifest {path}: cannot parse CSV ({type(exc).__name__}: {exc})"
        ) from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CohortError(
            f"manifest {path}: missing column(s) {', '.join(missing)} "
            f"(required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(df.columns) or 'none'})"
        )
    if require_masks and "cmb_mask" not in df.columns:
        raise CohortError(f"manifest {path}: missing column cmb_mask (needed for training export)")
    if len(df) == 0:
        raise CohortError(f"manifest {path}: empty cohort (header but no patient rows)")
    for col in ("cmb_mask", "brain_mask", "age"):
        if col not in df.columns:
            df[col] = ""
    where = [f"line {i + 2}" for i in range(len(df))]
    df, problems = _validate_rows(
        df, path.parent, where, require_labels, require_masks, check_files
    )
    _raise(f"manifest {path}", problems)
    return _order(df)


def _strip_ext(name: str) -> str | None:
    for ext in _NIFTI_EXT:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _scan_images(folder: Path) -> dict[str, Path]:
    """``{case: path}`` of channel-0000 images in an nnU-Net images folder."""
    cases: dict[str, Path] = {}
    extra_channels = 0
    for p in sorted(folder.iterdir()):
        stem = _strip_ext(p.name)
        if stem is None or "_" not in stem:
            continue
        case, channel = stem.rsplit("_", 1)
        if not channel.isdigit():
            continue
        if int(channel) == 0:
            cases[case] = p
        else:
            extra_channels += 1
    if extra_channels:
        logger.warning(
            "%s: %d non-0000 channel file(s) ignored (SWI is channel 0000)", folder, extra_channels
        )
    return cases


def read_nnunet_folder(
    folder: str | Path,
    labels_csv: str | Path | None = None,
    require_labels: bool = False,
    require_masks: bool = False,
) -> pd.DataFrame:
    """Read an nnU-Net-style folder: ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``,
    optionally ``imagesTs/{case}_0000.nii.gz`` (no masks), plus a labels CSV.

    The labels CSV (default ``<folder>/labels.csv``) has ``case_id`` (or ``patient_id``),
    ``label``, ``center`` and optionally ``age``; extra columns are kept. Every case
    needs a CSV row and every CSV row an image. Column ``split`` tells ``Tr``/``Ts``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CohortError(f"nnU-Net folder {folder}: not a directory")
    labels_csv = Path(labels_csv) if labels_csv else folder / "labels.csv"
    if not labels_csv.is_file():
        raise CohortError(f"nnU-Net folder {folder}: labels CSV {labels_csv} not found")
    try:
        lab = pd.read_csv(labels_csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise CohortError(f"labels CSV {labels_csv}: empty file") from None
    lab.columns = [str(c).strip() for c in lab.columns]
    if "case_id" in lab.columns and "patient_id" not in lab.columns:
        lab = lab.rename(columns={"case_id": "patient_id"})
    missing = [c for c in ("patient_id", "center", "label") if c not in lab.columns]
    if missing:
        raise CohortError(
            f"labels CSV {labels_csv}: missing column(s) {', '.join(missing)} "
            "(required: case_id or patient_id, center, label)"
        )
    if not (folder / "imagesTr").is_dir() and not (folder / "imagesTs").is_dir():
        raise CohortError(f"nnU-Net folder {folder}: neither imagesTr/ nor imagesTs/ exists")
    images: dict[str, tuple[Path, str]] = {}
    problems: list[str] = []
    for split in ("Tr", "Ts"):
        d = folder / f"images{split}"
        if d.is_dir():
            for case, p in _scan_images(d).items():
                if case in images:
                    problems.append(f"case {case!r}: image in both imagesTr and imagesTs")
                images[case] = (p, split)
    if not images:
        raise CohortError(f"nnU-Net folder {folder}: empty cohort (no {{case}}_0000.nii.gz images)")
    lab["patient_id"] = lab["patient_id"].astype(str).str.strip()
    rows = []
    where = []
    csv_ids = set()
    for i, r in enumerate(lab.to_dict("records")):
        pid = r["patient_id"]
        csv_ids.add(pid)
        if pid not in images:
            problems.append(f"{labels_csv} line {i + 2} (case {pid!r}): no image {pid}_0000.nii.gz")
            continue
        img, split = images[pid]
        mask = ""
        if split == "Tr":
            for ext in _NIFTI_EXT:
                cand = folder / "labelsTr" / f"{pid}{ext}"
                if cand.is_file():
                    mask = str(cand)
                    break
            if not mask and require_masks:
                problems.append(f"case {pid!r}: cmb_mask file not found: labelsTr/{pid}.nii.gz")
        r = dict(r, swi=str(img), cmb_mask=mask, split=r.get("split") or split)
        rows.append(r)
        where.append(f"{labels_csv} line {i + 2}")
    for case in sorted(set(images) - csv_ids):
        problems.append(f"case {case!r}: image {images[case][0].name} has no row in {labels_csv}")
    if not rows:
        _raise(f"nnU-Net folder {folder}", problems or ["empty cohort"])
    df = pd.DataFrame(rows)
    for col in ("brain_mask", "age"):
        if col not in df.columns:
            df[col] = ""
    df, row_problems = _validate_rows(df, folder, where, require_labels, False, True)
    _raise(f"nnU-Net folder {folder}", problems + row_problems)
    return _order(df)


def read_cohort(
    path: str | Path,
    labels_csv: str | Path | None = None,
    require_labels: bool = False,
    require_masks: bool = False,
) -> pd.DataFrame:
    """Read a manifest CSV, or an nnU-Net-style folder when ``path`` is a directory."""
    path = Path(path)
    if path.is_dir():
        return read_nnunet_folder(path, labels_csv, require_labels, require_masks)
    return read_manifest(path, require_labels=require_labels, require_masks=require_masks)


def check_grids(df: pd.DataFrame, affine_tol: float = 1e-3, source: str = "cohort") -> None:
    """Header-only check (fast) that every file opens and masks share the SWI's grid.

    Raises one :class:`CohortError` listing every patient with a problem. Voxel data
    (corrupt compressed payloads, NaNs, non-integer masks) is checked at load time.
    """
    problems: list[str] = []
    for r in df.to_dict("records"):
        pid = r["patient_id"]
        who = f"patient {pid!r}"
        ref = None
        for col in ("swi", "cmb_mask", "brain_mask"):
            p = r.get(col) or ""
            if not p:
                continue
            try:
                img = nib.load(p)
            except Exception as exc:
                problems.append(
                    f"{who}: {col} {p}: not a readable NIfTI ({type(exc).__name__}: {exc})"
                )
                continue
            shape = tuple(int(s) for s in img.shape)
            if len(shape) < 3 or any(s != 1 for s in shape[3:]):
                problems.append(
                    f"{who}: {col} {p}: expected a 3D volume (or 4D with a single volume), "
                    f"got shape {shape}"
                )
                continue
            if col == "swi":
                ref = (shape[:3], np.asarray(img.affine))
            elif ref is not None:
                if shape[:3] != ref[0]:
                    problems.append(
                        f"{who}: {col} {p}: shape {shape[:3]} differs from the SWI's {ref[0]}"
                    )
                elif not np.allclose(img.affine, ref[1], rtol=0.0, atol=affine_tol):
                    problems.append(
                        f"{who}: {col} {p}: affine differs from the SWI's (not on the same grid)"
                    )
    _raise(source, problems)


def iter_records(df: pd.DataFrame) -> Iterable[dict]:
    """Rows as plain dicts (convenience for workers)."""
    return df.to_dict("records")
