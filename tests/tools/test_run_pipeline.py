"""tools/run_pipeline.py: stage skipping / re-running with fake stages, and a tiny end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("run_pipeline_tool",
                                                  REPO / "tools" / "run_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


rp = _load_tool()


class Fake:
    """Three chained fake stages writing files; counts calls; can be told to fail."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []
        self.params = {"a": {"n": 1}, "b": {"k": "x"}, "c": {}}
        self.fail: str | None = None
        self.resumed: dict[str, bool] = {}

    def _run(self, name: str, write_output: bool = True):
        def run(ctx):
            self.calls.append(name)
            self.resumed[name] = ctx.resume
            d = self.root / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "partial.txt").write_text("started")
            if self.fail == name:
                raise RuntimeError(f"boom in {name} reading {d / 'input.txt'}")
            if write_output:
                (d / "out.txt").write_text(name)
            return f"{name} ok"
        return run

    def stages(self, write_c: bool = True):
        r = self.root
        return [
            rp.Stage("a", self._run("a"), lambda: self.params["a"],
                     outputs=(r / "a" / "out.txt",), dirs=(r / "a",)),
            rp.Stage("b", self._run("b"), lambda: self.params["b"], deps=("a",),
                     outputs=(r / "b" / "out.txt",), dirs=(r / "b",)),
            rp.Stage("c", self._run("c", write_c), lambda: self.params["c"], deps=("b",),
                     outputs=(r / "c" / "out.txt",), dirs=(r / "c",)),
        ]

    def run(self, **kw):
        self.calls = []
        return rp.run_stages(self.stages(kw.pop("write_c", True)), self.root / ".state",
                             root=self.root, **kw)


def _status(results):
    return {r.stage: r.status for r in results}


def test_second_run_skips_everything(tmp_path):
    f = Fake(tmp_path)
    res = f.run()
    assert _status(res) == {"a": "ran", "b": "ran", "c": "ran"}
    assert f.calls == ["a", "b", "c"]
    stamp = json.loads((tmp_path / ".state" / "b.json").read_text())
    assert stamp["params"] == {"k": "x"} and set(stamp["upstream"]) == {"a"}
    res = f.run()
    assert f.calls == []
    assert _status(res) == {"a": "up to date", "b": "up to date", "c": "up to date"}
    assert all(r.built_seconds is not None for r in res)
    assert "b ok" in rp.format_summary(res)


def test_parameter_change_reruns_the_stage_and_everything_downstream(tmp_path):
    f = Fake(tmp_path)
    f.run()
    f.params["b"] = {"k": "y"}
    res = f.run()
    assert f.calls == ["b", "c"]
    assert _status(res)["a"] == "up to date"
    stamp = json.loads((tmp_path / ".state" / "b.json").read_text())
    assert "parameters changed: k" in stamp["reason"]
    assert "upstream re-ran: b" in json.loads((tmp_path / ".state" / "c.json").read_text())[
        "reason"]


def test_force_and_stop_after_and_missing_output(tmp_path):
    f = Fake(tmp_path)
    res = f.run(stop_after="b")
    assert f.calls == ["a", "b"] and _status(res)["c"] == "not run"
    res = f.run(force=["b"])
    assert f.calls == ["b", "c"]
    (tmp_path / "a" / "out.txt").unlink()
    f.run()
    assert f.calls == ["a", "b", "c"]  # a rebuilt -> new token -> b, c re-run
    f.run(force=["all"])
    assert f.calls == ["a", "b", "c"]


def test_failed_stage_is_not_marked_done_and_resumes(tmp_path):
    f = Fake(tmp_path)
    f.fail = "b"
    res = f.run()
    assert _status(res) == {"a": "ran", "b": "failed", "c": "not run"}
    failed = res[1]
    assert "stage 'b' failed" in failed.error and "input.txt" in failed.error
    assert not (tmp_path / ".state" / "b.json").exists()
    assert (tmp_path / ".state" / "b.running.json").exists()
    assert (tmp_path / "b" / "partial.txt").exists()  # partial outputs left, unmarked
    f.fail = None
    res = f.run()
    assert f.calls == ["b", "c"] and f.resumed["b"] is True  # same inputs: resumed
    assert (tmp_path / "b" / "partial.txt").exists()
    assert not (tmp_path / ".state" / "b.running.json").exists()
    # a failed attempt followed by a parameter change starts afresh (folder cleared)
    f.fail = "b"
    f.params["b"] = {"k": "z"}
    f.run()
    f.fail = None
    f.params["b"] = {"k": "w"}
    f.run()
    assert f.resumed["b"] is False


def test_stage_without_its_outputs_fails(tmp_path):
    f = Fake(tmp_path)
    res = f.run(write_c=False)
    assert res[-1].status == "failed" and "out.txt" in res[-1].error
    assert not (tmp_path / ".state" / "c.json").exists()


def test_bad_stage_graph_and_clearing_outside_root(tmp_path):
    st = rp.Stage("x", lambda ctx: None, deps=("y",))
    with pytest.raises(ValueError, match="depends on"):
        rp.run_stages([st], tmp_path / "s")
    with pytest.raises(ValueError, match="unknown stage"):
        rp.run_stages([rp.Stage("x", lambda ctx: None)], tmp_path / "s", force=["nope"])
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    res = rp.run_stages([rp.Stage("x", lambda ctx: None, dirs=(outside,))], tmp_path / "s",
                        root=tmp_path / "run")
    assert res[0].status == "failed" and "refusing" in res[0].error
    assert outside.is_dir()


def test_parameter_error_names_the_stage(tmp_path):
    def bad():
        raise FileNotFoundError("weights /x/model.pth not found")

    res = rp.run_stages([rp.Stage("train", lambda ctx: None, bad)], tmp_path / "s")
    assert res[0].status == "failed" and "train" in res[0].error and "/x/model.pth" in \
        res[0].error


def test_cli_rejects_inconsistent_flags(capsys):
    with pytest.raises(SystemExit) as e:
        rp.main(["--skip-train", "--output", "/tmp/never"])
    assert e.value.code == 2
    assert "--weights" in capsys.readouterr().err


def test_train_procs_reach_train_net_and_the_train_stamp(tmp_path, capsys):
    args = rp.build_parser().parse_args(["--output", str(tmp_path)])
    assert args.train_procs == 2
    demo = rp.Demo(args)
    assert demo.train_procs() == 2 and demo.train_params()["cpu_procs"] == 2
    # One process: the stamp is what it was before data-parallel CPU training existed.
    one = rp.Demo(rp.build_parser().parse_args(["--output", str(tmp_path), "--train-procs",
                                                "1"]))
    assert one.train_procs() == 1 and "cpu_procs" not in one.train_params()
    # A GPU config trains in one process here (--num-gpus is train_net's business).
    gpu = rp.Demo(rp.build_parser().parse_args(["--output", str(tmp_path), "--",
                                                "MODEL.DEVICE", "cuda"]))
    gpu.args.opts = gpu.args.opts[1:]
    assert gpu.train_procs() == 1
    with pytest.raises(SystemExit) as e:
        rp.main(["--train-procs", "0", "--output", str(tmp_path / "never")])
    assert e.value.code == 2 and "--train-procs" in capsys.readouterr().err


def test_mil_config_takes_workers_from_the_run(tmp_path):
    args = rp.build_parser().parse_args(["--output", str(tmp_path), "--workers", "3"])
    cfg = rp.Demo(args).mil_cfg()
    assert cfg.workers == 3 and cfg.num_threads == 1 and cfg.ensemble_size == 3
    args = rp.build_parser().parse_args(["--output", str(tmp_path), "--workers", "3",
                                         "--mil-opt", "workers=1"])
    assert rp.Demo(args).mil_cfg().workers == 1
    # Processes and threads do not change the models: they are not stage parameters.
    params = rp.Demo(args).mil_params()
    assert "workers" not in params and "num_threads" not in params
    assert params["ensemble_size"] == 3
    own = tmp_path / "mil.yaml"
    own.write_text("workers: 2\nensemble_size: 1\n")
    args = rp.build_parser().parse_args(["--output", str(tmp_path), "--workers", "4",
                                         "--mil-config", str(own)])
    assert rp.Demo(args).mil_cfg().workers == 2


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    """3 patients per class, 2 training iterations (instant config), a short MIL; then a
    re-run skips every stage and predict_patient works on the run. (val_fraction=0: with
    3 training patients per fold an inner validation split would hold a single class.)"""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, str(REPO / "tools" / "run_pipeline.py"), "--output", str(out),
           "--patients-per-class", "3", "--workers", "2",
           "--config-file", "configs/quick_schedules/cmb_R_18_FPN_instant_test.yaml",
           "--mil-config", "configs/mil/quick_test.yaml",
           "--mil-opt", "max_epochs=2", "--mil-opt", "min_epochs=1", "--mil-opt", "n_folds=2",
           "--mil-opt", "val_fraction=0", "--mil-opt", "n_bootstrap=50", "--n-overlays", "1",
           "CMB.TARGET_SPACING", "1.0", "SOLVER.MAX_ITER", "2", "CMB.INFER.SCORE_THRESH", "0.3",
           "CMB.INFER.CANDIDATE_THRESH", "0.05",
           "TEST.DETECTIONS_PER_IMAGE", "10", "DATALOADER.NUM_WORKERS", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rel in ("cohort/manifest.csv", "coco/splits.json", "train/model_final.pth",
                "train/config.yaml", "predict/lesions_all.csv",
                "lesions/external/metrics.json", "lesions/development/metrics.json",
                "bags/index.csv", "mil/metrics.json", "mil/model/model.pth", "report.md",
                "metrics.json", "figures/froc.png", "figures/glass_brain_detected.png"):
        assert (out / rel).exists(), rel
    # FROC candidates go below the operating threshold (the predict workers must not
    # raise the ROI filter back to it)
    cands = pd.concat([pd.read_csv(p) for p in sorted((out / "predict").glob("*/candidates.csv"))])
    lesions = pd.read_csv(out / "predict" / "lesions_all.csv")
    n_patients = len(pd.read_csv(out / "cohort" / "manifest.csv"))
    assert len(list((out / "predict").glob("*/candidates.csv"))) == n_patients
    assert (lesions["max_score"] >= 0.3).all()
    assert len(cands) and (cands["max_score"] >= 0.05).all() and (cands["max_score"] < 0.3).any()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == list(rp.STAGES)
    assert all(s["status"] == "ran" for s in metrics["stages"])
    assert "Stage summary" in proc.stdout
    report = (out / "report.md").read_text()
    assert "0.627 ± 0.296" in report and "0.908" in report and "report" in report
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((out / ".pipeline" / "last_run.json").read_text())
    assert {s["status"] for s in last["stages"]} == {"up to date"}
    # a new, unlabelled patient from a scanner profile never used in training
    gen = subprocess.run([sys.executable, str(REPO / "datasets" / "prepare_synthetic.py"),
                          "--out", str(tmp_path / "newD"), "--center-profile",
                          str(REPO / "configs" / "centers" / "example_1p5t.yaml"),
                          "--patients-per-class", "1", "--quiet"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    pid = pd.read_csv(tmp_path / "newD" / "manifest.csv")["patient_id"].iloc[0]
    pp = subprocess.run([sys.executable, str(REPO / "tools" / "predict_patient.py"), "--run",
                         str(out), "--swi", str(tmp_path / "newD" / pid / "swi.nii.gz"),
                         "--output", str(tmp_path / "new")],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert pp.returncode == 0, pp.stderr[-3000:]
    for name in ("cmb_pred.nii.gz", "lesions.csv", "census.csv", "csvd.json", "overlay.png"):
        assert (tmp_path / "new" / pid / name).is_file(), name


# ============================================================================ predict_patient


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


PHANTOM_SHAPE = (40, 48, 12)
FOCI = ((14, 20, 5), (26, 30, 7))  # RAS voxels of two dark foci


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder: instant-config detector with fresh weights, and a MIL model fitted
    for one epoch on synthetic bags."""
    import dataclasses

    import detection  # noqa: F401
    from detection.engine import setup_cfg

    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from mil.bagio import read_index
    from mil.dataset import load_patient_bags
    from mil.model import MILEnsemble, save_checkpoint
    from mil.synthetic_bags import write_synthetic_bags
    from mil.train import fit_model, load_config

    root = tmp_path_factory.mktemp("run")
    cfg = setup_cfg(REPO / "configs/quick_schedules/cmb_R_18_FPN_instant_test.yaml",
                    ["CMB.DATA_ROOT", "/nonexistent", "CMB.TARGET_SPACING", "1.0"])
    torch.manual_seed(0)
    (root / "train").mkdir()
    DetectionCheckpointer(build_model(cfg), save_dir=str(root / "train")).save("model_final")
    (root / "train" / "config.yaml").write_text(cfg.dump())
    index = write_synthetic_bags(root / "synth", {"A": 9}, centers=("A",), seed=0,
                                 crop_size=16)
    mcfg = load_config(REPO / "configs/mil/quick_test.yaml", {"max_epochs": 1})
    bags = load_patient_bags(read_index(index))
    # A two-member seed ensemble, as configs/mil/gated_attention.yaml trains.
    members = [fit_model(bags, None, mcfg, epochs=1, seed=s).model for s in (0, 1)]
    save_checkpoint(MILEnsemble(members), root / "mil" / "model",
                    {"config": dataclasses.asdict(mcfg)})
    return root


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """SWI with two dark foci in a bright 'brain', LPS-like affine, plus its brain mask."""
    d = tmp_path_factory.mktemp("phantom")
    rng = np.random.default_rng(0)
    data = rng.normal(100, 4, PHANTOM_SHAPE).astype(np.float32)
    brain = np.zeros(PHANTOM_SHAPE, np.uint8)
    brain[5:35, 6:42, 1:11] = 1
    data[brain > 0] += 60
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [20, -24, -12]
    for i, j, k in FOCI:  # RAS voxel (i, j, k) = stored voxel (X-1-i, j, k)
        data[PHANTOM_SHAPE[0] - 1 - i - 1:PHANTOM_SHAPE[0] - 1 - i + 2, j - 1:j + 2, k] = 5
    nib.save(nib.Nifti1Image(data, affine), d / "swi.nii.gz")
    nib.save(nib.Nifti1Image(brain, affine), d / "brain.nii.gz")
    return d


def _fake_passes(self, prep, slices=None, progress=False):
    """Slice instances at the phantom's foci (image layout: rows anterior->posterior), one
    pass."""
    h, w = prep.images.shape[1:]
    out = []
    for n, (i, j, k) in enumerate(FOCI):
        m = np.zeros((h, w), bool)
        r = PHANTOM_SHAPE[1] - 1 - j
        m[r - 1:r + 2, i - 1:i + 2] = True
        out.append((k, ([m], np.array([0.9 - 0.1 * n])), None))
    return out


def test_predict_patient_writes_every_output(tiny_run, phantom, tmp_path, monkeypatch):
    import detection.inference

    pp = _load("predict_patient")
    monkeypatch.setattr(detection.inference.VolumePredictor, "detect_passes", _fake_passes)
    out = tmp_path / "out"
    rc = pp.main(["--run", str(tiny_run), "--swi", str(phantom / "swi.nii.gz"),
                  "--brain-mask", str(phantom / "brain.nii.gz"), "--age", "70",
                  "--patient-id", "P1", "--output", str(out), "--top-k", "1"])
    assert rc == 0
    p = out / "P1"
    for name in ("cmb_pred.nii.gz", "lesions.csv", "rejected.csv", "census.csv", "csvd.json",
                 "csvd.csv", "attention.csv", "bag.npz", "overlay.png"):
        assert (p / name).is_file(), name
    src, img = nib.load(phantom / "swi.nii.gz"), nib.load(p / "cmb_pred.nii.gz")
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    lab = np.asarray(img.dataobj)
    for i, j, k in FOCI:  # found where the foci are, in the stored (x-flipped) grid
        assert lab[PHANTOM_SHAPE[0] - 1 - i, j, k] > 0
    lesions = pd.read_csv(p / "lesions.csv")
    assert len(lesions) == 2
    census = pd.read_csv(p / "census.csv")
    assert census.loc[census["level"] == "total", "n_lesions"].item() == 2
    assert census.loc[census["level"] == "region", "n_lesions"].sum() == 2
    res = json.loads((p / "csvd.json").read_text())
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert res["predicted_class"] in ("aSVD", "CAA", "CADASIL")
    # The run's MIL is a two-member ensemble: the call is the members' mean probability.
    from mil import CLASSES
    from mil.bagio import load_bag
    from mil.dataset import PatientBag
    from mil.model import load_checkpoint
    from mil.train import predict

    ens, _ = load_checkpoint(tiny_run / "mil" / "model")
    pb = PatientBag("P1", "new", -1, 70.0, load_bag(p / "bag.npz"))
    mean_p = np.mean([predict(m, [pb])[0][0] for m in ens.members], axis=0)
    assert [res["probabilities"][c] for c in CLASSES] == pytest.approx(mean_p, abs=1e-5)
    assert res["rule_based_baseline"]["reason"]
    assert len(res["top_lesions"]) == 1
    top = res["top_lesions"][0]
    assert top["lesion_id"] in set(lesions["lesion_id"]) and top["region"]
    att = pd.read_csv(p / "attention.csv")
    assert att["attention"].sum() == pytest.approx(1.0, abs=1e-4)
    assert list(att["rank"]) == [1, 2] and att["attention"].is_monotonic_decreasing
    row = pd.read_csv(out / "predictions.csv").iloc[0]
    assert row["patient_id"] == "P1" and row["n_lesions"] == 2


def test_predict_patient_no_lesion_and_manifest(tiny_run, phantom, tmp_path):
    pp = _load("predict_patient")
    man = tmp_path / "m.csv"
    pd.DataFrame([{"patient_id": "Q1", "swi": str(phantom / "swi.nii.gz"),
                   "brain_mask": str(phantom / "brain.nii.gz")}]).to_csv(man, index=False)
    rc = pp.main(["--run", str(tiny_run), "--manifest", str(man), "--output",
                  str(tmp_path / "o"), "CMB.INFER.SCORE_THRESH", "0.999"])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "Q1" / "csvd.json").read_text())
    assert res["n_lesions"] == 0 and res["top_lesions"] == [] and res["age"] is None
    assert (tmp_path / "o" / "Q1" / "overlay.png").is_file()


def test_predict_patient_names_missing_run_files(tmp_path, phantom, caplog):
    pp = _load("predict_patient")
    rc = pp.main(["--run", str(tmp_path / "nope"), "--swi", str(phantom / "swi.nii.gz"),
                  "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "model_final.pth" in caplog.text and "mil" in caplog.text
