"""detection/bags.py: lesion features, crops, per-patient and cohort bag writing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from detection.bags import (
    FEATURE_NAMES,
    lesion_centres,
    lesion_crops,
    lesion_features,
    write_bags,
    write_patient_bag,
)
from detection.data.volume import CohortError
from detection.lesions import lesion_table

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mil import FEATURE_NAMES as MIL_FEATURE_NAMES
from mil.bagio import load_bag, read_index

REPO_ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- phantom
# RAS grid 40 x 40 x 16, voxels 1 x 1 x 2 mm, origin at (-20, -20, -16) mm.
SHAPE = (40, 40, 16)
SPACING = (1.0, 1.0, 2.0)
ORIGIN = (-20.0, -20.0, -16.0)
BOX = (slice(4, 36), slice(6, 34), slice(2, 14))  # brain = a cuboid (known depth / extent)
CENTRE = (12, 20, 8)  # lesion 1 (voxel), radius 3 mm
CENTRE2 = (27, 26, 5)  # lesion 2 (voxel), radius 2 mm
RADIUS = 3.0
BG, DARK, NOISE = 100.0, 20.0, 5.0


def _affine(spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def _sphere(shape, spacing, centre, radius) -> np.ndarray:
    g = np.indices(shape).astype(np.float64)
    d2 = sum(((g[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return d2 <= radius**2


def _phantom(seed: int = 0, lesions=((CENTRE, RADIUS), (CENTRE2, 2.0))):
    rng = np.random.default_rng(seed)
    brain = np.zeros(SHAPE, dtype=bool)
    brain[BOX] = True
    swi = np.where(brain, BG, 5.0) + rng.normal(0, NOISE, SHAPE)
    labels = np.zeros(SHAPE, dtype=np.int32)
    for lid, (c, r) in enumerate(lesions, start=1):
        s = _sphere(SHAPE, SPACING, c, r)
        labels[s] = lid
        swi[s] = DARK + rng.normal(0, NOISE, int(s.sum()))
    return swi.astype(np.float32), labels, brain


def _fixed_regions(regions):
    def fn(centres, brain_mask, affine):
        return np.array(regions[: len(centres)], object), np.full(len(centres), "", object)
    return fn


@pytest.fixture(scope="module")
def phantom():
    swi, labels, brain = _phantom()
    aff = _affine()
    table = lesion_table(labels, aff, {1: 0.9, 2: 0.6}, brain,
                         _fixed_regions(["deep", "lobar"]), patient_id="P1")
    return swi, labels, brain, aff, table


# ---------------------------------------------------------------- features


def test_feature_names_match_mil() -> None:
    assert tuple(FEATURE_NAMES) == tuple(MIL_FEATURE_NAMES)


def test_features_known_answers(phantom) -> None:
    swi, labels, brain, aff, table = phantom
    feats, names = lesion_features(swi, labels, aff, table, brain)
    assert names == list(FEATURE_NAMES)
    assert feats.dtype == np.float32 and feats.shape == (2, len(FEATURE_NAMES))
    f = {n: feats[0, j] for j, n in enumerate(names)}
    f2 = {n: feats[1, j] for j, n in enumerate(names)}
    assert f["score"] == pytest.approx(0.9) and f2["score"] == pytest.approx(0.6)
    assert f["volume_mm3"] == pytest.approx(4 / 3 * np.pi * RADIUS**3, rel=0.3)
    assert 4.5 < f["diameter_mm"] < 7.5
    assert f["n_slices"] == 3  # +-3 mm at 2 mm slices: k = 7, 8, 9
    assert 0.9 <= f["elongation"] < 1.5
    # (20 - 100) / 5 = -16 brain-SD units: strongly darker than its shell
    assert -20 < f["contrast"] < -10
    assert f2["contrast"] < -10
    # one-hot from the table's region
    assert (f["region_lobar"], f["region_deep"], f["region_infratentorial"]) == (0, 1, 0)
    assert (f2["region_lobar"], f2["region_deep"], f2["region_infratentorial"]) == (1, 0, 0)
    # depth: nearest non-brain voxel of the cuboid; lesion 1 at i=12, box starts at i=4
    # -> 9 voxels (mm) to i=3; through-plane k=8, box 2..13 -> (8-1)*2 = 14, (14-8)*2 = 12
    assert f["depth_mm"] == pytest.approx(9.0, abs=0.01)
    # positions: brain box in world x [-16.5, 15.5], y [-14.5, 13.5], z [-13, 11] mm
    x, y, z = np.array(CENTRE, float) * SPACING + ORIGIN
    assert f["pos_lr"] == pytest.approx((x - (-0.5)) / 16.0, abs=0.02)  # left half: negative
    assert f["pos_lr"] < 0
    assert f["pos_ap"] == pytest.approx((y - (-0.5)) / 14.0, abs=0.02)
    assert f["pos_si"] == pytest.approx((z - (-1.0)) / 12.0, abs=0.02)
    assert f2["pos_lr"] > 0  # right half


def test_features_bright_lesion_positive_contrast() -> None:
    swi, labels, brain = _phantom(lesions=((CENTRE, RADIUS),))
    swi[labels == 1] = 180.0
    table = lesion_table(labels, _affine(), {1: 1.0}, brain, _fixed_regions(["lobar"]))
    feats, names = lesion_features(swi, labels, _affine(), table, brain)
    assert feats[0, names.index("contrast")] > 10


def test_features_empty_and_id_mismatch(phantom) -> None:
    swi, labels, brain, aff, table = phantom
    feats, names = lesion_features(swi, np.zeros_like(labels), aff, table.iloc[:0], brain)
    assert feats.shape == (0, len(FEATURE_NAMES))
    with pytest.raises(CohortError, match="lesion ids do not match"):
        lesion_features(swi, labels, aff, table.iloc[:1], brain)


# ---------------------------------------------------------------- crops


def test_crop_centred_and_physical_size_anisotropic() -> None:
    # in-plane anisotropic: 0.5 x 1.0 mm, 2 mm slices; a 3 mm radius dark sphere
    shape, spacing = (64, 32, 12), (0.5, 1.0, 2.0)
    centre = (30.0, 17.0, 6.0)
    vol = np.ones(shape, dtype=np.float32)
    s = _sphere(shape, spacing, centre, 3.0)
    g = np.indices(shape).astype(np.float64)
    d = np.sqrt(sum(((g[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))
    vol[s] = (d[s] / 3.0).astype(np.float32)  # darkest exactly at the centre
    crops = lesion_crops(vol, np.array([centre]), _affine(spacing), size_mm=16.0, size_px=32)
    assert crops.shape == (1, 3, 32, 32) and crops.dtype == np.float32
    mid = crops[0, 1]
    u, v = np.unravel_index(np.argmin(mid), mid.shape)
    assert u in (15, 16) and v in (15, 16)
    # 0.5 mm pixels: the 6 mm wide lesion spans ~12 pixels along BOTH axes
    dark_u = int((mid[:, 15:17].min(1) < 0.99).sum())
    dark_v = int((mid[15:17, :].min(0) < 0.99).sum())
    assert 10 <= dark_u <= 14 and 10 <= dark_v <= 14
    # z +- 1 slice (2 mm) cuts the sphere smaller; still centred and darker than background
    for c in (0, 2):
        assert crops[0, c].min() < 0.9
        assert (crops[0, c] < 0.99).sum() < (mid < 0.99).sum()


def test_crop_clamps_slices_and_pads_outside() -> None:
    vol = np.full((10, 10, 3), 0.5, dtype=np.float32)
    vol[:, :, 0] = 0.2
    crops = lesion_crops(vol, np.array([[0.0, 0.0, 0.0]]), _affine((1.0, 1.0, 1.0)),
                         size_mm=8.0, size_px=8, context_offset=2)
    assert np.allclose(crops[0, 0], crops[0, 1])  # z - 2 clamped to slice 0
    assert crops[0, 1, 0, 0] == 0.0  # outside the volume reads 0
    assert crops[0, 2, 7, 7] == pytest.approx(0.5)  # z + 2 = slice 2
    assert lesion_crops(vol, np.zeros((0, 3)), np.eye(4)).shape == (0, 3, 32, 32)


def test_lesion_centres(phantom) -> None:
    _, labels, _, _, _ = phantom
    c = lesion_centres(labels, [1, 2])
    assert np.allclose(c, [CENTRE, CENTRE2], atol=1e-6)
    with pytest.raises(ValueError, match="not present"):
        lesion_centres(labels, [3])


# ---------------------------------------------------------------- patient bag


def test_write_patient_bag_round_trip(phantom, tmp_path) -> None:
    swi, labels, brain, aff, table = phantom
    img = nib.Nifti1Image(swi, aff)
    path, n = write_patient_bag(tmp_path / "P1.npz", "P1", img, labels, table, brain,
                                crop_px=24)
    assert n == 2
    bag = load_bag(path)
    assert bag.patient_id == "P1" and bag.feature_names == tuple(FEATURE_NAMES)
    assert bag.crops.shape == (2, 3, 24, 24)
    assert list(bag.lesion_ids) == [1, 2]
    assert 0.0 <= bag.crops.min() and bag.crops.max() <= 1.0  # normalised intensities
    assert bag.feature("score").tolist() == pytest.approx([0.9, 0.6])


def _to_lps(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr[::-1, ::-1, :])


def _lps_affine() -> np.ndarray:
    """Affine of the same world grid stored in L-P-S voxel order."""
    aff = _affine()
    flip = np.eye(4)
    flip[0, 0] = flip[1, 1] = -1
    flip[0, 3], flip[1, 3] = SHAPE[0] - 1, SHAPE[1] - 1
    return aff @ flip


def test_orientation_independent(phantom, tmp_path) -> None:
    """Same head stored RAS or LPS -> identical features and crops (RAS internally)."""
    swi, labels, brain, aff, table = phantom
    p_ras, _ = write_patient_bag(tmp_path / "a.npz", "P", nib.Nifti1Image(swi, aff),
                                 labels, table, brain)
    lps = nib.Nifti1Image(_to_lps(swi), _lps_affine())
    p_lps, _ = write_patient_bag(tmp_path / "b.npz", "P", lps, _to_lps(labels), table,
                                 _to_lps(brain))
    a, b = load_bag(p_ras), load_bag(p_lps)
    assert np.allclose(a.features, b.features, atol=1e-4)
    assert np.allclose(a.crops, b.crops, atol=1e-5)


# ---------------------------------------------------------------- cohort


def _save(arr, aff, path: Path) -> str:
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return str(path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two patients stored LPS: P1 with 2 lesions, P2 with none; predictions and manifest."""
    root = tmp_path_factory.mktemp("cohort")
    pred = root / "pred"
    rows = []
    aff = _lps_affine()
    for pid, les, label, age in (("P1", ((CENTRE, RADIUS), (CENTRE2, 2.0)), "CAA", 71.0),
                                 ("P2", (), "CADASIL", np.nan)):
        swi, labels, brain = _phantom(lesions=les)
        d = root / pid
        d.mkdir()
        row = {
            "patient_id": pid, "center": "A", "label": label,
            "swi": _save(_to_lps(swi), aff, d / "swi.nii.gz"),
            "cmb_mask": _save(_to_lps((labels > 0).astype(np.uint8)), aff, d / "cmb.nii.gz"),
            "brain_mask": _save(_to_lps(brain.astype(np.uint8)), aff, d / "brain.nii.gz"),
            "age": age,
        }
        rows.append(row)
        (pred / pid).mkdir(parents=True)
        _save(_to_lps(labels).astype(np.int16), aff, pred / pid / "cmb_pred.nii.gz")
        scores = {i: 0.5 + 0.1 * i for i in range(1, len(les) + 1)}
        table = lesion_table(labels, _affine(), scores, brain, patient_id=pid)
        table.to_csv(pred / pid / "lesions.csv", index=False)
    return root, pred, pd.DataFrame(rows)


def test_write_bags_index_and_round_trip(cohort, tmp_path) -> None:
    root, pred, manifest = cohort
    index = write_bags(pred, manifest, tmp_path / "bags", source="out-of-fold", progress=False)
    assert index == tmp_path / "bags" / "index.csv"
    raw = pd.read_csv(index)
    assert list(raw.columns) == ["patient_id", "center", "label", "n_instances", "path",
                                 "age", "bag_source"]
    df = read_index(index)
    assert df["n_instances"].tolist() == [2, 0]
    assert set(df["bag_source"]) == {"out-of-fold"}
    assert df["age"].iloc[0] == 71.0 and np.isnan(df["age"].iloc[1])
    b1 = load_bag(df["bag_path"].iloc[0])
    table = pd.read_csv(pred / "P1" / "lesions.csv")
    assert b1.lesion_ids.tolist() == table["lesion_id"].tolist()
    assert b1.feature("score").tolist() == pytest.approx(table["max_score"].tolist())
    assert (b1.feature("contrast") < -10).all()
    # P1's first lesion lies in the left half, its second in the right (RAS internally)
    assert b1.feature("pos_lr")[0] < 0 < b1.feature("pos_lr")[1]
    b2 = load_bag(df["bag_path"].iloc[1])  # zero lesions: empty bag, not skipped
    assert b2.n_instances == 0 and b2.crops.shape == (0, 3, 32, 32)
    assert b2.features.shape == (0, len(FEATURE_NAMES))
    assert (tmp_path / "bags" / "bags_meta.json").is_file()


def test_write_bags_ground_truth(cohort, tmp_path) -> None:
    _, _, manifest = cohort
    index = write_bags(None, manifest, tmp_path / "gt", source="ground-truth", progress=False)
    df = read_index(index)
    assert df["n_instances"].tolist() == [2, 0]  # binary mask split into 3D components
    assert set(df["bag_source"]) == {"ground-truth"}
    b1 = load_bag(df["bag_path"].iloc[0])
    assert b1.feature("score").tolist() == [1.0, 1.0]
    regions = b1.select_features(["region_lobar", "region_deep", "region_infratentorial"])
    assert np.allclose(regions.sum(1), 1.0)


def test_write_bags_id_mismatch_names_file(cohort, tmp_path) -> None:
    root, pred, manifest = cohort
    bad = tmp_path / "pred"
    for pid in ("P1", "P2"):
        (bad / pid).mkdir(parents=True)
        for f in ("cmb_pred.nii.gz", "lesions.csv"):
            (bad / pid / f).write_bytes((pred / pid / f).read_bytes())
    t = pd.read_csv(bad / "P1" / "lesions.csv")
    t.iloc[:1].to_csv(bad / "P1" / "lesions.csv", index=False)  # drop lesion 2
    with pytest.raises(CohortError, match=r"P1.*lesions\.csv.*in the label volume only: \[2\]"):
        write_bags(bad, manifest, tmp_path / "bags", progress=False)
    assert not (tmp_path / "bags" / "index.csv").exists()


def test_write_bags_grid_mismatch_names_file(cohort, tmp_path) -> None:
    root, pred, manifest = cohort
    bad = tmp_path / "pred"
    (bad / "P1").mkdir(parents=True)
    (bad / "P1" / "lesions.csv").write_bytes((pred / "P1" / "lesions.csv").read_bytes())
    img = nib.load(str(pred / "P1" / "cmb_pred.nii.gz"))
    data = np.asarray(img.dataobj)
    _save(data[:, :, :-1], img.affine, bad / "P1" / "cmb_pred.nii.gz")  # one slice short
    with pytest.raises(CohortError, match=r"P1/cmb_pred\.nii\.gz: shape"):
        write_bags(bad, manifest.iloc[:1], tmp_path / "bags", progress=False)
    shifted = img.affine.copy()
    shifted[0, 3] += 1.0
    _save(data, shifted, bad / "P1" / "cmb_pred.nii.gz")
    with pytest.raises(CohortError, match=r"cmb_pred\.nii\.gz: affine differs"):
        write_bags(bad, manifest.iloc[:1], tmp_path / "bags", progress=False)


def test_write_bags_missing_prediction(cohort, tmp_path) -> None:
    _, _, manifest = cohort
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortError, match="cmb_pred.nii.gz: file not found"):
        write_bags(tmp_path / "empty", manifest, tmp_path / "bags", progress=False)
    with pytest.raises(ValueError, match="source"):
        write_bags(tmp_path / "empty", manifest, tmp_path / "bags", source="test")


def test_tool_ground_truth(cohort, tmp_path) -> None:
    import runpy

    _, _, manifest = cohort
    m = tmp_path / "manifest.csv"
    manifest.to_csv(m, index=False)
    ns = runpy.run_path(str(REPO_ROOT / "tools" / "write_bags.py"), run_name="not_main")
    out = tmp_path / "bags"
    rc = ns["main"](["--manifest", str(m), "--output", str(out), "--source", "ground-truth",
                     "--crop-px", "16", "--crop-mm", "12", "--quiet"])
    assert rc == 0
    df = read_index(out / "index.csv")
    assert load_bag(df["bag_path"].iloc[0]).crops.shape == (2, 3, 16, 16)
    assert ns["main"](["--manifest", str(m), "--output", str(out), "--quiet"]) == 2  # no --pred


def test_bags_module_needs_no_detectron2_or_torch() -> None:
    """detection.bags computes features with Detectron2 and torch unavailable."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["detectron2"] = None  # import fails; find_spec returns None
        sys.modules["torch"] = None
        import numpy as np, pandas as pd
        from detection.bags import lesion_features
        lab = np.zeros((8, 8, 4), np.int32); lab[3:5, 3:5, 1:3] = 1
        t = pd.DataFrame({"lesion_id": [1], "max_score": [1.0], "volume_mm3": [8.0],
                          "diameter_mm": [2.5], "elongation": [1.0], "n_slices": [2],
                          "region": ["deep"]})
        img = np.where(lab > 0, 0.0, 1.0).astype(np.float32)
        f, _ = lesion_features(img, lab, np.eye(4), t, np.ones(lab.shape, bool))
        assert f.shape == (1, 13)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_depth_equals_edt() -> None:
    """The k-d tree depth equals scipy's EDT of the brain mask at the centre voxels."""
    from detection.bags import _depth

    from scipy import ndimage as ndi

    shape, sp = (40, 44, 16), np.array([0.6, 0.7, 2.0])
    g = np.indices(shape, sparse=True)
    brain = ((g[0] - 20) / 18.0) ** 2 + ((g[1] - 22) / 20.0) ** 2 + ((g[2] - 8) / 7.0) ** 2 < 1
    brain &= ~(((g[0] - 20) / 4.0) ** 2 + ((g[1] - 22) / 5.0) ** 2 + ((g[2] - 8) / 2.0) ** 2 < 1)
    c = np.random.default_rng(0).uniform(0, np.array(shape) - 1, (200, 3))
    v = np.rint(c).astype(int)
    edt = ndi.distance_transform_edt(brain, sampling=sp)
    assert np.allclose(_depth(brain, c, sp), edt[v[:, 0], v[:, 1], v[:, 2]])
