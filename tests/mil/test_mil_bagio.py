"""Bag format: round trip, atomic write, index validation errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mil import FEATURE_NAMES
from mil.bagio import BagFormatError, load_bag, read_index, save_bag, write_index


def _bag(n: int, s: int = 8, f: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "crops": rng.normal(size=(n, 3, s, s)).astype(np.float32),
        "features": rng.normal(size=(n, f)).astype(np.float32),
        "feature_names": list(FEATURE_NAMES[:f]),
        "lesion_ids": np.arange(10, 10 + n),
    }


@pytest.mark.parametrize("n", [0, 1, 5])
def test_round_trip(tmp_path: Path, n: int) -> None:
    b = _bag(n)
    path = save_bag(tmp_path / "P1.npz", patient_id="P1", **b)
    assert path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "P1.npz"]  # no temp file left
    bag = load_bag(path)
    assert bag.patient_id == "P1"
    assert bag.n_instances == n
    assert bag.crops.shape == (n, 3, 8, 8) and bag.crops.dtype == np.float32
    assert bag.features.shape == (n, 4) and bag.features.dtype == np.float32
    assert bag.lesion_ids.dtype == np.int64
    np.testing.assert_array_equal(bag.crops, b["crops"])
    np.testing.assert_array_equal(bag.features, b["features"])
    np.testing.assert_array_equal(bag.lesion_ids, b["lesion_ids"])
    assert bag.feature_names == tuple(FEATURE_NAMES[:4])
    np.testing.assert_array_equal(bag.feature("volume_mm3"), b["features"][:, 1])
    np.testing.assert_array_equal(
        bag.select_features(["diameter_mm", "score"]), b["features"][:, [2, 0]]
    )
    rows = [n - 1, 0] if n else []  # chosen instances only, in the order asked
    np.testing.assert_array_equal(
        bag.select_features(["diameter_mm", "score"], rows=rows), b["features"][rows][:, [2, 0]]
    )
    # Loadable with plain numpy and no pickle.
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"crops", "features", "feature_names", "lesion_ids", "patient_id"}


def test_save_rejects_inconsistent_shapes(tmp_path: Path) -> None:
    b = _bag(3)
    with pytest.raises(BagFormatError, match="feature names"):
        save_bag(tmp_path / "a.npz", b["crops"], b["features"], ["x"], b["lesion_ids"], "a")
    with pytest.raises(BagFormatError, match="crops"):
        save_bag(tmp_path / "a.npz", b["crops"][:2], b["features"], b["feature_names"],
                 b["lesion_ids"], "a")
    with pytest.raises(BagFormatError, match="unique"):
        save_bag(tmp_path / "a.npz", b["crops"], b["features"], b["feature_names"],
                 [1, 1, 2], "a")
    with pytest.raises(BagFormatError, match="patient_id"):
        save_bag(tmp_path / "a.npz", b["crops"], b["features"], b["feature_names"],
                 b["lesion_ids"], "")
    assert not (tmp_path / "a.npz").exists()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BagFormatError, match="bad.npz"):
        load_bag(bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, crops=np.zeros((0, 3, 4, 4), np.float32))
    with pytest.raises(BagFormatError, match=r"partial\.npz.*missing key"):
        load_bag(partial)
    with pytest.raises(FileNotFoundError):
        load_bag(tmp_path / "nope.npz")


def _index(tmp_path: Path, n_bags: int = 3) -> Path:
    entries = []
    for i in range(n_bags):
        path = save_bag(tmp_path / "bags" / f"P{i}.npz", patient_id=f"P{i}", **_bag(i))
        entries.append({"patient_id": f"P{i}", "center": "A", "path": str(path),
                        "label": ["aSVD", "CAA", None][i % 3], "age": 60.0 + i})
    return write_index(tmp_path / "index.csv", entries)


def test_index_round_trip(tmp_path: Path) -> None:
    csv = _index(tmp_path)
    raw = pd.read_csv(csv, keep_default_na=False)
    assert list(raw.columns[:5]) == ["patient_id", "center", "label", "n_instances", "path"]
    assert raw["path"].tolist() == ["bags/P0.npz", "bags/P1.npz", "bags/P2.npz"]  # relative
    df = read_index(csv)
    assert df["n_instances"].tolist() == [0, 1, 2]
    assert df["label"].tolist() == ["aSVD", "CAA", ""]
    assert df["age"].tolist() == [60.0, 61.0, 62.0]
    for p in df["bag_path"]:
        assert Path(p).is_absolute() and Path(p).is_file()


def _edit(csv: Path, line: int, column: str, value: object) -> None:
    df = pd.read_csv(csv, keep_default_na=False, dtype=str)
    df.loc[line - 2, column] = value
    df.to_csv(csv, index=False)


def test_index_duplicate_id(tmp_path: Path) -> None:
    csv = _index(tmp_path)
    _edit(csv, 3, "patient_id", "P0")
    with pytest.raises(BagFormatError, match=r"index\.csv: duplicate patient_id \['P0'\]"):
        read_index(csv)


def test_index_unknown_label(tmp_path: Path) -> None:
    csv = _index(tmp_path)
    _edit(csv, 3, "label", "HTN")
    with pytest.raises(BagFormatError, match=r"index\.csv line 3 \(P1\): unknown label 'HTN'"):
        read_index(csv)


def test_index_missing_file(tmp_path: Path) -> None:
    csv = _index(tmp_path)
    (tmp_path / "bags" / "P2.npz").unlink()
    with pytest.raises(BagFormatError, match=r"line 4 \(P2\): bag file not found.*P2\.npz"):
        read_index(csv)


def test_index_n_instances_mismatch(tmp_path: Path) -> None:
    csv = _index(tmp_path)
    _edit(csv, 4, "n_instances", "7")
    with pytest.raises(BagFormatError, match=r"line 4 \(P2\): n_instances=7 but .*holds 2"):
        read_index(csv)


def test_index_missing_column(tmp_path: Path) -> None:
    csv = _index(tmp_path)
    pd.read_csv(csv).drop(columns=["center"]).to_csv(csv, index=False)
    with pytest.raises(BagFormatError, match="missing column"):
        read_index(csv)
