"""detection/report.py: the demo report on small fabricated stage outputs."""

from __future__ import annotations

import json
from pathlib import Path

from detection import report as R
from detection.evaluation.lesions import evaluate_prediction_dir
from detection.lesions import lesion_table

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mil.metrics import classification_report, plot_confusion, plot_roc

SHAPE = (24, 28, 10)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
AFFINE[:3, 3] = [-24.0, -28.0, -15.0]
CENTERS = {"A": ["aSVD", "CAA", "CADASIL"], "C": ["aSVD", "CAA", "CADASIL", "CAA"]}


def _save(arr: np.ndarray, path: Path) -> str:
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))
    return str(path)


def _strict(path: Path) -> dict:
    def bad(x):
        raise ValueError(f"non-strict JSON constant {x}")

    return json.loads(path.read_text(), parse_constant=bad)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> R.RunLayout:
    """A run folder with every stage output the report reads, made by hand."""
    L = R.RunLayout(tmp_path_factory.mktemp("run"))
    rng = np.random.default_rng(0)
    rows, gt_rows = [], []
    L.cohort.mkdir(parents=True)
    for center, labels in CENTERS.items():
        for n, label in enumerate(labels, 1):
            pid = f"{center}_{n:03d}"
            d = L.cohort / pid
            d.mkdir()
            swi = rng.normal(100, 5, SHAPE).astype(np.float32)
            brain = np.zeros(SHAPE, np.uint8)
            brain[3:21, 3:25, 1:9] = 1
            mask = np.zeros(SHAPE, np.int16)
            lesions = [(6, 8, 4), (15, 18, 6)] if label != "CADASIL" else [(12, 10, 3)]
            for k, (i, j, z) in enumerate(lesions, 1):
                mask[i:i + 2, j:j + 2, z:z + 2] = k
                swi[i:i + 2, j:j + 2, z:z + 2] = 10
                world = AFFINE @ np.array([i + 0.5, j + 0.5, z + 0.5, 1.0])
                gt_rows.append({"patient_id": pid, "lesion_id": k,
                                "region": ["lobar", "deep", "infratentorial"][k % 3],
                                "x_mm": world[0], "y_mm": world[1], "z_mm": world[2]})
            rows.append({"patient_id": pid, "center": center, "label": label,
                         "swi": _save(swi, d / "swi.nii.gz"),
                         "cmb_mask": _save(mask, d / "cmb_mask.nii.gz"),
                         "brain_mask": _save(brain, d / "brain_mask.nii.gz"), "age": 60 + n})
            # prediction: perfect except one missed lesion in C_002
            pred = mask.copy()
            if pid == "C_002":
                pred[pred == 2] = 0
            pdir = L.predict / pid
            pdir.mkdir(parents=True)
            _save(pred.astype(np.int16), pdir / "cmb_pred.nii.gz")
            ids = [int(v) for v in np.unique(pred) if v]
            table = lesion_table(pred.astype(np.int32), AFFINE, {i: 0.9 for i in ids},
                                 brain > 0, patient_id=pid)
            table.to_csv(pdir / "lesions.csv", index=False)
    pd.DataFrame(rows).to_csv(L.manifest, index=False)
    pd.DataFrame(gt_rows).to_csv(L.cohort / "lesions_gt.csv", index=False)
    tables = [pd.read_csv(p) for p in sorted(L.predict.glob("*/lesions.csv"))]
    pd.concat(tables).to_csv(L.predict / "lesions_all.csv", index=False)
    man = pd.DataFrame(rows)
    for split, centers in (("external", ["C"]), ("development", ["A"])):
        out = L.lesion_split(split)
        out.mkdir(parents=True)
        man[man["center"].isin(centers)].to_csv(out / "manifest.csv", index=False)
        evaluate_prediction_dir(L.predict, out / "manifest.csv", out)
    # MIL outputs in mil/train.py's format
    L.mil.mkdir()
    y = {"cv": np.array([0, 1, 2]), "external": np.array([0, 1, 2, 1])}
    mil_metrics: dict = {"classes": list(R.CLASSES), "bags": {"bag_source": {"in-fold": 3}}}
    preds = []
    for split, yt in y.items():
        good = np.eye(3)[yt] * 0.7 + 0.1
        base = np.full((len(yt), 3), 0.05)
        base[:, 0] = 0.9
        mil_metrics[split] = {"model": classification_report(yt, good, R.CLASSES, 200, 0),
                              "baseline": classification_report(yt, base, R.CLASSES, 200, 0)}
        curves = {"MIL": (yt, good), "baseline": (yt, base)}
        plot_roc(curves, L.mil / f"roc_{split}.png", R.CLASSES)
        plot_confusion({"MIL": np.diag(np.bincount(yt, minlength=3))},
                       L.mil / f"confusion_{split}.png", R.CLASSES)
        if split == "external":
            for pid, k, p in zip([r["patient_id"] for r in rows if r["center"] == "C"], yt, good):
                preds.append({"patient_id": pid, "center": "C", "label": R.CLASSES[k],
                              "pred_label": R.CLASSES[int(np.argmax(p))],
                              **{f"prob_{c}": v for c, v in zip(R.CLASSES, p)},
                              "fold": "external"})
    (L.mil / "metrics.json").write_text(json.dumps(mil_metrics))
    pd.DataFrame(preds).to_csv(L.mil / "predictions.csv", index=False)
    L.train.mkdir()
    (L.train / "metrics.json").write_text(
        json.dumps({"iteration": 9, "total_loss": 1.0}) + "\n"
        + json.dumps({"iteration": 19, "segm/AP50": 61.5, "segm/AP": 30.0, "bbox/AP50": 55.0,
                      "bbox/AP": 20.0, "segm_raw/AP50": 41.5, "segm_raw/AP": 20.0,
                      "bbox_raw/AP50": 35.0, "bbox_raw/AP": 10.0}) + "\n")
    return L


def test_build_report_writes_tables_figures_and_strict_json(run):
    stages = [{"stage": "cohort", "status": "ran", "seconds": 12.0, "built_seconds": 12.0,
               "note": "7 patients"}]
    m = R.build_report(run, run_info={"seed": 0, "patients_per_class": 2}, stages=stages,
                       external_centers=["C"], n_overlays=2)
    text = run.report.read_text()
    # the study's figures beside ours
    for s in ("0.523 ± 0.319", "0.627 ± 0.296", "0.706 ± 0.365", "0.908 (0.895–0.921)",
              "0.819 (0.768–0.870)", "0.864 (0.831–0.897)", "0.829 (0.782–0.876)",
              "rule-based baseline", "in-fold", "Synthetic data", "## Stage timings"):
        assert s in text, s
    # external: C_002 missed one of two lesions -> recall mean (1+0.5+1+1)/4
    ext = m["detection"]["external"]
    assert ext["recall"]["mean"] == pytest.approx(0.875)
    assert ext["n_patients"] == 4 and m["detection"]["development_in_fold"]["n_patients"] == 3
    assert m["detection"]["coco_ap"]["segm_ap50"] == pytest.approx(0.615)
    assert m["detection"]["coco_ap"]["segm_ap50_raw"] == pytest.approx(0.415)
    assert "segm AP50 0.415" in text  # the unfused figure beside the fused one
    assert m["classification"]["external"]["model"]["accuracy"]["value"] == pytest.approx(1.0)
    checks = {c["check"]: c["passed"] for c in m["acceptance"]}
    assert checks["MIL accuracy"] is True
    assert checks["COCO segm AP50 (external slices, overlaps fused)"] is True
    assert checks["MIL better than the rule-based baseline"] is True
    for rel in ("figures/froc.png", "figures/roc_external.png", "figures/confusion_external.png",
                "figures/glass_brain_detected.png", "figures/glass_brain_reference.png"):
        assert (run.root / rel).is_file(), rel
        assert f"]({rel})" in text
    overlays = m["figures"]["overlays"]
    assert len(overlays) == 2 and all((run.root / p).is_file() for p in overlays)
    # the by-size table: C's 7 bleeds (one missed in C_002) and A's 5, all found
    ext_sizes = _strict(run.lesion_split("external") / "metrics.json")["by_reference_size"]
    dev_sizes = _strict(run.lesion_split("development") / "metrics.json")["by_reference_size"]
    rows = R.size_table_rows(
        {"by_reference_size": ext_sizes}, {"by_reference_size": dev_sizes})
    assert [r[0] for r in rows] == [r["diameter_mm"] for r in ext_sizes]
    filled = [(e, d) for e, d in zip(ext_sizes, dev_sizes) if e["n_ref"]]
    assert [(e["n_ref"], d["n_ref"]) for e, d in filled] == [(7, 5)]
    assert filled[0][0]["sensitivity"] == pytest.approx(6 / 7)
    assert filled[0][1]["volume_ratio"] == pytest.approx(1.0)
    row = next(r for r in rows if r[0] == filled[0][0]["diameter_mm"])
    assert row[1] == "7: 0.857 / 1.000 / 1.00" and row[2] == "5: 1.000 / 1.000 / 1.00"
    assert "By reference bleed size" in text and "| " + " | ".join(row) + " |" in text
    assert R.size_table_rows(None, {}) == []
    on_disk = _strict(run.metrics)
    assert on_disk["stages"][0]["stage"] == "cohort"
    assert on_disk["study_reference"]["classification_external"]["auc_weighted"]["value"] == 0.908
    assert on_disk["lesion_regions_by_class"]["detected"]["CADASIL"]


def test_update_stage_timings_rewrites_the_table_only(run):
    R.build_report(run, stages=[], external_centers=["C"], n_overlays=0)
    before = run.report.read_text()
    stages = [{"stage": s, "status": "ran", "seconds": 1.5, "built_seconds": 1.5, "note": ""}
              for s in ("cohort", "report")]
    R.update_stage_timings(run, stages)
    after = run.report.read_text()
    assert "| report | ran | 1.5 | 1.5 |" in after and "| **total** |  | 3.0 | 3.0 |" in after
    head = before.split("<!-- stage-timings:start -->")[0]
    assert after.startswith(head)
    assert [s["stage"] for s in _strict(run.metrics)["stages"]] == ["cohort", "report"]


def test_missing_stage_outputs_give_na_not_errors(tmp_path, run):
    # A run whose MIL and lesion stages never ran still gets a report (figures it can make).
    L = R.RunLayout(tmp_path / "partial")
    L.cohort.mkdir(parents=True)
    man = pd.read_csv(run.manifest)
    man.to_csv(L.manifest, index=False)
    m = R.build_report(L, external_centers=["C"], n_overlays=1)
    assert m["detection"]["external"] is None and m["classification"]["external"] is None
    assert all(c["passed"] is None for c in m["acceptance"])
    assert "n/a" in L.report.read_text()
    assert m["figures"]["overlays"] == []  # no predictions to overlay: skipped, logged


def test_glass_brain_without_template_and_positions(tmp_path, monkeypatch):
    pts = pd.DataFrame({"patient_id": ["p", "p", "q"], "x_mm": [0.0, 10.0, 5.0],
                        "y_mm": [0.0, -10.0, 0.0], "z_mm": [0.0, 20.0, 0.0],
                        "region": ["lobar", "deep", "weird"]})
    boxes = {"p": (np.array([-10.0, -10.0, -20.0]), np.array([10.0, 10.0, 20.0]))}
    norm = R.normalised_positions(pts, boxes)
    assert list(norm["patient_id"]) == ["p", "p"]  # q has no box
    np.testing.assert_allclose(norm[["pos_lr", "pos_ap", "pos_si"]].to_numpy(),
                               [[0, 0, 0], [1, -1, 1]])
    norm["label"] = ["CAA", "aSVD"]
    monkeypatch.setattr(R, "mni_template_path", lambda: None)
    out = R.plot_glass_brain(norm, tmp_path / "g.png", "t")
    assert out.is_file() and out.stat().st_size > 1000


def test_mni_template_is_found_without_download():
    p = R.mni_template_path()
    if p is None:
        pytest.skip("nilearn wheel not installed")
    assert p.name.startswith("mni_icbm152_t1") and p.is_file()


def test_pick_overlay_patients_cycles_classes():
    cohort = pd.DataFrame({"patient_id": ["C1", "C2", "C3", "C4", "A1"],
                           "center": ["C", "C", "C", "C", "A"],
                           "label": ["CAA", "CAA", "aSVD", "CADASIL", "aSVD"]})
    pp = pd.DataFrame({"patient_id": ["C1", "C2", "C3", "C4"], "n_ref": [1, 5, 2, 0]})
    assert R._pick_overlay_patients(cohort, pp, ["C"], 4) == ["C3", "C2", "C4", "C1"]
    assert R._pick_overlay_patients(cohort, None, ["X"], 3) == []


def test_brain_box_matches_brute_force_with_oblique_affine(tmp_path):
    rng = np.random.default_rng(3)
    m = np.zeros((20, 22, 9), np.uint8)
    m[3:17, 4:19, 1:8] = rng.random((14, 15, 7)) > 0.3
    c, s_ = np.cos(0.3), np.sin(0.3)
    aff = np.array([[0.9 * c, -0.9 * s_, 0.0, 10.0], [0.9 * s_, 0.9 * c, 0.4, -5.0],
                    [0.0, -0.2, 3.0, 2.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(m, aff), tmp_path / "b.nii.gz")
    lo, hi = R.brain_box(tmp_path / "b.nii.gz")
    world = np.argwhere(m > 0) @ aff[:3, :3].T + aff[:3, 3]
    np.testing.assert_allclose(lo, world.min(0), atol=1e-5)
    np.testing.assert_allclose(hi, world.max(0), atol=1e-5)
