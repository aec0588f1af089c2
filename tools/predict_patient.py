#!/usr/bin/env python
"""Microbleeds and CSVD class for new, unlabelled patients, with a trained run's models.

Examples::

    python tools/predict_patient.py --run output/demo --swi X.nii.gz --output out/x
    python tools/predict_patient.py --run output/demo --swi X.nii.gz --brain-mask B.nii.gz \\
        --age 71 --patient-id P01 --output out/x
    python tools/predict_patient.py --run output/demo --manifest new.csv --output out/new

``--run`` is a folder written by ``tools/run_pipeline.py``: the detector's
``train/config.yaml`` + ``train/model_final.pth`` and the MIL model ``mil/model/``
(``--config-file``, ``--weights``, ``--mil-model`` override them). A manifest needs
``patient_id`` and ``swi`` (``brain_mask`` and ``age`` optional; labels are ignored).
Without a brain mask one is computed (a coarse head mask: pass a skull-stripped brain
mask for reliable MARS regions). Age helps the classifier; it is optional.

Per patient, under ``--output/<patient_id>/``:

- ``cmb_pred.nii.gz``: lesion instance ids on the input grid and affine;
- ``lesions.csv``: the lesion census (one row per lesion: ids, voxel and world
  coordinates, volume, diameter, slices, score, MARS region / subregion) and
  ``rejected.csv`` (candidates dropped by shape, place or surround, with the reason);
- ``census.csv``: lesion counts and volumes per region and subregion, and in total;
- ``csvd.json`` and ``csvd.csv``: aSVD / CAA / CADASIL probabilities of the MIL model,
  the predicted class, the rule-based baseline's call with its reason, and the lesions
  that weighed most (highest attention: lesion id, attention, location, region);
- ``attention.csv``: every lesion's attention weight and rank;
- ``bag.npz``: the MIL input (crops + features, ``mil.bagio`` format);
- ``overlay.png``: a montage of the slices through the top-attention lesions (all
  detections outlined in red, the top ones circled and numbered), or the central slices
  when nothing was detected.

``--output/predictions.csv`` gathers one row per patient. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from detection.report import write_json_atomic, write_text_atomic  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

logger = logging.getLogger("cmb.predict_patient")

CLASSES: tuple[str, ...] = ("aSVD", "CAA", "CADASIL")
REGIONS: tuple[str, ...] = ("lobar", "deep", "infratentorial")
TOP_COLUMNS: tuple[str, ...] = ("lesion_id", "attention", "rank", "region", "subregion",
                                "x_mm", "y_mm", "z_mm", "i", "j", "k", "diameter_mm",
                                "volume_mm3", "n_slices", "max_score")


class InputError(ValueError):
    """Bad command-line input or an incomplete run folder (message names the file)."""


def run_files(run: str | os.PathLike, config_file: str | None = None, weights: str | None = None,
              mil_model: str | None = None) -> dict[str, Path]:
    """The detector config, weights, MIL model and bag parameters of a run folder;
    raises :class:`InputError` listing whatever is missing."""
    run = Path(run)
    files = {
        "config": Path(config_file) if config_file else run / "train" / "config.yaml",
        "weights": Path(weights) if weights else run / "train" / "model_final.pth",
        "mil_model": Path(mil_model) if mil_model else run / "mil" / "model",
    }
    missing = [f"{k}: {p}" for k, p in files.items() if not p.exists()]
    mil = files["mil_model"]
    mil_pth = mil / "model.pth" if mil.is_dir() else mil
    if mil.exists() and not (mil_pth.is_file() and mil_pth.with_suffix(".json").is_file()):
        missing.append(f"mil_model: {mil_pth} and {mil_pth.with_suffix('.json')}")
    if missing:
        raise InputError(f"run folder {run} is incomplete (run tools/run_pipeline.py first, "
                         "or pass the files explicitly); missing:\n  " + "\n  ".join(missing))
    files["bags_meta"] = run / "bags" / "bags_meta.json"
    return files


def _patient_id(swi: Path) -> str:
    name = swi.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.lower() in ("swi", "image", "img") and swi.parent.name:
        return swi.parent.name
    return name


def patients_from_args(args: argparse.Namespace) -> pd.DataFrame:
    """``patient_id, swi, brain_mask, age`` rows from ``--swi`` or ``--manifest``."""
    if args.swi:
        swi = Path(args.swi)
        if not swi.is_file():
            raise InputError(f"--swi {swi}: file not found")
        if args.brain_mask and not Path(args.brain_mask).is_file():
            raise InputError(f"--brain-mask {args.brain_mask}: file not found")
        return pd.DataFrame([{"patient_id": args.patient_id or _patient_id(swi),
                              "swi": str(swi.resolve()),
                              "brain_mask": str(Path(args.brain_mask).resolve())
                              if args.brain_mask else "",
                              "age": float(args.age) if args.age is not None else math.nan}])
    path = Path(args.manifest)
    if not path.is_file():
        raise InputError(f"--manifest {path}: file not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    missing = [c for c in ("patient_id", "swi") if c not in df.columns]
    if missing:
        raise InputError(f"--manifest {path}: missing column(s) {missing} (found "
                         f"{list(df.columns)})")
    if df["patient_id"].duplicated().any():
        raise InputError(f"--manifest {path}: duplicate patient_id "
                         f"{sorted(set(df['patient_id'][df['patient_id'].duplicated()]))}")

    def resolve(v: str) -> str:
        v = str(v).strip()
        if not v:
            return ""
        q = Path(v)
        return str(q if q.is_absolute() else (path.parent / q).resolve())

    out = pd.DataFrame({"patient_id": df["patient_id"].str.strip(),
                        "swi": [resolve(v) for v in df["swi"]]})
    out["brain_mask"] = [resolve(v) for v in df["brain_mask"]] if "brain_mask" in df else ""
    out["age"] = pd.to_numeric(df["age"], errors="coerce") if "age" in df else math.nan
    problems = [f"line {n + 2} ({r.patient_id}): {col} {getattr(r, col)} not found"
                for n, r in enumerate(out.itertuples(index=False))
                for col in ("swi", "brain_mask")
                if getattr(r, col) and not Path(getattr(r, col)).is_file()]
    problems += [f"line {n + 2} ({r.patient_id}): empty swi"
                 for n, r in enumerate(out.itertuples(index=False)) if not r.swi]
    if problems:
        raise InputError(f"--manifest {path}:\n  " + "\n  ".join(problems))
    return out


def region_census(table: pd.DataFrame) -> pd.DataFrame:
    """Counts and volumes per MARS region, per subregion, and in total."""
    rows = []
    for r in REGIONS:
        sub = table[table["region"] == r] if len(table) else table
        rows.append({"level": "region", "name": r, "n_lesions": len(sub),
                     "volume_mm3": float(sub["volume_mm3"].sum()) if len(sub) else 0.0})
    other = table[~table["region"].isin(REGIONS)] if len(table) else table
    if len(other):
        rows.append({"level": "region", "name": "unknown", "n_lesions": len(other),
                     "volume_mm3": float(other["volume_mm3"].sum())})
    if len(table) and "subregion" in table:
        for (reg, sr), sub in table.groupby(["region", table["subregion"].fillna("")],
                                            sort=True):
            if sr:
                rows.append({"level": "subregion", "name": f"{reg}/{sr}",
                             "n_lesions": len(sub), "volume_mm3": float(sub["volume_mm3"].sum())})
    rows.append({"level": "total", "name": "all", "n_lesions": len(table),
                 "volume_mm3": float(table["volume_mm3"].sum()) if len(table) else 0.0})
    return pd.DataFrame(rows, columns=["level", "name", "n_lesions", "volume_mm3"])


def attention_montage(swi_ras: np.ndarray, labels_ras: np.ndarray, top: pd.DataFrame,
                      path: Path, title: str, max_panels: int = 8) -> Path:
    """PNG: axial slices through the top-attention lesions (all detections outlined in
    red, the ranked lesion circled in yellow), or 4 central slices without lesions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(swi_ras, [1, 99])
    panels: list[tuple[int, str, tuple[float, float] | None]] = []
    for r in top.head(max_panels).itertuples(index=False):
        panels.append((int(round(r.k)), f"#{r.rank} lesion {r.lesion_id} ({r.region}), "
                                        f"att {r.attention:.2f}", (float(r.i), float(r.j))))
    if not panels:
        nz = swi_ras.shape[2]
        panels = [(int(z), f"slice {int(z)}: no CMB detected", None)
                  for z in np.linspace(nz * 0.3, nz * 0.7, 4)]
    ncol = min(4, len(panels))
    nrow = int(math.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.5 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (z, label, centre) in zip(axes.ravel(), panels):
        z = int(np.clip(z, 0, swi_ras.shape[2] - 1))
        ax.imshow(swi_ras[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        if labels_ras[:, :, z].any():
            ax.contour((labels_ras[:, :, z] > 0).T, levels=[0.5], colors="red",
                       linewidths=0.8)
        if centre is not None:
            ax.add_patch(plt.Circle(centre, radius=max(swi_ras.shape[:2]) * 0.05,
                                    fill=False, color="yellow", lw=1.0))
        ax.set_title(f"{label}\nslice {z}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


class PatientPredictor:
    """Detector + MIL classifier of a run, applied to one SWI at a time."""

    def __init__(self, files: dict[str, Path], opts: Sequence[str] = (), top_k: int = 5,
                 overlay: bool = True) -> None:
        import detection  # noqa: F401  (compat shims before detectron2)
        from detection.engine import setup_cfg
        from detection.inference import VolumePredictor

        from mil.baseline import BaselineRule
        from mil.model import load_checkpoint

        self.files = files
        cfg = setup_cfg(files["config"], list(opts))
        self.detector = VolumePredictor(cfg, str(files["weights"]))
        self.mil, self.mil_info = load_checkpoint(files["mil_model"])
        rule = self.mil_info.get("meta", {}).get("config", {}).get("baseline", {})
        self.rule = BaselineRule(**rule)
        meta = {}
        if files["bags_meta"].is_file():
            meta = json.loads(files["bags_meta"].read_text())
        self.bag_params = {
            "crop_mm": float(meta.get("crop_mm", 16.0)),
            "crop_px": int(self.mil.spec.crop_size or meta.get("crop_px", 32)),
            "context_offset": int(meta.get("context_offset", 1)),
            "shell_mm": float(meta.get("shell_mm", 3.0)),
        }
        self.top_k = top_k
        self.overlay = overlay

    def __call__(self, patient_id: str, swi: str, brain_mask: str = "", age: float = math.nan,
                 out_root: Path = Path(".")) -> dict[str, Any]:
        """Predict one patient; write its folder; return its summary row."""
        from detection.bags import write_patient_bag

        from mil.bagio import load_bag
        from mil.baseline import predict_baseline
        from mil.dataset import PatientBag
        from mil.train import predict

        out = out_root / patient_id
        out.mkdir(parents=True, exist_ok=True)
        pred = self.detector(swi, brain_mask or None, patient_id=patient_id)
        pred.write(out, overlay=False)
        table = pred.table.reset_index(drop=True)
        write_text_atomic(out / "census.csv", region_census(table).to_csv(index=False))
        bag_path, n = write_patient_bag(out / "bag.npz", patient_id, pred.volume,
                                        pred.labels_ras, table, pred.brain_ras,
                                        **self.bag_params)
        bag = load_bag(bag_path)
        pb = PatientBag(patient_id, "new", -1, float(age), bag)
        probs, att = predict(self.mil, [pb])
        p, a = probs[0], att[0]
        base_p, base_c, reasons = predict_baseline([bag], [None if math.isnan(age) else age],
                                                   self.rule)
        att_df = table.copy()
        att_df["attention"] = (pd.Series(a, index=bag.lesion_ids).reindex(
            att_df["lesion_id"].to_numpy()).to_numpy() if len(att_df) else [])
        att_df = att_df.sort_values("attention", ascending=False, kind="stable")
        att_df["rank"] = np.arange(1, len(att_df) + 1)
        cols = [c for c in TOP_COLUMNS if c in att_df.columns]
        write_text_atomic(out / "attention.csv", att_df[cols].to_csv(index=False))
        top = att_df.head(self.top_k)
        counts = {r: int((table["region"] == r).sum()) if len(table) else 0 for r in REGIONS}
        pred_class = CLASSES[int(np.argmax(p))]
        result = {
            "patient_id": patient_id,
            "swi": str(swi),
            "brain_mask": brain_mask or "computed (coarse head mask)",
            "age": None if math.isnan(age) else float(age),
            "predicted_class": pred_class,
            "probabilities": {c: float(v) for c, v in zip(CLASSES, p)},
            "rule_based_baseline": {
                "predicted_class": CLASSES[int(base_c[0])], "reason": reasons[0],
                "probabilities": {c: float(v) for c, v in zip(CLASSES, base_p[0])},
            },
            "n_lesions": int(len(table)),
            "lesions_per_region": counts,
            "n_rejected_candidates": int(len(pred.rejected)),
            "top_lesions": top[cols].to_dict("records"),
            "models": {k: str(v) for k, v in self.files.items()},
            "notes": "Attention: the share of the patient's evidence the MIL model took from "
                     "each lesion (sums to 1 over the lesions; empty bag: none). Research "
                     "software, not a medical device.",
        }
        write_json_atomic(out / "csvd.json", result)  # NaN -> null, numpy -> Python
        row = {"patient_id": patient_id, "predicted_class": pred_class,
               **{f"prob_{c}": float(v) for c, v in zip(CLASSES, p)},
               "baseline_class": CLASSES[int(base_c[0])], "n_lesions": int(len(table)),
               **{f"n_{r}": counts[r] for r in REGIONS},
               "top_lesion_ids": " ".join(str(int(i)) for i in top["lesion_id"])}
        write_text_atomic(out / "csvd.csv", pd.DataFrame([row]).to_csv(index=False))
        if self.overlay:
            title = (f"{patient_id}: {len(table)} CMB(s); MIL {pred_class} "
                     f"(p = {p.max():.2f}); yellow = highest attention")
            attention_montage(pred.volume.data, pred.labels_ras, top, out / "overlay.png", title)
        logger.info("%s: %d lesion(s) %s -> %s (p=%.2f); baseline %s", patient_id, len(table),
                    counts, pred_class, p.max(), CLASSES[int(base_c[0])])
        return row


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder of tools/run_pipeline.py")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--swi", help="SWI NIfTI of one patient")
    src.add_argument("--manifest", help="manifest CSV (patient_id, swi[, brain_mask, age])")
    ap.add_argument("--brain-mask", help="brain mask NIfTI on the SWI's grid (with --swi)")
    ap.add_argument("--patient-id", help="patient id (with --swi; default from the file name)")
    ap.add_argument("--age", type=float, help="age in years (with --swi)")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--config-file", help="detector config (default <run>/train/config.yaml)")
    ap.add_argument("--weights", help="detector weights (default <run>/train/model_final.pth)")
    ap.add_argument("--mil-model", help="MIL model folder (default <run>/mil/model)")
    ap.add_argument("--top-k", type=int, default=5, help="lesions listed as weighing most")
    ap.add_argument("--no-overlay", action="store_true", help="skip overlay.png")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default %(default)s: next to other processes, "
                         "more threads were several times slower)")
    ap.add_argument("opts", nargs=argparse.REMAINDER,
                    help="Detectron2 config overrides KEY VALUE ...")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on bad input."""
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("fvcore", "detectron2.checkpoint", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.manifest and (args.brain_mask or args.patient_id or args.age is not None):
        ap.error("--brain-mask, --patient-id and --age go with --swi (a manifest has columns)")
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    try:
        files = run_files(args.run, args.config_file, args.weights, args.mil_model)
        patients = patients_from_args(args)
    except InputError as exc:
        logger.error("%s", exc)
        return 2
    out_root = Path(args.output)
    out_root.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(max(1, args.threads))
    predictor = PatientPredictor(files, opts, top_k=args.top_k, overlay=not args.no_overlay)
    from tqdm import tqdm

    rows = []
    for r in tqdm(list(patients.itertuples(index=False)), desc="patients",
                  disable=len(patients) < 2):
        age = float(r.age) if r.age is not None and not pd.isna(r.age) else math.nan
        rows.append(predictor(str(r.patient_id), str(r.swi), str(r.brain_mask or ""), age,
                              out_root))
    write_text_atomic(out_root / "predictions.csv", pd.DataFrame(rows).to_csv(index=False))
    for row in rows:
        print(f"{row['patient_id']}: {row['n_lesions']} CMB(s) -> {row['predicted_class']} "
              f"(" + ", ".join(f"{c} {row[f'prob_{c}']:.2f}" for c in CLASSES) + ")")
    print(f"outputs: {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
