"""Register an export folder's COCO splits with Detectron2.

After ``register_cmb_datasets("datasets/cmb_coco")`` a config can say
``DATASETS.TRAIN = ("cmb_fold0_train",)`` / ``DATASETS.TEST = ("cmb_external",)``.
Registration goes through Detectron2's ``register_coco_instances`` (metadata:
``json_file``, ``image_root``, ``evaluator_type="coco"``, ``thing_classes=["cmb"]``);
the dataset dicts additionally carry ``patient_id``, ``center``, ``label`` and
``slice_index`` per image and ``lesion_id`` per annotation.
"""

from __future__ import annotations

import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .export_coco import rebuild_volume_mask

__all__ = [
    "register_cmb_datasets",
    "load_cmb_coco_json",
    "rebuild_volume_mask",
    "split_names",
    "dataset_summary",
]

logger = logging.getLogger(__name__)

_SPLIT = re.compile(r"^(fold(\d+)_(train|val)|dev|external)$")
IMAGE_FIELDS = ("patient_id", "center", "label", "slice_index")


def load_cmb_coco_json(
    json_file: str, image_root: str, dataset_name: str | None = None
) -> list[dict]:
    """``load_coco_json`` plus the export's per-image fields and each annotation's ``lesion_id``."""
    dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["lesion_id"])
    with open(json_file) as f:
        by_id = {im["id"]: im for im in json.load(f)["images"]}
    for d in dicts:
        im = by_id[d["image_id"]]
        for key in IMAGE_FIELDS:
            if key in im:
                d[key] = im[key]
    return dicts


def _sort_key(split: str) -> tuple[int, int, str]:
    m = _SPLIT.match(split)
    if m and m.group(2) is not None:
        return (1, int(m.group(2)), m.group(3))
    return (0, 0, split)


def split_names(root: str | Path) -> list[str]:
    """Splits present in ``root``: ``dev``, ``external``, ``fold{k}_train``, ``fold{k}_val``."""
    ann = Path(root) / "annotations"
    return sorted((p.stem for p in ann.glob("*.json") if _SPLIT.match(p.stem)), key=_sort_key)


def _unregister(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_cmb_datasets(
    root: str | Path, prefix: str = "cmb", extra_fields: bool = True
) -> list[str]:
    """Register every split of the export at ``root`` as ``{prefix}_{split}``; return the names.

    Idempotent: a name already registered for the same json file and image root is
    kept; one registered elsewhere is replaced (with a log line). Names of this
    prefix whose json file has disappeared from ``root`` (e.g. fewer folds after a
    re-export) are unregistered.
    """
    root = Path(root).resolve()
    ann_dir = root / "annotations"
    splits = split_names(root)
    if not splits:
        raise FileNotFoundError(f"no COCO split files (annotations/*.json) under {root}")
    names = []
    for split in splits:
        name = f"{prefix}_{split}"
        json_file = str(ann_dir / f"{split}.json")
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            same = getattr(meta, "json_file", None) == json_file and str(
                getattr(meta, "image_root", "")
            ) == str(root)
            if same:
                names.append(name)
                continue
            logger.info("re-registering %s: now %s", name, json_file)
            _unregister(name)
        register_coco_instances(name, {"thing_classes": ["cmb"]}, json_file, str(root))
        if extra_fields:
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, partial(load_cmb_coco_json, json_file, str(root), name))
        names.append(name)
    # Drop names of this prefix that point into this export but no longer exist.
    pattern = re.compile(rf"^{re.escape(prefix)}_(fold\d+_(train|val)|dev|external)$")
    for name in list(DatasetCatalog.list()):
        if pattern.match(name) and name not in names:
            jf = getattr(MetadataCatalog.get(name), "json_file", "")
            if jf and Path(jf).parent == ann_dir and not Path(jf).is_file():
                logger.info("unregistering %s: %s no longer exists", name, jf)
                _unregister(name)
    logger.info("registered %d CMB dataset(s) from %s", len(names), root)
    return names


def dataset_summary(name: str) -> dict[str, Any]:
    """Counts for a registered split: images, annotations, patients, positive slices."""
    dicts = DatasetCatalog.get(name)
    return {
        "images": len(dicts),
        "annotations": sum(len(d.get("annotations", [])) for d in dicts),
        "patients": len({d.get("patient_id") for d in dicts}),
        "positive_images": sum(1 for d in dicts if d.get("annotations")),
    }
