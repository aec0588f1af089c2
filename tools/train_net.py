#!/usr/bin/env python
"""Train or evaluate the microbleed Mask R-CNN (Detectron2's tools/train_net.py layout).

Examples::

    python tools/train_net.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml
    python tools/train_net.py --config-file configs/CMB-RCNN-Lite-FPN-cpu.yaml --cpu-procs 2
    python tools/train_net.py --config-file configs/CMB-RCNN-R50-FPN-gpu.yaml --num-gpus 4
    python tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS output/x/model_best.pth
    python tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS W TEST.AUG.ENABLED True
        # also evaluates with the volume predictor's mirrored pass (results *_TTA)

Trailing ``KEY VALUE`` pairs override config keys (``CMB.DATA_ROOT datasets/my_coco``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401  (compat shims before detectron2)
from detection.distributed import launch_cpu  # noqa: E402
from detection.engine import Trainer, setup_cfg  # noqa: E402

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import (  # noqa: E402
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

logger = logging.getLogger("cmb.train_net")


def setup(args):
    """Config from ``--config-file`` and trailing opts, frozen; Detectron2's default setup
    (output dir, logging, environment dump, seeding)."""
    cfg = setup_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup routes only Detectron2's and fvcore's loggers to the console and
    # OUTPUT_DIR/log.txt; the project's (training set, augmentations, ...) go there too.
    # (setup_logger stops propagation; it is restored so that callers' handlers still
    # see these records.)
    for name in ("detection", "cmb"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name).propagate = True
    return cfg


def main(args):
    """Train (or with ``--eval-only`` reload the weights and evaluate)."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
    return trainer.train()


def argument_parser():
    """Detectron2's default parser plus ``--cpu-procs``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--cpu-procs", type=int, default=1,
        help="data-parallel training in N single-thread CPU processes (gloo); the batch "
             "(SOLVER.IMS_PER_BATCH) is split between them. Not with --num-gpus.",
    )
    return parser


def cli(argv=None):
    """Parse arguments and launch (one process per GPU with ``--num-gpus``, per CPU
    share with ``--cpu-procs``)."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.cpu_procs < 1:
        parser.error(f"--cpu-procs must be >= 1, got {args.cpu_procs}")
    if args.cpu_procs > 1 and (args.num_gpus > 1 or args.num_machines > 1):
        parser.error("--cpu-procs runs on this machine's CPU: not with --num-gpus or "
                     "--num-machines")
    print("Command Line Args:", args)
    if args.cpu_procs > 1:
        return launch_cpu(main, args.cpu_procs, args=(args,))
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
