"""CPU data-parallel training: process group, gradient averaging, Trainer in 2 processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import detection  # noqa: F401
from detection.distributed import ddp_for, launch_cpu

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
INSTANT = REPO / "configs" / "quick_schedules" / "cmb_R_18_FPN_instant_test.yaml"


def _grad_worker(out_dir: str) -> None:
    """Each rank: one backward pass of a fixed linear model on its own data."""
    import detectron2.utils.comm as comm

    rank = comm.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    ddp = ddp_for(model)
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    x = torch.full((2, 3), float(rank + 1))
    ddp(x).sum().backward()
    info = {"rank": rank, "world": comm.get_world_size(), "local_rank": comm.get_local_rank(),
            "grad": model.weight.grad.tolist(), "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS")}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(info))


def test_launch_cpu_averages_gradients_over_processes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launch_cpu(_grad_worker, 2, args=(str(tmp_path),))
    assert "OMP_NUM_THREADS" not in os.environ  # only the children got one thread each
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1]
    assert [i["local_rank"] for i in infos] == [0, 1]
    assert all(i["world"] == 2 for i in infos)
    assert all(i["threads"] == 1 and i["omp"] == "1" for i in infos)
    # d/dW sum(W x) over 2 rows = 2 * x; ranks had x = 1 and x = 2: the mean is 3.
    for info in infos:
        np.testing.assert_allclose(info["grad"], [[3.0, 3.0, 3.0]])


def test_single_process_needs_no_group() -> None:
    model = torch.nn.Linear(2, 2)
    assert ddp_for(model) is model
    assert launch_cpu(lambda a, b: a + b, 1, args=(2, 3)) == 5
    with pytest.raises(ValueError, match="num_procs"):
        launch_cpu(print, 0)


def _train_worker(json_file: str, image_root: str, out_dir: str) -> None:
    """Register the tiny dataset in this process, then train as tools/train_net.py does."""
    sys.path.insert(0, str(REPO / "tools"))
    import train_net
    from detectron2.data.datasets import register_coco_instances

    register_coco_instances("cmbddp", {}, json_file, image_root)
    args = train_net.argument_parser().parse_args([
        "--config-file", str(INSTANT), "OUTPUT_DIR", out_dir,
        "CMB.DATA_ROOT", str(Path(out_dir) / "none"), "DATASETS.TRAIN", "('cmbddp',)",
        "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
        "SEED", "1",
    ])
    train_net.main(args)


@pytest.mark.slow
def test_trainer_trains_in_two_cpu_processes(tmp_path: Path) -> None:
    from test_engine import _write_slice_dataset

    json_file = _write_slice_dataset(tmp_path / "data")
    out = tmp_path / "run"
    launch_cpu(_train_worker, 2, args=(str(json_file), str(tmp_path / "data"), str(out)))
    assert (out / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(np.isfinite(losses))
    assert "World size: 2" in (out / "log.txt").read_text()  # rank 0 saw both processes
