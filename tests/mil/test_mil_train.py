"""Training on bags with known answers; the train_cv protocol and its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mil import CLASSES
from mil.bagio import Bag, read_index
from mil.dataset import PatientBag, load_patient_bags
from mil.model import MILEnsemble, load_checkpoint
from mil.synthetic_bags import write_synthetic_bags
from mil.train import (
    PREDICTION_COLUMNS,
    MILConfig,
    evaluate,
    fit_model,
    load_config,
    parse_overrides,
    predict,
    train_cv,
)

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "configs" / "mil" / "quick_test.yaml"
SIGNAL = ("sig_a", "sig_b", "sig_c", "noise_1", "noise_2")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def signal_bags(n: int, seed: int) -> tuple[list[PatientBag], list[int]]:
    """Bags where exactly one 'key' instance carries the label (one-hot in sig_*),
    hidden among 2-7 distractors; returns the bags and each key instance's position."""
    rng = np.random.default_rng(seed)
    bags, keys = [], []
    for i in range(n):
        label = i % 3
        m = int(rng.integers(2, 8))
        x = np.zeros((m + 1, 5), np.float32)
        x[:, :3] = rng.normal(0, 0.3, (m + 1, 3))
        x[:, 3:] = rng.normal(0, 1.0, (m + 1, 2))
        key = int(rng.integers(0, m + 1))
        x[key, label] += 2.0
        bag = Bag(f"S{i}", np.zeros((m + 1, 3, 8, 8), np.float32), x, SIGNAL,
                  np.arange(1, m + 2, dtype=np.int64))
        bags.append(PatientBag(f"S{i}", "A", label, float("nan"), bag))
        keys.append(key)
    return bags, keys


def _signal_cfg(**kw: object) -> MILConfig:
    base = dict(features=None, use_crops=False, use_summary=False, max_epochs=40,
                batch_size=8, lr=3e-3, max_instances=None, patience=40,
                model={"embed_dim": 16, "attention_dim": 8, "feature_hidden": 16,
                       "classifier_hidden": 16, "dropout": 0.0})
    base.update(kw)
    return MILConfig(**base)


def test_learns_instance_label_and_attends_to_key_instance() -> None:
    train, _ = signal_bags(72, seed=1)
    test, keys = signal_bags(45, seed=2)
    res = fit_model(train, None, _signal_cfg(), epochs=40, seed=0)
    probs, att = predict(res.model, test)
    y = np.array([pb.label for pb in test])
    acc = float((probs.argmax(1) == y).mean())
    assert acc >= 0.9, acc
    key_att = np.array([a[k] for a, k in zip(att, keys, strict=True)])
    uniform = np.array([1.0 / len(a) for a in att])
    assert key_att.mean() > 0.6, key_att.mean()
    assert key_att.mean() > 2.5 * uniform.mean()
    assert (np.array([a.argmax() for a in att]) == np.array(keys)).mean() >= 0.85
    for a in att:
        assert a.sum() == pytest.approx(1.0, abs=1e-5)


def test_empty_and_single_instance_bags_in_training() -> None:
    train, _ = signal_bags(30, seed=3)
    empty = Bag("E", np.zeros((0, 3, 8, 8), np.float32), np.zeros((0, 5), np.float32), SIGNAL,
                np.zeros(0, np.int64))
    train += [PatientBag(f"E{i}", "A", 2, float("nan"), empty) for i in range(6)]
    res = fit_model(train, None, _signal_cfg(max_epochs=15), epochs=15, seed=0)
    single = Bag("one", np.zeros((1, 3, 8, 8), np.float32),
                 np.array([[2.0, 0, 0, 0, 0]], np.float32), SIGNAL, np.array([7]))
    probs, att = predict(res.model, [PatientBag("E", "A", -1, float("nan"), empty),
                                     PatientBag("one", "A", -1, float("nan"), single)])
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert len(att[0]) == 0
    assert att[1].tolist() == [pytest.approx(1.0)]
    assert probs[0].argmax() == 2  # all empty training bags were CADASIL


def test_fit_is_deterministic() -> None:
    train, _ = signal_bags(24, seed=4)
    cfg = _signal_cfg(max_epochs=5)
    a = predict(fit_model(train[:18], train[18:], cfg, seed=3).model, train)[0]
    b = predict(fit_model(train[:18], train[18:], cfg, seed=3).model, train)[0]
    np.testing.assert_array_equal(a, b)


def test_config_loading(tmp_path: Path) -> None:
    for path in sorted((REPO / "configs" / "mil").glob("*.yaml")):
        assert isinstance(load_config(path), MILConfig)
    cfg = load_config(QUICK, parse_overrides(["max_epochs=3", "external_centers=[C]"]))
    assert cfg.max_epochs == 3 and cfg.external_centers == ["C"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_epochz: 3\n")
    with pytest.raises(ValueError, match="max_epochz"):
        load_config(bad)
    with pytest.raises(ValueError):
        load_config(None, {"model": {"embed_dimz": 3}})


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_bags(out, {"A": 24, "B": 24, "C": 15}, seed=0, crop_size=16)


def test_synthetic_generator_is_seeded(tmp_path: Path, synthetic_index: Path) -> None:
    again = write_synthetic_bags(tmp_path, {"A": 24, "B": 24, "C": 15}, seed=0, crop_size=16)
    a, b = read_index(synthetic_index), read_index(again)
    pd.testing.assert_frame_equal(a.drop(columns="bag_path"), b.drop(columns="bag_path"))
    assert (a["n_instances"] == 0).any()  # CADASIL without CMB: empty bags occur
    assert set(a["label"]) == set(CLASSES)


def test_train_cv_outputs(tmp_path: Path, synthetic_index: Path) -> None:
    cfg = load_config(QUICK, {"external_centers": ["C"]})
    out = tmp_path / "run"
    metrics = train_cv(synthetic_index, out, cfg)
    index = read_index(synthetic_index)

    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert tuple(pred.columns) == PREDICTION_COLUMNS
    assert len(pred) == len(index)
    ext = pred[pred["fold"] == "external"]
    assert set(ext["center"]) == {"C"} and len(ext) == 15
    dev = pred[pred["fold"] != "external"]
    assert set(dev["fold"].astype(int)) == {0, 1, 2}
    probs = pred[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (pred["pred_label"] == np.array(CLASSES)[probs.argmax(1)]).all()
    # CV folds are stratified and patient-level: each patient exactly once.
    assert dev["patient_id"].is_unique

    att = pd.read_csv(out / "attention.csv", keep_default_na=False)
    assert list(att.columns) == ["patient_id", "lesion_id", "attention", "fold"]
    assert len(att) == index["n_instances"].sum()
    sums = att.groupby("patient_id")["attention"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-5)

    base = pd.read_csv(out / "baseline_predictions.csv", keep_default_na=False)
    assert tuple(base.columns) == PREDICTION_COLUMNS and len(base) == len(index)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics, default=str))
    for split in ("cv", "external"):
        for who in ("model", "baseline"):
            block = saved[split][who]
            assert block["n"] == (48 if split == "cv" else 15)
            assert 0.0 <= block["accuracy"] <= 1.0
            lo, hi = block["ci95"]["auc_weighted"]
            assert lo <= block["auc_weighted"] <= hi
            assert block["bootstrap"]["n_resamples"] == cfg.n_bootstrap
    assert saved["cv"]["model"]["auc_weighted"] > 0.6  # learns something in 8 epochs
    assert len(saved["folds"]) == 3
    assert saved["protocol"]["final_epochs"] >= cfg.min_epochs
    for name in ("roc_cv.png", "roc_external.png", "confusion_cv.png", "confusion_external.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # The saved final model reproduces the external predictions through evaluate().
    model, info = load_checkpoint(out / "model")
    assert info["meta"]["final_epochs"] == saved["protocol"]["final_epochs"]
    ev = evaluate(out / "model", synthetic_index, tmp_path / "eval", centers=["C"],
                  n_bootstrap=100)
    ev_pred = pd.read_csv(tmp_path / "eval" / "predictions.csv", keep_default_na=False)
    np.testing.assert_allclose(ev_pred[list(PREDICTION_COLUMNS[4:7])].to_numpy(),
                               ext[list(PREDICTION_COLUMNS[4:7])].to_numpy(), atol=1e-6)
    assert ev["external"]["model"]["accuracy"] == pytest.approx(
        saved["external"]["model"]["accuracy"])
    probs_direct, _ = predict(model, load_patient_bags(index, ["C"]))
    np.testing.assert_allclose(probs_direct, ext[list(PREDICTION_COLUMNS[4:7])], atol=1e-6)


def test_train_cv_seed_ensemble(tmp_path: Path, synthetic_index: Path) -> None:
    cfg = load_config(QUICK, {"external_centers": ["C"], "ensemble_size": 2, "n_bootstrap": 50})
    out = tmp_path / "ens"
    metrics = train_cv(synthetic_index, out, cfg)
    assert metrics["protocol"]["ensemble_size"] == 2
    assert len(metrics["protocol"]["member_final_epochs"]) == 2
    for fold in metrics["folds"]:
        seeds = [m["seed"] for m in fold["members"]]
        assert seeds == [fold["fold"], fold["fold"] + 1000]
    for name in ("model", "model_m1", "fold0", "fold0_m1", "fold2_m1"):
        assert (out / "model" / f"{name}.pth").is_file(), name
    model, info = load_checkpoint(out / "model")
    assert isinstance(model, MILEnsemble) and len(model.members) == 2
    assert info["meta"]["member_final_epochs"] == metrics["protocol"]["member_final_epochs"]
    # External probabilities are the mean of the two members' probabilities.
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    ext = pred[pred["fold"] == "external"][list(PREDICTION_COLUMNS[4:7])].to_numpy()
    bags = load_patient_bags(read_index(synthetic_index), ["C"])
    member_p = [predict(m, bags)[0] for m in model.members]
    assert not np.allclose(member_p[0], member_p[1], atol=1e-4)
    np.testing.assert_allclose(ext, (member_p[0] + member_p[1]) / 2, atol=1e-5)
    # The CV fold models are ensembles too: fold 0's saved pair reproduces its rows.
    fold0, _ = load_checkpoint(out / "model" / "fold0.pth")
    assert isinstance(fold0, MILEnsemble)
    dev = pred[pred["fold"] == "0"]
    dev_bags = {pb.patient_id: pb for pb in load_patient_bags(read_index(synthetic_index))}
    p0, _ = predict(fold0, [dev_bags[i] for i in dev["patient_id"]])
    np.testing.assert_allclose(p0, dev[list(PREDICTION_COLUMNS[4:7])].to_numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="ensemble_size"):
        load_config(QUICK, {"ensemble_size": 0})

    # Two worker processes train the same models (each job seeds itself).
    par = tmp_path / "ens_par"
    train_cv(synthetic_index, par, load_config(QUICK, {
        "external_centers": ["C"], "ensemble_size": 2, "n_bootstrap": 50, "workers": 2}))
    pred_par = pd.read_csv(par / "predictions.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(pred_par, pred, atol=1e-5)
    with pytest.raises(ValueError, match="workers"):
        load_config(QUICK, {"workers": 0})


def test_train_cv_rejects_bad_setup(tmp_path: Path, synthetic_index: Path) -> None:
    with pytest.raises(ValueError, match="external centre"):
        train_cv(synthetic_index, tmp_path, load_config(QUICK, {"external_centers": ["Z"]}))


def test_index_folds_and_bag_provenance(tmp_path: Path, synthetic_index: Path) -> None:
    from mil.train import _assign_folds, _bag_provenance

    index = read_index(synthetic_index)
    dev = load_patient_bags(index, ["A", "B"])
    index["fold"] = [i % 4 for i in range(len(index))]
    index["bag_source"] = "out_of_fold"
    folds = _assign_folds(dev, index, MILConfig(folds="index"))
    assert folds.tolist() == index["fold"][: len(dev)].tolist()
    with pytest.raises(ValueError, match="fold"):
        _assign_folds(dev, index.drop(columns="fold"), MILConfig(folds="index"))
    strat = _assign_folds(dev, index, MILConfig(n_folds=4))
    y = np.array([pb.label for pb in dev])
    for k in range(4):  # stratified: every class in every fold
        assert set(y[strat == k]) == {0, 1, 2}
    assert _bag_provenance(index, synthetic_index)["bag_source"] == {"out_of_fold": 63}


def test_metrics_json_writes_undefined_values_as_null(tmp_path) -> None:
    """A fold whose validation split holds one class has an undefined (NaN) AUC."""
    import json
    import math

    from mil.train import _write_json

    out = tmp_path / "m.json"
    _write_json(out, {"val_auc": math.nan, "folds": [{"auc": float("inf")}, {"auc": 0.5}]})
    assert json.loads(out.read_text()) == {"val_auc": None, "folds": [{"auc": None}, {"auc": 0.5}]}
