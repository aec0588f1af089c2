"""Manifest CSV and nnU-Net folder reading: every bad row reported at once."""

from __future__ import annotations

from pathlib import Path

from detection.data.manifest import check_grids, read_cohort, read_manifest, read_nnunet_folder
from detection.data.volume import CohortError

import nibabel as nib
import numpy as np
import pytest

SHAPE = (6, 7, 4)


def _nii(path: Path, shape=SHAPE, affine=None, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4) if affine is None else affine), path)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_valid_manifest_resolves_paths_and_keeps_extra_columns(tmp_path: Path) -> None:
    _nii(tmp_path / "P1" / "swi.nii.gz")
    _nii(tmp_path / "P1" / "m.nii.gz", dtype=np.int16)
    other = _nii(tmp_path / "elsewhere" / "swi2.nii.gz")
    csv = _write(
        tmp_path / "manifest.csv",
        "patient_id,center,label,swi,cmb_mask,age,scanner\n"
        "P1,A,caa,P1/swi.nii.gz,P1/m.nii.gz,71,GE\n"
        f"P2, B ,,{other},,,Siemens\n",
    )
    df = read_manifest(csv)
    assert list(df.columns[:7]) == [
        "patient_id",
        "center",
        "label",
        "swi",
        "cmb_mask",
        "brain_mask",
        "age",
    ]
    assert df["scanner"].tolist() == ["GE", "Siemens"]
    assert df["label"].tolist() == ["CAA", ""]  # canonical case; empty allowed (inference)
    assert df["center"].tolist() == ["A", "B"]
    assert df.loc[0, "swi"] == str(tmp_path / "P1" / "swi.nii.gz")
    assert df.loc[1, "swi"] == str(other) and df.loc[1, "cmb_mask"] == ""
    assert df.loc[0, "age"] == 71.0 and np.isnan(df.loc[1, "age"])
    assert read_cohort(csv).equals(df)


def test_every_bad_row_is_listed_in_one_error(tmp_path: Path) -> None:
    _nii(tmp_path / "ok.nii.gz")
    csv = _write(
        tmp_path / "manifest.csv",
        "patient_id,center,label,swi,cmb_mask,age\n"
        "P1,A,aSVD,ok.nii.gz,,60\n"  # line 2: fine
        "P2,A,aSVD,missing.nii.gz,,60\n"  # line 3: missing swi
        "P1,B,CAA,ok.nii.gz,,60\n"  # line 4: duplicate id
        "P4,B,Alzheimer,ok.nii.gz,,60\n"  # line 5: unknown label
        "P5,B,CADASIL,ok.nii.gz,nomask.nii.gz,sixty\n"  # line 6: missing mask + bad age
        "P6,,CAA,ok.nii.gz,,\n"  # line 7: empty centre
        "../x,A,CAA,ok.nii.gz,,\n",  # line 8: unsafe id
    )
    with pytest.raises(CohortError) as ei:
        read_manifest(csv)
    msg = str(ei.value)
    assert str(csv) in msg and "7 problem(s)" in msg
    assert "line 3 (patient_id 'P2'): swi file not found: " in msg and "missing.nii.gz" in msg
    assert "line 4 (patient_id 'P1'): duplicate patient_id (first at line 2)" in msg
    assert (
        "line 5 (patient_id 'P4'): unknown label 'Alzheimer' (expected one of aSVD, CAA, CADASIL)"
        in msg
    )
    assert "line 6 (patient_id 'P5'): cmb_mask file not found" in msg
    assert "line 6 (patient_id 'P5'): age 'sixty' is not a number" in msg
    assert "line 7 (patient_id 'P6'): empty center" in msg
    assert "line 8 (patient_id '../x'): patient_id may hold only" in msg
    assert "line 2" not in msg.replace("first at line 2", "")


def test_missing_columns(tmp_path: Path) -> None:
    csv = _write(tmp_path / "m.csv", "patient_id,label,path\nP1,CAA,x.nii.gz\n")
    with pytest.raises(
        CohortError,
        match=r"m\.csv: missing column\(s\) center, swi \(required: .*"
        r"found: patient_id, label, path\)",
    ):
        read_manifest(csv)


def test_empty_cohort_and_empty_file(tmp_path: Path) -> None:
    csv = _write(tmp_path / "m.csv", "patient_id,center,label,swi\n")
    with pytest.raises(CohortError, match=r"m\.csv: empty cohort"):
        read_manifest(csv)
    empty = _write(tmp_path / "e.csv", "")
    with pytest.raises(CohortError, match=r"e\.csv: empty file"):
        read_manifest(empty)
    with pytest.raises(CohortError, match=r"nope\.csv: file not found"):
        read_manifest(tmp_path / "nope.csv")


def test_required_labels_and_masks(tmp_path: Path) -> None:
    _nii(tmp_path / "ok.nii.gz")
    csv = _write(tmp_path / "m.csv", "patient_id,center,label,swi,cmb_mask\nP1,A,,ok.nii.gz,\n")
    read_manifest(csv)
    with pytest.raises(CohortError) as ei:
        read_manifest(csv, require_labels=True, require_masks=True)
    assert "empty label (training needs one of" in str(ei.value)
    assert "empty cmb_mask" in str(ei.value)


def test_check_grids_lists_every_mismatch(tmp_path: Path) -> None:
    _nii(tmp_path / "a" / "swi.nii.gz")
    _nii(tmp_path / "a" / "m.nii.gz", shape=(6, 7, 5), dtype=np.int16)
    _nii(tmp_path / "b" / "swi.nii.gz")
    _nii(tmp_path / "b" / "m.nii.gz", affine=np.diag([2.0, 1, 1, 1]), dtype=np.int16)
    _nii(tmp_path / "c" / "swi.nii.gz", shape=(*SHAPE, 2))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "swi.nii.gz").write_bytes(b"garbage")
    csv = _write(
        tmp_path / "m.csv",
        "patient_id,center,label,swi,cmb_mask\n"
        "A,X,CAA,a/swi.nii.gz,a/m.nii.gz\n"
        "B,X,CAA,b/swi.nii.gz,b/m.nii.gz\n"
        "C,X,CAA,c/swi.nii.gz,\n"
        "D,X,CAA,d/swi.nii.gz,\n",
    )
    with pytest.raises(CohortError) as ei:
        check_grids(read_manifest(csv), source=str(csv))
    msg = str(ei.value)
    assert "4 problem(s)" in msg
    assert (
        "patient 'A': cmb_mask" in msg and "shape (6, 7, 5) differs from the SWI's (6, 7, 4)" in msg
    )
    assert "patient 'B': cmb_mask" in msg and "affine differs from the SWI's" in msg
    assert "patient 'C': swi" in msg and "got shape (6, 7, 4, 2)" in msg
    assert "patient 'D': swi" in msg and "not a readable NIfTI" in msg


def _nnunet(tmp_path: Path) -> Path:
    root = tmp_path / "Dataset001_CMB"
    for case in ("c1", "c2"):
        _nii(root / "imagesTr" / f"{case}_0000.nii.gz")
        _nii(root / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
    _nii(root / "imagesTr" / "c1_0001.nii.gz")  # a second channel (ignored)
    _nii(root / "imagesTs" / "t1_0000.nii.gz")
    return root


def test_nnunet_folder(tmp_path: Path) -> None:
    root = _nnunet(tmp_path)
    _write(
        root / "labels.csv",
        "case_id,label,center,age,sex\nc1,CAA,A,70,F\nc2,aSVD,B,,M\nt1,,C,55,F\n",
    )
    df = read_nnunet_folder(root)
    assert df["patient_id"].tolist() == ["c1", "c2", "t1"]
    assert df.loc[0, "swi"].endswith("imagesTr/c1_0000.nii.gz")
    assert df.loc[0, "cmb_mask"].endswith("labelsTr/c1.nii.gz")
    assert df.loc[2, "cmb_mask"] == "" and df.loc[2, "split"] == "Ts"
    assert df["sex"].tolist() == ["F", "M", "F"]
    assert read_cohort(root).equals(df)


def test_nnunet_folder_errors(tmp_path: Path) -> None:
    root = _nnunet(tmp_path)
    labels = _write(tmp_path / "lab.csv", "case_id,label,center\nc1,CAA,A\nzz,CAA,A\nt1,Foo,C\n")
    with pytest.raises(CohortError) as ei:
        read_nnunet_folder(root, labels)
    msg = str(ei.value)
    assert "line 3 (case 'zz'): no image zz_0000.nii.gz" in msg
    assert "case 'c2': image c2_0000.nii.gz has no row in" in msg
    assert "unknown label 'Foo'" in msg
    with pytest.raises(CohortError, match=r"labels CSV .*lab2\.csv: missing column\(s\) center"):
        read_nnunet_folder(root, _write(tmp_path / "lab2.csv", "case_id,label\nc1,CAA\n"))
    with pytest.raises(CohortError, match=r"labels CSV .*labels\.csv not found"):
        read_nnunet_folder(root)
    (tmp_path / "emptyds" / "imagesTr").mkdir(parents=True)
    _write(tmp_path / "emptyds" / "labels.csv", "case_id,label,center\n")
    with pytest.raises(CohortError, match=r"emptyds: empty cohort"):
        read_nnunet_folder(tmp_path / "emptyds")
