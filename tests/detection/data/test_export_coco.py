"""COCO export: pycocotools round trips, exact 3D mask reconstruction, 2.5D channels,
splits, idempotency and failure safety."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import detection.data.export_coco as ex
from detection.data.export_coco import (
    export_coco,
    export_to_original,
    make_splits,
    nearest_index,
    pixel_to_voxel,
    pixel_to_world,
    prepare_volume,
    rebuild_volume_mask,
)
from detection.data.volume import CohortError, label_lesions

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# pycocotools' Cython decode with numpy 2 (not this project's code).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[3]
SHAPE = (24, 28, 8)
LABELS = ("aSVD", "CAA", "CADASIL")


def _affine(i: int) -> np.ndarray:
    if i == 1:  # stored as (A->P, R->L, I->S): exercises the RAS reorientation
        aff = np.zeros((4, 4))
        aff[1, 0], aff[0, 1], aff[2, 2], aff[3, 3] = -0.9, -0.9, 2.0, 1.0
        aff[:3, 3] = [12.0, 11.0, -8.0]
        return aff
    aff = np.diag([0.9, 0.9, 2.0, 1.0])
    aff[:3, 3] = [-10.0, -12.0, -8.0]
    return aff


def _patient(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SWI, CMB mask and brain mask for patient ``i`` (see make_cohort)."""
    rng = np.random.default_rng(i)
    grid = np.indices(SHAPE).astype(float)
    brain = ((grid[0] - 11.5) / 9) ** 2 + ((grid[1] - 13.5) / 11) ** 2 + (
        (grid[2] - 3.5) / 3.2
    ) ** 2 <= 1
    swi = rng.normal(10, 2, SHAPE).astype(np.float32)
    swi[brain] += 150
    mask = np.zeros(SHAPE, np.int16)
    if i % 6 != 0:  # P00 and P06 have no lesion
        x, y = 7 + i % 3, 9 + i % 4
        mask[x : x + 2, y : y + 2, 2:6] = 5  # lesion spanning 4 slices
        mask[x + 1, y + 2, 3] = 5
        mask[14:16, 12:14, 4] = 2  # two touching instances on one slice
        mask[16:18, 12:14, 4] = 3
        mask[12, 20, 3] = 9  # a single voxel
        if i % 4 == 3:  # binary mask: lesions come from 26-connected components
            mask = (mask > 0).astype(np.int16)
    swi[mask > 0] = 40
    return swi, mask, brain.astype(np.uint8)


def make_cohort(root: Path, n: int = 12, brain_masks: bool = True) -> Path:
    """``n`` patients; centres A/B (development) and C (external); labels cycle."""
    rows = []
    for i in range(n):
        pid = f"P{i:02d}"
        d = root / pid
        d.mkdir(parents=True, exist_ok=True)
        swi, mask, brain = _patient(i)
        aff = _affine(i)
        if i == 5:  # 4D with a single volume
            swi = swi[..., None]
        nib.save(nib.Nifti1Image(swi, aff), d / "swi.nii.gz")
        nib.save(nib.Nifti1Image(mask, aff), d / "cmb_mask.nii.gz")
        nib.save(nib.Nifti1Image(brain, aff), d / "brain_mask.nii.gz")
        rows.append(
            {
                "patient_id": pid,
                "center": "C" if i % 4 == 2 else "AB"[i % 2],
                "label": LABELS[i % 3],
                "swi": f"{pid}/swi.nii.gz",
                "cmb_mask": f"{pid}/cmb_mask.nii.gz",
                "brain_mask": f"{pid}/brain_mask.nii.gz" if brain_masks else "",
                "age": 50 + i,
            }
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def export(cohort: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export_coco(cohort, out, folds=3, external_centers=["C"], progress=False)
    return out


def _split_of(out: Path, pid: str) -> Path:
    splits = json.loads((out / "splits.json").read_text())
    return out / "annotations" / ("external.json" if pid in splits["external"] else "dev.json")


def _expected_mask(cohort: Path, pid: str) -> np.ndarray:
    raw = np.asarray(nib.load(cohort.parent / pid / "cmb_mask.nii.gz").dataobj)
    return label_lesions(raw)[0]


# ----------------------------------------------------------------------------- pycocotools


def test_every_split_loads_and_self_eval_gives_ap_1(export: Path, capsys) -> None:
    files = sorted((export / "annotations").glob("*.json"))
    names = {p.stem for p in files}
    assert names == {"dev", "external"} | {
        f"fold{k}_{s}" for k in range(3) for s in ("train", "val")
    }
    for path in files:
        gt = COCO(str(path))
        assert gt.loadCats(gt.getCatIds()) == [{"id": 1, "name": "cmb", "supercategory": "lesion"}]
        anns = gt.loadAnns(gt.getAnnIds())
        assert anns, path
        dets = [
            {
                "image_id": a["image_id"],
                "category_id": 1,
                "segmentation": a["segmentation"],
                "score": 1.0,
            }
            for a in anns
        ]
        for iou_type in ("segm", "bbox"):
            if iou_type == "bbox":
                dets = [{**d, "bbox": a["bbox"]} for d, a in zip(dets, anns)]
                dets = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
            ev = COCOeval(gt, gt.loadRes(dets), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ev.stats[0] == pytest.approx(1.0), (path.name, iou_type)


def test_coco_fields(export: Path, cohort: Path) -> None:
    data = json.loads((export / "annotations" / "dev.json").read_text())
    img_by_id = {im["id"]: im for im in data["images"]}
    for im in data["images"]:
        assert {"id", "file_name", "height", "width", "patient_id", "center", "slice_index"} <= set(
            im
        )
        assert (export / im["file_name"]).is_file()
        assert im["file_name"] == f"images/{im['patient_id']}/{im['slice_index']:04d}.png"
    seen = Counter()
    for a in data["annotations"]:
        assert a["iscrowd"] == 0 and a["category_id"] == 1
        assert isinstance(a["segmentation"]["counts"], str)
        m = mask_util.decode(a["segmentation"])
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == m.sum()
        seen[(a["image_id"], a["lesion_id"])] += 1
        assert img_by_id[a["image_id"]]["slice_index"] == a["slice_index"]
    assert max(seen.values()) == 1  # one annotation per lesion per slice
    # Patient P01 (instance ids): lesion 5 spans slices 2-5, lesions 2 and 3 touch on slice 4.
    p1 = [a for a in data["annotations"] if a["patient_id"] == "P01"]
    assert sorted({a["slice_index"] for a in p1 if a["lesion_id"] == 5}) == [2, 3, 4, 5]
    assert sorted(a["lesion_id"] for a in p1 if a["slice_index"] == 4) == [2, 3, 5]
    assert not [a for a in data["annotations"] if a["patient_id"] == "P00"]  # no lesions
    # Binary mask (P03): the touching pair is one 26-connected lesion.
    p3 = {a["lesion_id"] for a in data["annotations"] if a["patient_id"] == "P03"}
    assert len(p3) == 3


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_exact_in_both_spaces(export: Path, cohort: Path) -> None:
    meta = json.loads((export / "export_meta.json").read_text())
    for pid, pm in meta["patients"].items():
        path = _split_of(export, pid)
        got = rebuild_volume_mask(path, pid)  # original voxel grid and orientation
        np.testing.assert_array_equal(got, _expected_mask(cohort, pid), err_msg=pid)
        prep = prepare_volume(pm["swi"], pm["cmb_mask"], pm["brain_mask"])
        np.testing.assert_array_equal(rebuild_volume_mask(path, pid, space="export"), prep.labels)
    assert meta["patients"]["P01"]["original"]["axcodes"] == "PLS"
    assert meta["patients"]["P03"]["mask_kind"] == "binary-cc26"
    assert meta["patients"]["P00"]["lesion_ids"] == []


@pytest.mark.parametrize("target", [0.0, 0.5, 1.7])
def test_round_trip_with_and_without_resampling(
    cohort: Path, tmp_path: Path, target: float
) -> None:
    out = tmp_path / "x"
    export_coco(cohort, out, target_spacing=target, folds=0, progress=False)
    meta = json.loads((out / "export_meta.json").read_text())
    pm = meta["patients"]["P01"]
    h, w = pm["image"]["height"], pm["image"]["width"]
    if target == 0:
        assert (h, w) == (SHAPE[0], SHAPE[1])  # P01 is stored (y, x) transposed
    else:
        assert (h, w) == (round(SHAPE[0] * 0.9 / target), round(SHAPE[1] * 0.9 / target))
        assert pm["image"]["pixel_spacing"] == pytest.approx([target, target], rel=0.05)
    for pid in ("P00", "P01", "P03", "P05", "P07"):
        pm = meta["patients"][pid]
        dev = out / "annotations" / "dev.json"
        prep = prepare_volume(
            pm["swi"], pm["cmb_mask"], pm["brain_mask"], ex.ExportParams(target_spacing=target)
        )
        np.testing.assert_array_equal(rebuild_volume_mask(dev, pid, space="export"), prep.labels)
        if target <= 0.9:  # not coarser than native: exact back on the input grid too
            np.testing.assert_array_equal(
                rebuild_volume_mask(dev, pid), _expected_mask(cohort, pid)
            )


def test_nearest_index_is_exact_and_invertible() -> None:
    for n_in in (1, 7, 24, 230):
        for n_out in (n_in, 2 * n_in, int(n_in * 1.8) + 1, 3 * n_in + 1):
            fwd = nearest_index(n_in, n_out)
            assert fwd.min() >= 0 and fwd.max() == n_in - 1
            assert set(fwd) == set(range(n_in))  # upsampling keeps every source pixel
            inv = ex._inverse_nearest_index(n_in, n_out)
            np.testing.assert_array_equal(fwd[inv], np.arange(n_in))


def test_pixels_map_back_to_original_voxels(export: Path, cohort: Path) -> None:
    meta = json.loads((export / "export_meta.json").read_text())
    for pid in ("P01", "P05"):  # permuted orientation, and plain RAS
        pm = meta["patients"][pid]
        data = json.loads(_split_of(export, pid).read_text())
        ann = next(a for a in data["annotations"] if a["patient_id"] == pid and a["lesion_id"] == 9)
        rows, cols = np.nonzero(mask_util.decode(ann["segmentation"]))
        vox = pixel_to_voxel(pm, cols.mean(), rows.mean(), ann["slice_index"])[0]
        truth = np.argwhere(_expected_mask(cohort, pid) == 9)[0]
        np.testing.assert_allclose(vox, truth, atol=0.3)
        world = pixel_to_world(pm, cols.mean(), rows.mean(), ann["slice_index"])[0]
        np.testing.assert_allclose(
            world, (np.asarray(pm["original"]["affine"]) @ [*vox, 1])[:3], atol=1e-6
        )
    with pytest.raises(ValueError, match="not \\(Z, H, W\\)"):
        export_to_original(np.zeros((2, 2, 2)), pm)


# ----------------------------------------------------------------------------- images


def test_png_channels_are_context_slices_clamped(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "x"
    export_coco(cohort, out, context_offset=2, slices="all", folds=0, progress=False)
    pm = json.loads((out / "export_meta.json").read_text())["patients"]["P02"]
    prep = prepare_volume(
        pm["swi"], pm["cmb_mask"], pm["brain_mask"], ex.ExportParams(context_offset=2)
    )
    nz = prep.images.shape[0]
    assert pm["slices"] == list(range(nz))
    for z in (0, 1, 4, nz - 1):
        bgr = cv2.imread(str(out / "images" / "P02" / f"{z:04d}.png"), cv2.IMREAD_UNCHANGED)
        assert bgr.dtype == np.uint8 and bgr.shape == (*prep.images.shape[1:], 3)
        rgb = bgr[..., ::-1]
        np.testing.assert_array_equal(rgb[..., 0], prep.images[max(z - 2, 0)])
        np.testing.assert_array_equal(rgb[..., 1], prep.images[z])
        np.testing.assert_array_equal(rgb[..., 2], prep.images[min(z + 2, nz - 1)])
        np.testing.assert_array_equal(rgb, prep.rgb(z))


def test_brain_slice_selection_and_computed_brain_mask(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "c", n=4, brain_masks=False)
    out = tmp_path / "x"
    export_coco(manifest, out, folds=0, progress=False)
    pm = json.loads((out / "export_meta.json").read_text())["patients"]["P01"]
    assert pm["brain_mask_source"] == "computed"
    # The ellipsoid brain spans slices 1..6 of 0..7 (lesions lie inside it).
    assert pm["slices"] == [1, 2, 3, 4, 5, 6]
    assert len(list((out / "images" / "P01").glob("*.png"))) == 6
    assert 0 < pm["intensity"]["low"] < pm["intensity"]["high"]


# ----------------------------------------------------------------------------- splits


def _cohort_df(n_per: int = 10) -> pd.DataFrame:
    rows = []
    for i in range(3 * n_per):
        rows.append(
            {"patient_id": f"S{i:03d}", "center": "ABC"[i % 3], "label": LABELS[(i // 3) % 3]}
        )
    return pd.DataFrame(rows)


def test_folds_are_stratified_disjoint_and_external_held_out() -> None:
    df = _cohort_df()
    s = make_splits(df, folds=4, external_centers=["C"], seed=3)
    assert set(s["external"]) == set(df.loc[df.center == "C", "patient_id"])
    assert set(s["dev"]).isdisjoint(s["external"])
    vals = [set(f["val"]) for f in s["folds"]]
    assert set().union(*vals) == set(s["dev"])
    assert sum(len(v) for v in vals) == len(s["dev"])  # no patient in two folds
    label = dict(zip(df.patient_id, df.label))
    for f in s["folds"]:
        assert set(f["train"]) == set(s["dev"]) - set(f["val"])
    for lab in LABELS:
        counts = [sum(label[p] == lab for p in v) for v in vals]
        assert max(counts) - min(counts) <= 1, (lab, counts)
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1
    assert make_splits(df, folds=4, external_centers=["C"], seed=3) == s
    assert make_splits(df, folds=4, external_centers=["C"], seed=4) != s


def test_split_errors() -> None:
    df = _cohort_df(2)
    with pytest.raises(CohortError, match=r"external centre\(s\) \['Z'\] not in the cohort"):
        make_splits(df, external_centers=["Z"])
    with pytest.raises(CohortError, match="4 development patient.* cannot fill 5 folds"):
        make_splits(df, folds=5, external_centers=["C"])
    with pytest.raises(CohortError, match="no development patients"):
        make_splits(df, external_centers=["A", "B", "C"])


def test_export_writes_splits(export: Path) -> None:
    s = json.loads((export / "splits.json").read_text())
    assert s["external_centers"] == ["C"] and s["n_folds"] == 3
    ext = json.loads((export / "annotations" / "external.json").read_text())
    assert {im["patient_id"] for im in ext["images"]} == set(s["external"])
    for f in s["folds"]:
        val = json.loads((export / "annotations" / f"fold{f['fold']}_val.json").read_text())
        train = json.loads((export / "annotations" / f"fold{f['fold']}_train.json").read_text())
        assert {im["patient_id"] for im in val["images"]} == set(f["val"])
        assert {im["patient_id"] for im in train["images"]} == set(f["train"])
        # Same image ids across files: a slice is one image everywhere.
        dev_ids = {
            im["id"]: im["file_name"]
            for im in json.loads((export / "annotations" / "dev.json").read_text())["images"]
        }
        assert all(dev_ids[im["id"]] == im["file_name"] for im in val["images"])


# ------------------------------------------------------------------- idempotency, failures


def test_rerun_skips_and_touching_an_input_reexports(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "c", n=4)
    out = tmp_path / "x"
    first = export_coco(manifest, out, folds=0, progress=False)
    assert len(first.exported) == 4 and first.n_written > 0
    dev_before = (out / "annotations" / "dev.json").read_bytes()
    second = export_coco(manifest, out, folds=0, progress=False)
    assert second.exported == [] and len(second.skipped) == 4 and second.n_written == 0
    assert (out / "annotations" / "dev.json").read_bytes() == dev_before
    swi = tmp_path / "c" / "P02" / "swi.nii.gz"
    st = swi.stat()
    os.utime(swi, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third = export_coco(manifest, out, folds=0, progress=False)
    assert third.exported == ["P02"] and len(third.skipped) == 3
    assert (out / "annotations" / "dev.json").read_bytes() == dev_before  # same content
    (out / "images" / "P01" / "0003.png").unlink()  # damaged output: re-exported
    assert export_coco(manifest, out, folds=0, progress=False).exported == ["P01"]
    changed = export_coco(manifest, out, folds=0, context_offset=2, progress=False)
    assert len(changed.exported) == 4  # parameters are part of the stamp
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_failed_patient_is_reported_and_nothing_half_written(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "c", n=4)
    bad = tmp_path / "c" / "P03" / "swi.nii.gz"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) - 200])  # header fine, voxel data truncated
    out = tmp_path / "x"
    with pytest.raises(CohortError) as ei:
        export_coco(manifest, out, folds=0, progress=False)
    msg = str(ei.value)
    assert "failed for 1 of 4 patient(s)" in msg and "P03: SWI" in msg and "swi.nii.gz" in msg
    assert not (out / "splits.json").exists() and not list((out / "annotations").glob("*.json"))
    assert not (out / "images" / "P03").exists() and not (out / "patients" / "P03.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert (out / "patients" / "P00.json").is_file()
    bad.write_bytes(raw)  # fixed: only P03 is exported now
    s = export_coco(manifest, out, folds=0, progress=False)
    assert s.exported == ["P03"] and len(s.skipped) == 3


def test_crash_while_writing_keeps_previous_outputs(tmp_path: Path, monkeypatch) -> None:
    manifest = make_cohort(tmp_path / "c", n=2)
    out = tmp_path / "x"
    export_coco(manifest, out, folds=0, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real = cv2.imwrite

    def flaky(path, img, params=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(path, img, params)

    monkeypatch.setattr(ex.cv2, "imwrite", flaky)
    with pytest.raises(CohortError, match="OSError: disk full"):
        export_coco(manifest, out, folds=0, force=True, progress=False)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(after) == set(before)  # no temp files, nothing missing
    assert after[out / "patients" / "P00.json"] == before[out / "patients" / "P00.json"]
    assert after[out / "annotations" / "dev.json"] == before[out / "annotations" / "dev.json"]


def test_nonfinite_policy(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "c", n=2)
    p = tmp_path / "c" / "P01" / "swi.nii.gz"
    img = nib.load(p)
    d = np.asarray(img.dataobj).copy()
    d[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(d, img.affine), p)
    with pytest.raises(CohortError, match=r"P01: SWI .*1 non-finite voxel"):
        export_coco(manifest, tmp_path / "x", folds=0, progress=False)
    export_coco(manifest, tmp_path / "y", folds=0, nonfinite="zero", progress=False)
    meta = json.loads((tmp_path / "y" / "export_meta.json").read_text())
    assert meta["patients"]["P01"]["n_nonfinite"] == 1


def test_bad_manifest_fails_before_any_work(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "c", n=2)
    m = np.zeros((3, 3, 3), np.int16)
    nib.save(nib.Nifti1Image(m, np.eye(4)), tmp_path / "c" / "P00" / "cmb_mask.nii.gz")
    with pytest.raises(CohortError, match=r"patient 'P00': cmb_mask .*shape \(3, 3, 3\) differs"):
        export_coco(manifest, tmp_path / "x", folds=0, progress=False)
    assert not (tmp_path / "x").exists()


def test_parallel_export_matches_serial(cohort: Path, export: Path, tmp_path: Path) -> None:
    out = tmp_path / "par"
    s = export_coco(cohort, out, folds=3, external_centers=["C"], workers=2, progress=False)
    assert len(s.exported) == 12
    for name in ("dev.json", "external.json", "fold1_val.json"):
        assert json.loads((out / "annotations" / name).read_text()) == json.loads(
            (export / "annotations" / name).read_text()
        )


def test_cli(cohort: Path, tmp_path: Path, capsys, caplog) -> None:
    spec = importlib.util.spec_from_file_location(
        "export_coco_tool", REPO / "tools" / "export_coco.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "cli"
    args = [
        "--manifest",
        str(cohort),
        "--out",
        str(out),
        "--folds",
        "2",
        "--external-center",
        "C",
        "--quiet",
    ]
    assert tool.main(args) == 0
    assert "0 up to date" in capsys.readouterr().out
    assert json.loads((out / "splits.json").read_text())["n_folds"] == 2
    # the shipped configs' window by default, so an export matches them
    assert json.loads((out / "export_meta.json").read_text())["params"]["percentiles"] == [0, 99]
    bad = ["--manifest", str(cohort), "--out", str(out), "--external-center", "Q", "--quiet"]
    assert tool.main(bad) == 2
    assert "external centre(s) ['Q'] not in the cohort" in caplog.text


def test_prepare_case_matches_prepare_volume(cohort: Path) -> None:
    from detection.data.volume import load_case

    d = cohort.parent / "P01"
    case = load_case(d / "swi.nii.gz", d / "cmb_mask.nii.gz", d / "brain_mask.nii.gz")
    a = ex.prepare_case(case)
    b = prepare_volume(d / "swi.nii.gz", d / "cmb_mask.nii.gz", d / "brain_mask.nii.gz")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.slice_indices == b.slice_indices
    assert a.meta["pixel_to_world"] == b.meta["pixel_to_world"]


def test_brain_margin_strips_the_head_outside_the_brain(tmp_path: Path) -> None:
    from detection.data.volume import load_case

    swi, mask, brain_mask = _patient(3)
    swi[brain_mask == 0] = 120.0  # bright scalp all around the brain
    for name, arr in (("swi", swi), ("cmb", mask), ("brain", brain_mask)):
        nib.save(nib.Nifti1Image(arr, _affine(3)), tmp_path / f"{name}.nii.gz")
    case = load_case(tmp_path / "swi.nii.gz", tmp_path / "cmb.nii.gz",
                     tmp_path / "brain.nii.gz")
    native = {"target_spacing": 0.0, "slices": "all"}
    whole = ex.prepare_case(case, ex.ExportParams(**native))
    strip = ex.prepare_case(case, ex.ExportParams(brain_margin_mm=0.0, **native))
    wide = ex.prepare_case(case, ex.ExportParams(brain_margin_mm=1.0, **native))
    # export layout (z, rows = RAS y reversed, cols = RAS x) of the RAS brain mask
    brain = case.brain.transpose(2, 1, 0)[:, ::-1, :]
    assert (whole.images[~brain] > 0).all()  # the head is kept by default
    np.testing.assert_array_equal(strip.images[~brain], 0)
    np.testing.assert_array_equal(strip.images[brain], whole.images[brain])
    # 1 mm margin (0.9 mm in-plane voxels): one more ring in plane, not the next 2 mm slice
    grown = ex.brain_with_margin(case.brain, case.swi.spacing, 1.0)
    assert grown.sum() > case.brain.sum()
    np.testing.assert_array_equal(grown, ex.brain_with_margin(case.brain, (0.9, 0.9, 2.0), 1.0))
    ring = grown & ~case.brain
    assert ring.any() and not ring[:, :, ~case.brain.any(axis=(0, 1))].any()
    assert (wide.images[brain] == whole.images[brain]).all()
    assert ex.brain_with_margin(np.zeros((3, 3, 3), bool), (1, 1, 1), 2.0).all()
    assert ex.ExportParams(brain_margin_mm=2.0).as_dict()["brain_margin_mm"] == 2.0


def test_intensity_percentiles_keep_the_dark_range(tmp_path: Path) -> None:
    """A bleed's near-void core inside its lighter halo: at the default low percentile
    (1) both clip to 0; at 0 the core stays darker than the halo, and tissue keeps its
    order."""
    from detection.data.volume import load_case

    rng = np.random.default_rng(0)
    shape = (40, 40, 6)
    swi = rng.normal(100.0, 2.0, shape).astype(np.float32)
    grid = np.indices(shape[:2]).astype(float)
    r = np.hypot(grid[0] - 20, grid[1] - 20)
    for z in (2, 3):  # core 2 voxels wide at 15 % of tissue, halo to 5 voxels at 50 %
        swi[:, :, z][r <= 5] = 50.0
        swi[:, :, z][r <= 2] = 15.0
    swi[5:8, 5:8, :] = 30.0  # a vein, darker than the halo, lighter than the core
    brain = np.ones(shape, np.uint8)
    for name, arr in (("swi", swi), ("brain", brain)):
        nib.save(nib.Nifti1Image(arr, np.diag([0.9, 0.9, 2.0, 1.0])), tmp_path / f"{name}.nii.gz")
    case = load_case(tmp_path / "swi.nii.gz", None, tmp_path / "brain.nii.gz")
    native = {"target_spacing": 0.0, "slices": "all"}
    clipped = ex.prepare_case(case, ex.ExportParams(**native)).images
    kept = ex.prepare_case(case, ex.ExportParams(percentiles=(0.0, 99.0), **native)).images

    def at(img: np.ndarray, x: int, y: int, z: int) -> int:
        # export layout: (z, rows = RAS y reversed, cols = RAS x)
        return int(img[z, shape[1] - 1 - y, x])

    core, halo, vein, tissue = (20, 20, 2), (20, 24, 2), (6, 6, 2), (35, 35, 2)
    assert at(clipped, *core) == at(clipped, *halo) == at(clipped, *vein) == 0
    assert at(kept, *core) < at(kept, *vein) < at(kept, *halo) < at(kept, *tissue)
    assert at(kept, *core) <= 5  # the darkest brain voxel maps to 0
    for bad in ((-1.0, 99.0), (50.0, 50.0), (1.0, 101.0)):
        with pytest.raises(ValueError, match="percentiles"):
            ex.ExportParams(percentiles=bad)
