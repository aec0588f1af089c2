"""Tests of the synthetic multi-centre SWI cohort (detection/data/synthetic.py)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

from detection.data import synthetic as S

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
MARS = REPO.parent / "shared" / "data" / "mars_atlas" / "MARS_scale_parcellation_map_mni.nii.gz"

# A coarse grid keeps rendering tests fast; everything else is the real pipeline.
TINY = S.CenterProfile(name="T", inplane_mm=2.0, slice_mm=3.0, matrix=(84, 100, 48), snr=20.0,
                       tilt_deg=8.0, role="development")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def template() -> S.Template:
    return S.get_template()


@pytest.fixture(scope="module")
def planned(template: S.Template) -> list[S.PatientPlan]:
    """A 60-patient cohort (20 per class over A, B, C), planned without rendering."""
    centers = [S.BUILTIN_CENTERS[c] for c in "ABC"]
    specs = S.cohort_specs(20, centers, seed=11)
    return [S.plan_patient(s, S.BUILTIN_CENTERS[s.center], template) for s in specs]


@pytest.fixture(scope="module")
def real_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One patient per class at the built-in centres' real resolution."""
    out = tmp_path_factory.mktemp("real")
    return S.generate_cohort(out, patients_per_class=1, centers=("A", "B", "C"), seed=5)


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return S.generate_cohort(out, patients_per_class=2, centers=(TINY,), seed=21, workers=2)


# ----------------------------------------------------------------------------- contract
def test_manifest_and_files_follow_contract(real_cohort: Path) -> None:
    root = real_cohort.parent
    rows = _read_csv(real_cohort)
    assert list(rows[0])[:6] == ["patient_id", "center", "label", "swi", "cmb_mask", "age"]
    assert len(rows) == 3 and len({r["patient_id"] for r in rows}) == 3
    assert sorted(r["label"] for r in rows) == sorted(S.CLASSES)
    assert {r["center"] for r in rows} == {"A", "B", "C"}
    lesions = _read_csv(root / "lesions_gt.csv")
    assert list(lesions[0])[:8] == ["patient_id", "lesion_id", "region", "subregion",
                                    "diameter_mm", "x_mm", "y_mm", "z_mm"]
    for r in rows:
        prof = S.BUILTIN_CENTERS[r["center"]]
        swi = nib.load(str(root / r["swi"]))
        cmb = nib.load(str(root / r["cmb_mask"]))
        brain = nib.load(str(root / r["brain_mask"]))
        mimic = nib.load(str(root / r["mimic_mask"]))
        assert swi.get_data_dtype() == np.float32
        assert cmb.get_data_dtype() == np.int16
        assert brain.get_data_dtype() == np.uint8
        assert 40 <= float(r["age"]) <= 92
        # same grid and affine; RAS with the profile's spacing and matrix
        for img in (cmb, brain, mimic):
            assert img.shape == swi.shape
            np.testing.assert_allclose(img.affine, swi.affine, atol=1e-5)
        assert swi.shape == prof.matrix
        assert nib.aff2axcodes(swi.affine) == ("R", "A", "S")
        np.testing.assert_allclose(swi.header.get_zooms(), prof.spacing, atol=1e-4)
        tilt = math.degrees(math.atan2(swi.affine[1, 2], swi.affine[2, 2]))
        assert abs(-tilt - prof.tilt_deg) < 8  # slice tilt about x (+ positioning jitter)
        m = np.asarray(cmb.dataobj)
        b = np.asarray(brain.dataobj)
        assert not np.any((m > 0) & (b == 0)), "CMB voxels outside the brain mask"
        x = np.asarray(swi.dataobj)
        assert np.isfinite(x).all() and x.min() >= 0
        # lesions_gt rows <-> instance ids, and each world centre lies on its lesion
        mine = [le for le in lesions if le["patient_id"] == r["patient_id"]]
        assert sorted(int(le["lesion_id"]) for le in mine) == sorted(set(np.unique(m)) - {0})
        assert int(r["n_cmb"]) == len(mine)
        inv = np.linalg.inv(swi.affine)
        for le in mine:
            v = inv[:3, :3] @ [float(le["x_mm"]), float(le["y_mm"]), float(le["z_mm"])]
            v = np.rint(v + inv[:3, 3]).astype(int)
            nb = m[tuple(slice(max(c - 1, 0), c + 2) for c in v)]
            assert int(le["lesion_id"]) in nb
            assert S.SUBREGIONS[le["subregion"]] == le["region"]
            if int(le["lesion_id"]) in m[tuple(v)].ravel():
                # darker than the brain at the lesion centre (hypointense focus)
                assert x[tuple(v)] < np.median(x[b > 0])
    # nothing half-written left behind
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]
    meta = json.loads((root / "cohort.json").read_text())
    assert meta["seed"] == 5 and set(meta["class_distributions"]) == set(S.CLASSES)


def test_mimics_never_overlap_cmb_mask(real_cohort: Path, tiny_cohort: Path) -> None:
    n_vein = 0
    for manifest in (real_cohort, tiny_cohort):
        for r in _read_csv(manifest):
            m = np.asarray(nib.load(str(manifest.parent / r["cmb_mask"])).dataobj)
            mim = np.asarray(nib.load(str(manifest.parent / r["mimic_mask"])).dataobj)
            assert not np.any((m > 0) & (mim > 0))
            veins = mim == S.MIMIC_CODES["vein"]
            assert veins.sum() > 200  # every patient has veins ...
            # ... tubular and continuous over many slices
            zs = np.flatnonzero(veins.any(axis=(0, 1)))
            assert zs.max() - zs.min() >= 10
            n_vein += 1
    assert n_vein == 9


def test_lesion_masks_are_separate_instances(tiny_cohort: Path) -> None:
    from scipy import ndimage as ndi

    for r in _read_csv(tiny_cohort):
        m = np.asarray(nib.load(str(tiny_cohort.parent / r["cmb_mask"])).dataobj)
        comp, n_comp = ndi.label(m > 0, structure=np.ones((3, 3, 3)))
        # instances do not touch one another (26-connectivity): one id per component
        for c in range(1, n_comp + 1):
            assert len(np.unique(m[comp == c])) == 1
        assert n_comp >= len(set(np.unique(m)) - {0})


# ------------------------------------------------------------------------- determinism
def test_deterministic_for_seed_and_workers(tiny_cohort: Path, tmp_path: Path) -> None:
    # same seed: identical output (here even with 1 worker instead of 2)
    again = S.generate_cohort(tmp_path / "again", patients_per_class=2, centers=(TINY,),
                              seed=21, workers=1)
    assert (tiny_cohort.read_text() == again.read_text())
    assert ((tiny_cohort.parent / "lesions_gt.csv").read_text()
            == (again.parent / "lesions_gt.csv").read_text())
    for r in _read_csv(tiny_cohort):
        for key in ("swi", "cmb_mask", "brain_mask", "mimic_mask"):
            a = nib.load(str(tiny_cohort.parent / r[key]))
            b = nib.load(str(again.parent / r[key]))
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
    # a different seed gives a different cohort
    other = S.cohort_specs(3, [TINY], seed=22)
    p0 = S.plan_patient(S.cohort_specs(3, [TINY], seed=21)[0], TINY)
    p1 = S.plan_patient(other[0], TINY)
    assert not np.allclose(p0.geometry.def_coef, p1.geometry.def_coef)


def test_plan_and_render_are_repeatable_in_memory(template: S.Template) -> None:
    spec = S.cohort_specs(1, [TINY], seed=3)[1]
    a = S.render_patient(S.plan_patient(spec, TINY, template), template)
    b = S.render_patient(S.plan_patient(spec, TINY, template), template)
    np.testing.assert_array_equal(a.swi, b.swi)
    np.testing.assert_array_equal(a.cmb_mask, b.cmb_mask)


def test_geometry_inverse_and_brains_differ(planned: list[S.PatientPlan]) -> None:
    rng = np.random.default_rng(0)
    m = rng.uniform(-60, 60, (500, 3))
    geo = planned[0].geometry
    np.testing.assert_allclose(geo.world_to_template(geo.template_to_world(m)), m, atol=1e-3)
    # every patient has its own deformation / pose
    coefs = np.stack([p.geometry.def_coef.ravel() for p in planned[:10]])
    assert len({tuple(np.round(c, 6)) for c in coefs}) == 10
    disp = np.abs(geo.displacement(m)).max()
    assert 0.5 < disp < 15


# ------------------------------------------------------------------------ distributions
def _truncated_lognormal_share(lo: float, hi: float) -> float:
    s = S.LESION_SIZE

    def cdf(d: float) -> float:
        return 0.5 * (1 + math.erf(math.log(d / s["median_mm"]) / (s["sigma"] * math.sqrt(2))))

    return (cdf(hi) - cdf(lo)) / (cdf(s["max_mm"]) - cdf(s["min_mm"]))


def _expected_group_share(label: str, pattern: str) -> dict[str, float]:
    """Per-lesion MARS group shares of one pattern, from the distribution table."""
    w = S.CLASS_DISTRIBUTIONS[label].subregion_weights[pattern]
    out: Counter = Counter()
    for sub, v in w.items():
        out[S.SUBREGIONS[sub]] += v / sum(w.values())
    return dict(out)


def test_cohort_of_60_matches_configured_distributions(
        planned: list[S.PatientPlan], template: S.Template) -> None:
    assert len(planned) >= 60
    lesions = [le for p in planned for le in p.lesions]
    # (almost) every sampled CMB found room in its region
    assert len(lesions) >= 0.97 * sum(p.n_requested for p in planned)
    d = np.array([le.diameter_mm for le in lesions])
    assert d.min() >= 2.0 and d.max() <= 10.0
    # mostly 2-5 mm: observed share within 0.05 of the configured truncated lognormal
    expected_small = _truncated_lognormal_share(2.0, 5.0)
    assert 0.75 < expected_small < 0.95
    assert abs((d <= 5.0).mean() - expected_small) < 0.05
    assert abs(np.median(d) - S.LESION_SIZE["median_mm"]) < 0.35

    report = {}
    by_class = {lab: [p for p in planned if p.spec.label == lab] for lab in S.CLASSES}
    for lab, plans in by_class.items():
        assert len(plans) == 20
        les = [le for p in plans for le in p.lesions]
        n = len(les)
        groups = Counter(le.region for le in les)
        share = {g: groups[g] / n for g in S.REGIONS}
        report[lab] = {"n_lesions": n, **{g: round(v, 3) for g, v in share.items()}}
        dist = S.CLASS_DISTRIBUTIONS[lab]
        # pattern frequencies (per patient) within 3 binomial SDs + 0.05 of the table
        pat = Counter(p.pattern for p in plans)
        for name, prob in dist.patterns.items():
            sd = math.sqrt(prob * (1 - prob) / len(plans))
            assert abs(pat[name] / len(plans) - prob) <= 3 * sd + 0.05, (lab, pat)
        # given the pattern, lesion locations are i.i.d.: pooled group shares within
        # 4 binomial SDs + 0.05 of the table (+ 0.1 for the mixed pattern, whose rule
        # "at least one lobar and one deep" shifts small patients)
        for name in dist.patterns:
            les_p = [le for p in plans if p.pattern == name for le in p.lesions]
            if len(les_p) < 10:
                continue
            got = Counter(le.region for le in les_p)
            exp = _expected_group_share(lab, name)
            for g in S.REGIONS:
                e = exp.get(g, 0.0)
                tol = 4 * math.sqrt(e * (1 - e) / len(les_p)) + 0.05
                tol += 0.1 if name == "mixed" else 0.0
                assert abs(got[g] / len(les_p) - e) <= tol, (lab, name, g, got, exp)
        # the task must stay hard: some patients of every class have 0 or 1 CMB
        few = sum(p.n_cmb <= 1 for p in plans)
        p_few = dist.p_zero + dist.p_one
        assert few >= 1
        assert abs(few / len(plans) - p_few) <= 3 * math.sqrt(p_few * (1 - p_few) / len(plans))
        ages = [p.age for p in plans]
        assert dist.age_min <= min(ages) and max(ages) <= dist.age_max
        report[lab]["mean_age"] = round(float(np.mean(ages)), 1)
    print("per-class MARS group shares:", report)

    caa = [le for p in by_class["CAA"] for le in p.lesions]
    assert {le.region for le in caa} == {"lobar"}  # strictly lobar
    sub = Counter(le.subregion for le in caa)
    posterior = (sub["occipital"] + sub["parietal"] + sub["temporal"]) / len(caa)
    assert abs(posterior - 0.80) < 0.1 and posterior > 3 * sub["frontal"] / len(caa)
    # aSVD: deep / infratentorial, with a mixed share that also has lobar CMBs
    asvd = [p for p in by_class["aSVD"] if p.n_cmb >= 2]
    patterns = Counter(S._pattern_of(p.lesions) for p in asvd)
    assert patterns["mixed"] >= 3 and patterns["deep_infratentorial"] >= 3
    assert patterns["strictly_lobar"] == 0
    # CADASIL: thalamus, brainstem, temporal dominate; larger zero share; younger
    cad = [le for p in by_class["CADASIL"] for le in p.lesions]
    sc = Counter(le.subregion for le in cad)
    assert (sc["thalamus"] + sc["brainstem"] + sc["temporal"]) / len(cad) > 0.4
    zero = {lab: sum(p.n_cmb == 0 for p in plans) for lab, plans in by_class.items()}
    assert zero["CADASIL"] > max(zero["CAA"], zero["aSVD"])
    mean_age = {lab: np.mean([p.age for p in plans]) for lab, plans in by_class.items()}
    assert mean_age["CAA"] > mean_age["aSVD"] > mean_age["CADASIL"]
    # heavy-tailed CAA counts
    counts = np.array([p.n_cmb for p in by_class["CAA"]])
    assert counts.max() > 3 * np.median(counts)
    # every lesion lies in the template region it is labelled with
    for p in planned[:20]:
        if not p.lesions:
            continue
        m = p.geometry.world_to_template(np.stack([le.centre for le in p.lesions]))
        codes = template.lookup(template.region, m)
        names = [S._SUB_NAMES[c - 1] for c in codes]
        assert names == [le.subregion for le in p.lesions]
    # siderosis only outside the CMB model, in a share of CAA patients
    assert sum(p.siderosis for p in by_class["CAA"]) >= 3


def test_classes_balanced_over_centres() -> None:
    centers = [S.BUILTIN_CENTERS[c] for c in "ABC"]
    specs = S.cohort_specs(30, centers, seed=0)
    assert len(specs) == 90
    tab = Counter((s.center, s.label) for s in specs)
    assert set(tab.values()) == {10}
    assert len({s.patient_id for s in specs}) == 90
    # an id does not give away its class (the order within a centre is shuffled)
    labels_a = [s.label for s in specs if s.center == "A"]
    assert labels_a != sorted(labels_a)


# ---------------------------------------------------------------------- centre profiles
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_center_profile_round_trip(tmp_path: Path, suffix: str) -> None:
    prof = S.BUILTIN_CENTERS["C"]
    path = S.save_center_profile(prof, tmp_path / f"c{suffix}")
    assert S.load_center_profile(path) == prof
    custom = S.CenterProfile(name="my-scanner_2", inplane_mm=0.7, slice_mm=1.5,
                             matrix=(256, 288, 96), snr=30, tilt_deg=-5)
    back = S.load_center_profile(S.save_center_profile(custom, tmp_path / f"m{suffix}"))
    assert back == custom and back.spacing == (0.7, 0.7, 1.5)
    assert S.resolve_centers(None, [tmp_path / f"m{suffix}"]) == [custom]
    assert [p.name for p in S.resolve_centers(["A", "my-scanner_2"],
                                              [tmp_path / f"m{suffix}"])] == ["A",
                                                                              "my-scanner_2"]


def test_example_profile_file_is_valid(repo_root: Path) -> None:
    for path in sorted((repo_root / "configs" / "centers").glob("*.yaml")):
        prof = S.load_center_profile(path)
        assert prof.name not in S.BUILTIN_CENTERS


@pytest.mark.parametrize(("text", "field"), [
    ("name: X\ninplane_mm: 0.9\nslice_mm: thick\nmatrix: [10, 10, 10]\nsnr: 20\n", "slice_mm"),
    ("name: X\ninplane_mm: 0.9\nslice_mm: 2\nmatrix: [192, 224]\nsnr: 20\n", "matrix"),
    ("name: X\ninplane_mm: 0.9\nslice_mm: 2\nmatrix: [192, 224, 60]\n", "snr"),
    ("name: X\ninplane_mm: -1\nslice_mm: 2\nmatrix: [192, 224, 60]\nsnr: 20\n", "inplane_mm"),
    ("name: X\ninplane_mm: 1\nslice_mm: 2\nmatrix: [192, 224, 60]\nsnr: 20\nsnrr: 3\n",
     "snrr"),
    ("name: X\ninplane_mm: 1\nslice_mm: 2\nmatrix: [192, 224, 60]\nsnr: 20\nrole: test\n",
     "role"),
    ("name: ''\ninplane_mm: 1\nslice_mm: 2\nmatrix: [192, 224, 60]\nsnr: 20\n", "name"),
])
def test_malformed_profile_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad_centre.yaml"
    path.write_text(text)
    with pytest.raises(S.CenterProfileError) as exc:
        S.load_center_profile(path)
    msg = str(exc.value)
    assert "bad_centre.yaml" in msg and f"'{field}'" in msg


def test_unparseable_and_unknown_centre(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(S.CenterProfileError, match="broken.json"):
        S.load_center_profile(path)
    with pytest.raises(S.CenterProfileError, match="unknown centre 'Z'"):
        S.resolve_centers(["A", "Z"])


# --------------------------------------------------------------------------------- MARS
def test_region_map_agrees_with_mars_atlas() -> None:
    if not MARS.is_file():
        pytest.skip("../shared/data/mars_atlas is not present")
    agree = S.mars_agreement(MARS)
    print("MARS agreement:", json.dumps({k: round(v, 3) for k, v in agree.items()}))
    assert agree["group_accuracy"] > 0.85
    assert agree["dice_lobar"] > 0.85 and agree["dice_infratentorial"] > 0.9
    assert agree["dice_deep"] > 0.7
    assert agree["subregion_accuracy"] > 0.7


# ---------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_command_line_with_profile_and_preview(tmp_path: Path) -> None:
    prof = tmp_path / "tiny.yaml"
    S.save_center_profile(TINY, prof)
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, str(REPO / "datasets" / "prepare_synthetic.py"), "--out", str(out),
         "--patients-per-class", "1", "--center-profile", str(prof), "--seed", "2",
         "--workers", "1", "--preview", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    rows = _read_csv(out / "manifest.csv")
    assert [r["center"] for r in rows] == ["T"] * 3
    png = out / "preview.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: X\ninplane_mm: 1\n")
    res = subprocess.run(
        [sys.executable, str(REPO / "datasets" / "prepare_synthetic.py"), "--out",
         str(tmp_path / "x"), "--center-profile", str(bad)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2 and "bad.yaml" in res.stderr and "'slice_mm'" in res.stderr


def test_library_imports_no_detectron2_torch_or_nilearn() -> None:
    code = ("import sys; import detection.data.synthetic; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('detectron2', 'torch', 'torchvision', 'nilearn', 'matplotlib')); "
            "sys.exit(str(bad) if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr + proc.stdout
