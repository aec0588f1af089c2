"""Atomic output helpers: complete files or nothing, never a temporary left behind."""

from __future__ import annotations

import json
import stat

from detection.fileio import atomic_output, copy_atomic, write_json_atomic, write_text_atomic

import pytest


def test_success_publishes_readable_file_and_leaves_no_temp(tmp_path) -> None:
    out = tmp_path / "sub" / "a.nii.gz"
    with atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.endswith(".nii.gz") and tmp != out
        tmp.write_bytes(b"data")
        assert not out.exists()  # not visible before the block ends
    assert out.read_bytes() == b"data"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["a.nii.gz"]


def test_failure_keeps_the_previous_file_and_removes_the_temp(tmp_path) -> None:
    out = tmp_path / "m.json"
    write_json_atomic(out, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert json.loads(out.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_text_and_copy(tmp_path) -> None:
    a = write_text_atomic(tmp_path / "a.txt", "x\ny\n")
    b = copy_atomic(a, tmp_path / "d" / "b.txt")
    assert b.read_text() == "x\ny\n"
    assert json.loads(write_json_atomic(tmp_path / "c.json", [1, 2], indent=None)
                      .read_text()) == [1, 2]


def test_json_is_strict_with_numpy_and_nan(tmp_path) -> None:
    import numpy as np

    obj = {1: (np.int64(3), np.float32(0.5)), "nan": float("nan"), "arr": np.array([1.0, np.inf]),
           "flag": np.bool_(True), "p": tmp_path}
    text = write_json_atomic(tmp_path / "s.json", obj).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"1": [3, 0.5], "nan": None, "arr": [1.0, None], "flag": True,
                                "p": str(tmp_path)}
