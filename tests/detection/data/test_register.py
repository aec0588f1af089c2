"""Registering an export with Detectron2, and drawing it with tools/visualize_data.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import detection  # noqa: F401  (compat shims before detectron2)
from detection.config import add_cmb_config
from detection.data.export_coco import (
    DEFAULT_CONTEXT_OFFSET,
    DEFAULT_TARGET_SPACING,
    export_coco,
)
from detection.data.register import dataset_summary, rebuild_volume_mask, register_cmb_datasets

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    get_detection_dataset_dicts,
)

# pycocotools' Cython decode with numpy 2 (not this project's code).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[3]
INSTANT = REPO / "configs" / "quick_schedules" / "cmb_R_18_FPN_instant_test.yaml"


def _cohort(root: Path, n: int = 8) -> Path:
    rows = []
    aff = np.diag([0.9, 0.9, 2.0, 1.0])
    for i in range(n):
        pid = f"R{i}"
        (root / pid).mkdir(parents=True)
        rng = np.random.default_rng(i)
        swi = rng.normal(100, 5, (20, 22, 6)).astype(np.float32)
        mask = np.zeros(swi.shape, np.int16)
        if i % 4:
            mask[5:7, 6:8, 1:4] = 1
            mask[12:14, 10:12, 3] = 2
        swi[mask > 0] = 10
        nib.save(nib.Nifti1Image(swi, aff), root / pid / "swi.nii.gz")
        nib.save(nib.Nifti1Image(mask, aff), root / pid / "m.nii.gz")
        label = ("aSVD", "CAA", "CADASIL")[i % 3]
        center = "C" if i >= n - 2 else "AB"[i % 2]
        rows.append((pid, center, label, f"{pid}/swi.nii.gz", f"{pid}/m.nii.gz"))
    df = pd.DataFrame(rows, columns=["patient_id", "center", "label", "swi", "cmb_mask"])
    df.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def export_root(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reg")
    out = tmp / "export"
    export_coco(_cohort(tmp / "cohort"), out, folds=2, external_centers=["C"], progress=False)
    return out


@pytest.fixture()
def prefix(request):
    name = f"t{abs(hash(request.node.name)) % 10**8}"
    yield name
    for n in list(DatasetCatalog.list()):
        if n.startswith(name + "_"):
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_register_every_split_idempotently(export_root: Path, prefix: str) -> None:
    names = register_cmb_datasets(export_root, prefix=prefix)
    assert names == [
        f"{prefix}_{s}"
        for s in ("dev", "external", "fold0_train", "fold0_val", "fold1_train", "fold1_val")
    ]
    assert register_cmb_datasets(export_root, prefix=prefix) == names  # no error the second time
    meta = MetadataCatalog.get(f"{prefix}_dev")
    assert meta.evaluator_type == "coco" and meta.thing_classes == ["cmb"]
    assert meta.json_file == str(export_root.resolve() / "annotations" / "dev.json")
    dicts = DatasetCatalog.get(f"{prefix}_fold0_train")
    assert all(Path(d["file_name"]).is_file() for d in dicts)
    assert {"patient_id", "center", "label", "slice_index"} <= set(dicts[0])
    anns = [a for d in dicts for a in d["annotations"]]
    assert anns and all("lesion_id" in a and a["category_id"] == 0 for a in anns)
    s = dataset_summary(f"{prefix}_external")
    assert s["patients"] == 2 and s["annotations"] > 0


def test_config_names_work_with_detectron2(export_root: Path, prefix: str) -> None:
    register_cmb_datasets(export_root, prefix=prefix)
    cfg = get_cfg()
    add_cmb_config(cfg)
    cfg.merge_from_file(str(INSTANT))
    cfg.DATASETS.TRAIN = (f"{prefix}_fold0_train",)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    assert len(dicts) == len(DatasetCatalog.get(f"{prefix}_fold0_train"))
    d = next(d for d in dicts if d["annotations"])
    out = DatasetMapper(cfg, is_train=True)(d)  # RLE -> bitmask instances
    inst = out["instances"]
    assert len(inst) == len(d["annotations"]) and inst.gt_masks.tensor.any()
    assert out["image"].shape[0] == 3


def test_reregistration_replaces_and_drops_stale_folds(
    export_root: Path, tmp_path: Path, prefix: str
) -> None:
    register_cmb_datasets(export_root, prefix=prefix)
    other = tmp_path / "other"
    export_coco(_cohort(tmp_path / "c"), other, folds=3, external_centers=["C"], progress=False)
    names = register_cmb_datasets(other, prefix=prefix)
    assert f"{prefix}_fold2_val" in names
    assert MetadataCatalog.get(f"{prefix}_dev").json_file.startswith(str(other.resolve()))
    export_coco(_cohort(tmp_path / "c2"), other, folds=2, external_centers=["C"], progress=False)
    names = register_cmb_datasets(other, prefix=prefix)
    assert f"{prefix}_fold2_val" not in names and f"{prefix}_fold2_val" not in DatasetCatalog.list()


def test_missing_export_and_rebuild_helper(export_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no COCO split files"):
        register_cmb_datasets(tmp_path)
    vol = rebuild_volume_mask(export_root / "annotations" / "dev.json", "R1")
    assert vol.shape == (20, 22, 6) and set(np.unique(vol)) == {0, 1, 2}


def test_export_defaults_match_the_config() -> None:
    cfg = get_cfg()
    add_cmb_config(cfg)
    assert cfg.CMB.CONTEXT_OFFSET == DEFAULT_CONTEXT_OFFSET
    assert cfg.CMB.TARGET_SPACING == DEFAULT_TARGET_SPACING


def _tool():
    spec = importlib.util.spec_from_file_location(
        "visualize_data_tool", REPO / "tools" / "visualize_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("source", ["annotation", "dataloader"])
def test_visualize_data_tool(export_root: Path, tmp_path: Path, source: str) -> None:
    out = tmp_path / "vis"
    args = [
        "--config-file",
        str(INSTANT),
        "--source",
        source,
        "--output-dir",
        str(out),
        "--max-images",
        "3",
        "--only-positive",
        "--scale",
        "1",
        "CMB.DATA_ROOT",
        str(export_root),
        "DATASETS.TRAIN",
        "('cmb_fold0_train',)",
    ]
    assert _tool().main(args) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    if source == "annotation":
        assert pngs[0].name.startswith("R") and pngs[0].name.endswith(".png")
