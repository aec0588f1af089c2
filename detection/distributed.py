"""Data-parallel training on CPU cores: Detectron2's ``launch`` without CUDA.

Detectron2 v0.6 spreads training over processes only on GPUs (its ``launch`` asserts
CUDA and uses NCCL, and ``create_ddp_model`` pins every process to a CUDA device).
On a CPU machine one training process with several torch threads gains little here:
the Lite model's convolutions are too small (0.158 against 0.149 s per iteration with
2 threads instead of 1). Separate single-thread processes, each on its share of the
batch, with their gradients averaged (gloo all-reduce), use the cores instead.

:func:`launch_cpu` starts ``num_procs`` such processes on this machine and runs
``main_func(*args)`` in each, with the same process-group layout Detectron2's
``launch`` creates (so ``comm.get_rank`` / ``get_local_rank`` / ``synchronize`` and the
samplers' sharding behave as on GPUs). :func:`ddp_for` wraps a CPU model in
``DistributedDataParallel`` without device ids; :mod:`detection.engine`'s ``Trainer``
uses it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ddp_for", "free_port", "launch_cpu"]

logger = logging.getLogger(__name__)

_TIMEOUT = timedelta(minutes=30)


def free_port() -> int:
    """A TCP port on localhost that is free now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_worker(rank: int, main_func: Callable[..., Any], num_procs: int, dist_url: str,
                threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=num_procs,
                            rank=rank, timeout=_TIMEOUT)
    import detectron2.utils.comm as comm

    # The same local group Detectron2's launch builds (one machine: every rank).
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(num_procs)))
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_cpu(main_func: Callable[..., Any], num_procs: int, args: tuple = (),
               dist_url: str = "auto", threads: int = 1) -> Any:
    """Run ``main_func(*args)`` in ``num_procs`` CPU processes joined by a gloo group.

    ``num_procs == 1`` calls it directly (no process group) and returns its result;
    otherwise the processes are spawned and nothing is returned (rank 0 writes the
    outputs, as with Detectron2's ``launch``). ``threads``: torch threads per process.
    """
    if num_procs < 1:
        raise ValueError(f"num_procs must be >= 1, got {num_procs}")
    if num_procs == 1:
        return main_func(*args)
    if dist_url == "auto":
        dist_url = f"tcp://127.0.0.1:{free_port()}"
    logger.info("launching %d CPU training processes (%d thread(s) each) at %s",
                num_procs, threads, dist_url)
    # Children inherit the environment: one OpenMP thread each unless told otherwise
    # (this process's environment is left as it was).
    had_omp = "OMP_NUM_THREADS" in os.environ
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        torch.multiprocessing.start_processes(
            _cpu_worker, nprocs=num_procs,
            args=(main_func, num_procs, dist_url, threads, args),
            daemon=False, start_method="spawn",
        )
    finally:
        if not had_omp:
            os.environ.pop("OMP_NUM_THREADS", None)
    return None


def ddp_for(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel when several processes train.

    Like Detectron2's ``create_ddp_model``, except that a CPU model gets no device ids
    (DistributedDataParallel refuses ``device_ids`` for CPU modules).
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cpu":
        kwargs.pop("device_ids", None)
        return DistributedDataParallel(model, **kwargs)
    import detectron2.utils.comm as comm

    kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)
