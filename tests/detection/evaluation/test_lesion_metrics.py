"""Lesion-level detection metrics on hand-made cases with known answers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from detection.evaluation import lesions as E

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

SHAPE = (40, 40, 20)
EYE = np.eye(4)


def cube(labels, corner, size, value):
    i, j, k = corner
    labels[i:i + size, j:j + size, k:k + size] = value
    return labels


def two_lesions():
    ref = np.zeros(SHAPE, np.int32)
    cube(ref, (5, 5, 5), 3, 1)
    cube(ref, (25, 25, 10), 3, 2)
    return ref


def test_perfect_prediction():
    ref = two_lesions()
    r = E.evaluate_patient(ref, ref, EYE, {1: 0.9, 2: 0.8}).metrics
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)
    for k in ("iou", "dice", "recall", "sensitivity", "precision", "f1", "lesion_dice"):
        assert r[k] == pytest.approx(1.0), k
    assert r["abs_count_diff"] == 0


def test_empty_prediction():
    ref = two_lesions()
    r = E.evaluate_patient(np.zeros(SHAPE, np.int32), ref, EYE).metrics
    assert (r["tp"], r["fp"], r["fn"]) == (0, 0, 2)
    assert r["iou"] == r["dice"] == r["recall"] == r["sensitivity"] == r["f1"] == 0.0
    assert np.isnan(r["precision"]) and np.isnan(r["lesion_dice"])
    assert r["abs_count_diff"] == 2


def test_empty_reference_and_empty_both():
    pred = cube(np.zeros(SHAPE, np.int32), (5, 5, 5), 2, 1)
    r = E.evaluate_patient(pred, np.zeros(SHAPE, np.uint8), EYE).metrics
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 0)
    assert r["dice"] == 0.0 and r["f1"] == 0.0 and r["precision"] == 0.0
    assert np.isnan(r["recall"]) and np.isnan(r["sensitivity"])
    both = E.evaluate_patient(np.zeros(SHAPE), np.zeros(SHAPE), EYE).metrics
    assert both["dice"] == both["iou"] == both["f1"] == 1.0  # empty/empty convention
    assert np.isnan(both["recall"]) and np.isnan(both["precision"])


def test_one_false_positive():
    ref = two_lesions()
    pred = ref.copy()
    cube(pred, (30, 5, 2), 2, 7)
    r = E.evaluate_patient(pred, ref, EYE).metrics
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 0)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(4 / 5)
    assert r["recall"] == 1.0 and r["lesion_dice"] == 1.0
    assert r["dice"] == pytest.approx(2 * 54 / (62 + 54))


def test_lesion_split_in_two_is_one_tp_one_fp():
    ref = np.zeros(SHAPE, np.int32)
    ref[10:16, 10:12, 5:7] = 1  # 6 x 2 x 2 voxel lesion, centre i = 12.5
    pred = np.zeros(SHAPE, np.int32)
    pred[10:13, 10:12, 5:7] = 1  # centre i = 11 (1.5 mm away)
    pred[13:16, 10:12, 5:7] = 2  # centre i = 14 (1.5 mm away, tie -> lower id)
    res = E.evaluate_patient(pred, ref, EYE, {1: 0.9, 2: 0.8})
    r = res.metrics
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    assert r["recall"] == 1.0 and r["dice"] == 1.0
    assert r["lesion_dice"] == pytest.approx(2 * 12 / (12 + 24))
    assert res.matches[0][:2] == (1, 1)


def test_nearest_prediction_wins():
    ref = cube(np.zeros(SHAPE, np.int32), (10, 10, 10), 1, 1)
    pred = np.zeros(SHAPE, np.int32)
    pred[13, 10, 10] = 1  # 3 mm
    pred[11, 10, 10] = 2  # 1 mm: nearer, wins
    res = E.evaluate_patient(pred, ref, EYE)
    assert [m[:2] for m in res.matches] == [(2, 1)]
    assert E.match_lesions(np.array([[0, 0, 0.0], [0, 0, 4.0]]),
                           np.array([[0, 0, 1.0], [0, 0, 5.0]])) == [(0, 0, 1.0), (1, 1, 1.0)]


def test_anisotropic_spacing_4mm_vs_6mm():
    aff = np.diag([0.5, 0.5, 3.0, 1.0])
    ref = cube(np.zeros(SHAPE, np.int32), (10, 10, 8), 2, 1)
    near = cube(np.zeros(SHAPE, np.int32), (18, 10, 8), 2, 1)  # 8 voxels in-plane = 4 mm
    far = cube(np.zeros(SHAPE, np.int32), (10, 10, 10), 2, 1)  # 2 slices = 6 mm
    r_near = E.evaluate_patient(near, ref, aff).metrics
    r_far = E.evaluate_patient(far, ref, aff).metrics
    assert (r_near["tp"], r_near["fp"], r_near["fn"]) == (1, 0, 0)
    assert (r_far["tp"], r_far["fp"], r_far["fn"]) == (0, 1, 1)
    # on a 1 mm isotropic grid the 2-slice shift is only 2 mm
    assert E.evaluate_patient(far, ref, EYE).metrics["tp"] == 1


def test_binary_reference_is_split_into_components_and_score_thresh():
    ref = (two_lesions() > 0).astype(np.uint8)
    assert E.reference_instances(ref).max() == 2
    pred = two_lesions()
    r = E.evaluate_patient(pred, ref, EYE, {1: 0.9, 2: 0.3}, score_thresh=0.5).metrics
    assert (r["tp"], r["fp"], r["fn"], r["n_pred"]) == (1, 0, 1, 1)


def test_icc_shrout_fleiss_example_and_spearman():
    x = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9],
                  [6, 2, 4, 7]], float)  # Shrout & Fleiss (1979), table 2
    assert E.icc(x, "2,1") == pytest.approx(0.29, abs=0.005)
    assert E.icc(x, "3,1") == pytest.approx(0.71, abs=0.005)
    counts = np.array([[0, 0], [2, 2], [5, 5], [1, 1]], float)
    assert E.icc(counts) == pytest.approx(1.0)
    shifted = counts + [[3, 0]]  # systematic over-count: consistency 1, agreement < 1
    assert E.icc(shifted, "3,1") == pytest.approx(1.0) and E.icc(shifted, "2,1") < 0.7
    rho, p = E.spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 11])
    assert rho == pytest.approx(1.0) and p < 0.05
    assert E.spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    assert np.isnan(E.spearman([1, 1, 1], [1, 2, 3])[0])
    assert np.isnan(E.icc(np.ones((4, 2))))


def _points_case(pid, ref_pts, pred_pts, scores):
    """A patient from single-voxel lesions on a 1 mm grid."""
    ref = np.zeros(SHAPE, np.int32)
    for n, p in enumerate(ref_pts, 1):
        ref[tuple(p)] = n
    pred = np.zeros(SHAPE, np.int32)
    for n, p in enumerate(pred_pts, 1):
        pred[tuple(p)] = n
    return E.evaluate_patient(pred, ref, EYE, dict(enumerate(scores, 1)), patient_id=pid)


def froc_cases():
    # 2 patients, 4 reference lesions; TP scores 0.9, 0.7, 0.5; FP scores 0.8, 0.6, 0.4
    a = _points_case("A", [(5, 5, 5), (20, 20, 10)],
                     [(5, 5, 5), (30, 30, 15), (20, 21, 10)], [0.9, 0.8, 0.7])
    b = _points_case("B", [(10, 10, 5), (30, 5, 5)],
                     [(10, 10, 6), (2, 30, 15), (35, 35, 2)], [0.5, 0.6, 0.4])
    return [a, b]


def test_froc_constructed_case():
    fr = E.froc(froc_cases())
    assert fr["curve"]["threshold"] == pytest.approx([np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert fr["curve"]["fp_per_patient"] == pytest.approx([0, 0, 0.5, 0.5, 1.0, 1.0, 1.5])
    assert fr["curve"]["sensitivity"] == pytest.approx([0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75])
    # at 1/8, 1/4: only t=0.9 (0 FP) -> 0.25; 1/2 -> 0.5; 1, 2, 4, 8 -> 0.75
    assert fr["sensitivity"] == pytest.approx([0.25, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75])
    assert np.all(np.diff(fr["sensitivity"]) >= 0)
    assert fr["thresholds"][:4] == [0.9, 0.9, 0.7, 0.5]
    assert fr["mean_sensitivity"] == pytest.approx(np.mean(fr["sensitivity"]))


def test_froc_rematches_when_the_nearest_prediction_is_thresholded_out():
    # nearer low-score and farther high-score prediction on one reference
    c = _points_case("A", [(10, 10, 10)], [(10, 10, 11), (10, 10, 13)], [0.2, 0.9])
    fr = E.froc([c])
    assert fr["curve"]["threshold"] == pytest.approx([np.inf, 0.9, 0.2])
    assert fr["curve"]["fp_per_patient"] == pytest.approx([0, 0, 1.0])
    assert fr["curve"]["sensitivity"] == pytest.approx([0, 1.0, 1.0])


def test_froc_sweeps_below_the_operating_threshold():
    # operating threshold 0.5 keeps one of two true lesions; FROC still sees the other
    ref = two_lesions()
    r = E.evaluate_patient(two_lesions(), ref, EYE, {1: 0.9, 2: 0.3}, score_thresh=0.5)
    assert (r.metrics["tp"], r.metrics["fn"]) == (1, 1)
    fr = E.froc([r])
    assert fr["curve"]["threshold"] == pytest.approx([np.inf, 0.9, 0.3])
    assert fr["sensitivity"][-1] == pytest.approx(1.0)  # both found at threshold 0.3
    # explicit candidates (candidates.csv): their centres and scores are what is swept
    _, com = E.lesion_centres(ref, EYE)
    extra = np.vstack([com, [[35.0, 35.0, 2.0]]])
    r2 = E.evaluate_patient(two_lesions(), ref, EYE, {1: 0.9, 2: 0.3}, score_thresh=0.5,
                            candidates=(extra, np.array([0.9, 0.3, 0.2])))
    fr2 = E.froc([r2])
    # the candidates' points, then the operating lesions' (lesion 1 at 0.9)
    assert fr2["curve"]["fp_per_patient"] == pytest.approx([0, 0, 0, 1.0, 0])
    assert fr2["curve"]["sensitivity"] == pytest.approx([0, 0.5, 1.0, 1.0, 0.5])
    assert fr2["curve"]["source"] == ["none"] + ["candidates"] * 3 + ["lesions"]
    with pytest.raises(E.LesionEvalError, match="candidate"):
        E.evaluate_patient(two_lesions(), ref, EYE, candidates=(com, np.ones(3)))


def test_froc_keeps_the_operating_lesions_when_candidates_merge_bleeds():
    """Candidates merged from weak slice instances may join two bleeds into one centre
    between them; the operating lesions found both, and the FROC says so."""
    ref = np.zeros(SHAPE, np.int32)
    ref[10, 10, 10], ref[10, 16, 10] = 1, 2  # 6 mm apart
    pred = np.zeros(SHAPE, np.int32)
    pred[10, 10, 10], pred[10, 16, 10] = 1, 2
    merged = np.array([[10.0, 13.0, 10.0], [30.0, 30.0, 5.0]])  # 3 mm from both; an FP
    r = E.evaluate_patient(pred, ref, EYE, {1: 0.9, 2: 0.8},
                           candidates=(merged, np.array([0.9, 0.1])))
    fr = E.froc([r], fp_rates=(0.5, 1.0))
    assert fr["sensitivity"] == pytest.approx([1.0, 1.0])
    assert fr["thresholds"] == pytest.approx([0.8, 0.8])
    src = dict(zip(fr["curve"]["threshold"], fr["curve"]["source"]))
    assert src[0.1] == "candidates"
    # the candidates alone would give 0.5 at both rates
    cand_only = [(t, f, s) for t, f, s, k in zip(*(fr["curve"][key] for key in (
        "threshold", "fp_per_patient", "sensitivity", "source"))) if k == "candidates"]
    assert max(s for _, f, s in cand_only if f <= 1.0) == pytest.approx(0.5)


def test_cohort_summary_and_report(tmp_path):
    cases = froc_cases()
    res = E.evaluate_cohort(cases)
    m = res.metrics
    assert m["n_patients"] == 2
    assert m["pooled"]["tp"] == 3 and m["pooled"]["fp"] == 3 and m["pooled"]["fn"] == 1
    assert m["pooled"]["fp_per_patient"] == 1.5
    assert m["per_patient"]["sensitivity"]["mean"] == pytest.approx(0.75)
    assert m["per_patient"]["sensitivity"]["sd"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert set(res.matches["status"]) == {"TP", "FP", "FN"}
    assert len(res.matches) == 7
    paths = E.write_report(res, tmp_path)
    data = json.loads(paths["metrics"].read_text())
    assert data["froc"]["sensitivity"][-1] == 0.75
    assert data["count_agreement"]["spearman_rho"] is None  # counts constant -> undefined
    assert paths["froc"].read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(paths["per_patient"])) == 2
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left
    head = E.headline_figures(data)
    at = dict(zip(data["froc"]["fp_rates"], data["froc"]["sensitivity"]))
    assert head["sensitivity_at_1fp"] == at[1.0] and head["sensitivity_at_2fp"] == at[2.0]
    assert head["fp_per_patient"] == 1.5 and head["n_patients"] == 2
    assert head["n_reference_lesions"] == 4
    assert head["recall_mean"] == m["per_patient"]["recall"]["mean"]


# --------------------------------------------------------------------------- the tool


def _save(path, arr, aff):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, aff), str(path))


@pytest.fixture()
def cohort(tmp_path):
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    aff[:3, 3] = [-10, -10, -20]
    rows = []
    for pid in ("P1", "P2"):
        ref = two_lesions().astype(np.int16)
        _save(tmp_path / "data" / pid / "cmb_mask.nii.gz", ref, aff)
        pred = ref.astype(np.int32) if pid == "P1" else cube(ref.astype(np.int32) * 0,
                                                               (30, 30, 2), 2, 1)
        _save(tmp_path / "pred" / pid / "cmb_pred.nii.gz", pred, aff)
        ids = np.unique(pred[pred > 0])
        pd.DataFrame({"lesion_id": ids, "max_score": 0.9}).to_csv(
            tmp_path / "pred" / pid / "lesions.csv", index=False)
        rows.append({"patient_id": pid, "center": "A", "label": "CAA",
                     "swi": f"data/{pid}/swi.nii.gz", "cmb_mask": f"data/{pid}/cmb_mask.nii.gz"})
    rows.append({"patient_id": "P3", "center": "A", "label": "CAA", "swi": "x", "cmb_mask": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path, aff


def _tool():
    path = Path(__file__).resolve().parents[3] / "tools" / "evaluate_lesions.py"
    spec = importlib.util.spec_from_file_location("evaluate_lesions_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_end_to_end(cohort):
    root, _ = cohort
    rc = _tool().main(["--pred", str(root / "pred"), "--manifest", str(root / "manifest.csv"),
                       "--output", str(root / "out")])
    assert rc == 0
    m = json.loads((root / "out" / "metrics.json").read_text())
    assert m["n_patients"] == 2  # P3 has no cmb_mask
    assert m["pooled"] == {"tp": 2, "fp": 1, "fn": 2, "n_ref": 4, "n_pred": 3,
                           "sensitivity": 0.5, "precision": pytest.approx(2 / 3),
                           "f1": pytest.approx(4 / 7), "fp_per_patient": 0.5}
    assert m["per_patient"]["dice"]["mean"] == pytest.approx(0.5)
    assert (root / "out" / "froc.png").is_file()
    assert (root / "out" / "per_patient.csv").is_file()


def test_tool_errors_name_the_file(cohort, caplog):
    root, aff = cohort
    (root / "pred" / "P2" / "cmb_pred.nii.gz").unlink()
    with pytest.raises(E.LesionEvalError, match=r"P2: missing .*P2/cmb_pred\.nii\.gz"):
        E.evaluate_prediction_dir(root / "pred", root / "manifest.csv")
    assert _tool().main(["--pred", str(root / "pred"), "--manifest",
                         str(root / "manifest.csv"), "--output", str(root / "out")]) == 2
    shifted = aff.copy()
    shifted[0, 3] += 1.0
    _save(root / "pred" / "P2" / "cmb_pred.nii.gz", np.zeros(SHAPE, np.int32), shifted)
    with pytest.raises(E.LesionEvalError, match=r"grid mismatch .*P2/cmb_pred\.nii\.gz"):
        E.evaluate_prediction_dir(root / "pred", root / "manifest.csv")


def test_by_reference_size_shows_a_missed_small_and_an_undersegmented_large_lesion():
    aff = np.diag([0.5, 0.5, 2.0, 1.0])  # 0.5 mm3 voxels
    ref = np.zeros(SHAPE, np.int32)
    cube(ref, (5, 5, 5), 2, 1)  # 8 voxels = 4 mm3: diameter 1.97 mm
    cube(ref, (20, 20, 8), 8, 2)  # 512 voxels = 256 mm3: diameter 7.9 mm
    pred = np.zeros(SHAPE, np.int32)
    pred[20:28, 20:28, 10:12] = 1  # the large lesion's middle quarter
    res = E.evaluate_patient(pred, ref, aff)
    np.testing.assert_allclose(res.ref_volume_mm3, [4.0, 256.0])
    np.testing.assert_allclose(res.pred_volume_mm3, [64.0])
    rows = {r["diameter_mm"]: r for r in E.by_reference_size([res])}
    assert list(rows) == ["0-3 mm", "3-5 mm", "5-7 mm", ">= 7 mm"]
    small, large = rows["0-3 mm"], rows[">= 7 mm"]
    assert (small["n_ref"], small["sensitivity"]) == (1, 0.0)
    assert np.isnan(small["lesion_dice"]) and np.isnan(small["volume_ratio"])
    assert (large["n_ref"], large["sensitivity"]) == (1, 1.0)
    assert large["volume_ratio"] == pytest.approx(0.25)
    assert large["lesion_dice"] == pytest.approx(2 * 128 / (512 + 128))
    assert rows["3-5 mm"]["n_ref"] == 0 and np.isnan(rows["3-5 mm"]["sensitivity"])
    cohort = E.evaluate_cohort([res])
    pd.testing.assert_frame_equal(pd.DataFrame(cohort.metrics["by_reference_size"]),
                                  pd.DataFrame(E.by_reference_size([res])))
    fn = cohort.matches[cohort.matches.status == "FN"].iloc[0]
    assert fn.ref_volume_mm3 == pytest.approx(4.0) and np.isnan(fn.pred_volume_mm3)
    tp = cohort.matches[cohort.matches.status == "TP"].iloc[0]
    assert (tp.pred_volume_mm3, tp.ref_volume_mm3) == (64.0, 256.0)
    with pytest.raises(ValueError, match="increase"):
        E.by_reference_size([res], edges_mm=(0.0, 5.0, 3.0))
