"""Volume I/O: validation errors (with their messages), RAS reorientation, brain mask,
normalisation, lesion labelling."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

from detection.data.volume import (
    CohortError,
    compute_brain_mask,
    label_lesions,
    load_case,
    load_mask,
    load_nifti,
    load_swi,
    normalize_intensity,
    reorient_to_ras,
    to_uint8,
)

import nibabel as nib
import numpy as np
import pytest

SHAPE = (20, 24, 8)


def _affine(spacing=(0.9, 0.9, 2.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-9.0, -11.0, -8.0]
    return aff


def _head(shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    c = [(s - 1) / 2 for s in shape]
    r = [s * 0.38 for s in shape]
    inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1.0
    data = rng.normal(5, 1, shape)
    data[inside] += 100 + rng.normal(0, 5, int(inside.sum()))
    return data.astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, _affine() if affine is None else affine), path)
    return path


# ----------------------------------------------------------------------------- loading


def test_load_3d_and_single_volume_4d(tmp_path: Path) -> None:
    d = _head()
    v3 = load_swi(_save(tmp_path / "a.nii.gz", d))
    v4 = load_swi(_save(tmp_path / "b.nii.gz", d[..., None]))
    assert v3.data.shape == v4.data.shape == SHAPE
    np.testing.assert_array_equal(v3.data, v4.data)
    assert v3.data.dtype == np.float32
    assert v3.spacing == pytest.approx((0.9, 0.9, 2.0))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match=r"SWI .*nope\.nii\.gz: file not found"):
        load_swi(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_nifti(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "bad.nii.gz"
    if kind == "garbage":
        p.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
        pattern = r"SWI .*bad\.nii\.gz: not a readable NIfTI"
    else:
        good = _save(tmp_path / "good.nii.gz", _head())
        raw = good.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
        pattern = (
            r"SWI .*bad\.nii\.gz: (corrupt NIfTI, cannot read voxel data|not a readable NIfTI)"
        )
    with pytest.raises(CohortError, match=pattern):
        load_swi(p)


def test_4d_with_several_volumes(tmp_path: Path) -> None:
    p = _save(tmp_path / "multi.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    with pytest.raises(CohortError, match=r"multi\.nii\.gz: expected a 3D volume .*\(3 volumes\)"):
        load_swi(p)


def test_2d_image_is_rejected(tmp_path: Path) -> None:
    p = _save(tmp_path / "flat.nii.gz", np.zeros((20, 24), np.float32))
    with pytest.raises(
        CohortError, match=r"flat\.nii\.gz: expected a 3D volume, got shape \(20, 24\)"
    ):
        load_nifti(p, "SWI")


def test_nan_voxels_error_or_replaced_with_warning(tmp_path: Path, caplog) -> None:
    d = _head()
    d[1, 2, 3] = np.nan
    d[2, 2, 3] = np.inf
    p = _save(tmp_path / "nan.nii.gz", d)
    with pytest.raises(
        CohortError, match=r"nan\.nii\.gz: 2 non-finite voxel\(s\).*--nonfinite zero"
    ):
        load_swi(p)
    with caplog.at_level(logging.WARNING, logger="detection.data.volume"):
        v = load_swi(p, nonfinite="zero")
    assert v.n_nonfinite == 2
    assert np.isfinite(v.data).all() and v.data[1, 2, 3] == 0
    assert "2 non-finite voxel(s) replaced by 0" in caplog.text


# ----------------------------------------------------------------------------- masks


def test_mask_shape_mismatch(tmp_path: Path) -> None:
    ref = load_swi(_save(tmp_path / "swi.nii.gz", _head()))
    p = _save(tmp_path / "m.nii.gz", np.zeros((20, 24, 9), np.int16))
    with pytest.raises(CohortError, match=r"CMB mask .*m\.nii\.gz: shape \(20, 24, 9\) differs"):
        load_mask(p, ref)


def test_mask_affine_mismatch(tmp_path: Path) -> None:
    ref = load_swi(_save(tmp_path / "swi.nii.gz", _head()))
    p = _save(tmp_path / "m.nii.gz", np.zeros(SHAPE, np.int16), _affine((1.0, 0.9, 2.0)))
    with pytest.raises(CohortError, match=r"m\.nii\.gz: affine differs .*not on the same grid"):
        load_mask(p, ref)
    # Within tolerance (float32 header round-off) is accepted.
    aff = _affine()
    aff[0, 3] += 1e-5
    load_mask(_save(tmp_path / "ok.nii.gz", np.zeros(SHAPE, np.int16), aff), ref)


def test_mask_not_integer_negative_or_nan(tmp_path: Path) -> None:
    ref = load_swi(_save(tmp_path / "swi.nii.gz", _head()))
    m = np.zeros(SHAPE, np.float32)
    m[3, 3, 3] = 0.5
    with pytest.raises(
        CohortError, match=r"frac\.nii\.gz: not integer valued \(1 voxel\(s\), e\.g\. 0\.5\)"
    ):
        load_mask(_save(tmp_path / "frac.nii.gz", m), ref)
    m[3, 3, 3] = -2
    with pytest.raises(CohortError, match=r"neg\.nii\.gz: negative labels"):
        load_mask(_save(tmp_path / "neg.nii.gz", m), ref)
    m[3, 3, 3] = np.nan
    with pytest.raises(CohortError, match=r"nanm\.nii\.gz: 1 non-finite voxel"):
        load_mask(_save(tmp_path / "nanm.nii.gz", m), ref)
    m[3, 3, 3] = 2.0  # float-stored integers are fine
    out = load_mask(_save(tmp_path / "okf.nii.gz", m), ref)
    assert out.dtype == np.int32 and out[3, 3, 3] == 2


# ----------------------------------------------------------------------------- orientation


def _lps_permuted_affine() -> np.ndarray:
    """Axes stored as (A->P, R->L, I->S): a permuted, flipped, non-RAS file."""
    aff = np.zeros((4, 4))
    aff[1, 0] = -0.9  # axis 0 runs posterior
    aff[0, 1] = -0.8  # axis 1 runs left
    aff[2, 2] = 2.0
    aff[:3, 3] = [10.0, 12.0, -8.0]
    aff[3, 3] = 1
    return aff


def test_reorientation_matches_nibabel_and_round_trips(tmp_path: Path) -> None:
    d = _head()
    aff = _lps_permuted_affine()
    p = _save(tmp_path / "lps.nii.gz", d, aff)
    v = load_swi(p)
    canon = nib.as_closest_canonical(nib.load(p))
    np.testing.assert_array_equal(v.data, np.asarray(canon.dataobj, dtype=np.float32))
    np.testing.assert_allclose(v.affine, canon.affine, atol=1e-5)
    assert v.orig_axcodes == ("P", "L", "S")
    assert v.data.shape == (24, 20, 8)
    assert v.spacing == pytest.approx((0.8, 0.9, 2.0))
    back = v.to_original(v.data)
    np.testing.assert_array_equal(back, d)
    img = v.to_nifti(v.data > 100, np.uint8)
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    assert img.shape == SHAPE
    # Same voxel, same world position, in both orders.
    i, j, k = 3, 5, 2
    world = aff @ [i, j, k, 1]
    ras_idx = np.linalg.inv(v.affine) @ world
    assert v.data[tuple(np.round(ras_idx[:3]).astype(int))] == d[i, j, k]


def test_reorient_identity_for_ras() -> None:
    d = np.arange(24).reshape(2, 3, 4)
    out, aff, _ = reorient_to_ras(d, _affine())
    assert out is d and np.allclose(aff, _affine())


# ----------------------------------------------------------------------------- brain, intensities


def test_computed_brain_mask_covers_head_and_fills_dark_lesions() -> None:
    d = _head((40, 44, 16))
    truth = d > 50
    d[18:21, 20:23, 7:9] = 5.0  # dark CMB-like focus inside the brain
    bm = compute_brain_mask(d, (0.9, 0.9, 2.0))
    assert bm[18:21, 20:23, 7:9].all()
    dice = 2 * (bm & truth).sum() / (bm.sum() + truth.sum())
    assert dice > 0.9
    assert not bm[0, 0, 0]


def test_normalisation_is_robust_to_centre_gain_and_offset() -> None:
    d = _head()
    brain = d > 50
    a, lo, hi = normalize_intensity(d, brain)
    b, _, _ = normalize_intensity(3.7 * d + 250.0, brain)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.min() == 0.0 and a.max() == 1.0
    assert lo < hi
    u = to_uint8(a)
    assert u.dtype == np.uint8 and u.max() == 255
    # 98% of brain voxels lie strictly between the clipping percentiles.
    inside = a[brain]
    assert 0.95 < ((inside > 0) & (inside < 1)).mean() <= 0.99


def test_constant_volume_normalises_to_zero(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        out, lo, hi = normalize_intensity(np.full(SHAPE, 7.0, np.float32))
    assert not out.any() and lo == hi == 7.0
    assert "constant intensities" in caplog.text


# ----------------------------------------------------------------------------- lesions


def test_label_lesions_instance_binary_and_connectivity() -> None:
    inst = np.zeros((6, 6, 6), np.int16)
    inst[1, 1, 1] = 4
    inst[1, 1, 2] = 7  # touching, distinct ids: kept
    out, kind = label_lesions(inst)
    assert kind == "instance" and out[1, 1, 1] == 4 and out[1, 1, 2] == 7

    binary = np.zeros((6, 6, 6), np.uint8)
    binary[1, 1, 1] = binary[2, 2, 2] = 1  # corner neighbours
    binary[4, 4, 4] = 1
    out, kind = label_lesions(binary)
    assert kind == "binary-cc26"
    assert out[1, 1, 1] == out[2, 2, 2] != out[4, 4, 4] and out.max() == 2
    out6, kind6 = label_lesions(binary * 255, connectivity=6)
    assert kind6 == "binary-cc6" and out6.max() == 3
    assert label_lesions(np.zeros((3, 3, 3)))[1] == "empty"


def test_load_case_with_and_without_brain_mask(tmp_path: Path) -> None:
    d = _head()
    swi = _save(tmp_path / "swi.nii.gz", d)
    m = np.zeros(SHAPE, np.uint8)
    m[5:7, 5:7, 3:5] = 1
    mask = _save(tmp_path / "m.nii.gz", m)
    bm = _save(tmp_path / "bm.nii.gz", (d > 50).astype(np.uint8))
    c1 = load_case(swi, mask, bm)
    assert c1.brain_source == "given" and c1.mask_kind == "binary-cc26"
    np.testing.assert_array_equal(c1.brain, d > 50)
    c2 = load_case(swi)
    assert c2.brain_source == "computed" and c2.lesions is None and c2.mask_kind == "none"
    with pytest.raises(CohortError, match=r"brain mask .*bad_bm\.nii\.gz: shape"):
        load_case(swi, mask, _save(tmp_path / "bad_bm.nii.gz", np.zeros((3, 3, 3), np.uint8)))


def test_correct_bias_removes_smooth_shading_and_keeps_small_lesions() -> None:
    from detection.data.volume import correct_bias

    shape, spacing = (96, 96, 40), (1.0, 1.0, 2.0)
    grid = np.indices(shape).astype(np.float32)
    brain = ((grid[0] - 47.5) / 40) ** 2 + ((grid[1] - 47.5) / 44) ** 2 + (
        (grid[2] - 19.5) / 17) ** 2 <= 1
    tissue = np.where(brain, 100.0, 0.0).astype(np.float32)
    tissue[44:48, 44:48, 18:20] = 20.0  # a 4 mm dark lesion
    field = (1.0 + 0.4 * (grid[0] - 47.5) / 47.5).astype(np.float32)  # +-40 % left-right
    out = correct_bias(tissue * field, brain, spacing, degree=2)
    assert out.shape == shape and out.dtype == np.float32 and np.isfinite(out).all()
    inner = brain & (np.abs(grid[0] - 47.5) < 30)
    cv_in = np.std((tissue * field)[inner & (tissue == 100)]) / 100.0
    cv_out = np.std(out[inner & (tissue == 100)]) / np.mean(out[inner & (tissue == 100)])
    assert cv_out < 0.35 * cv_in  # most of the shading is gone
    # the lesion keeps its contrast against the tissue around it
    ring = out[40:52, 40:52, 18:20][tissue[40:52, 40:52, 18:20] == 100].mean()
    assert out[44:48, 44:48, 18:20].mean() < 0.3 * ring
    # off / empty mask: unchanged copies
    np.testing.assert_array_equal(correct_bias(tissue, brain, spacing, 0), tissue)
    np.testing.assert_array_equal(correct_bias(tissue, np.zeros(shape, bool), spacing), tissue)
