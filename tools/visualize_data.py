#!/usr/bin/env python
"""Draw ground-truth CMBs on exported slices (Detectron2's tools/visualize_data.py layout).

Examples::

    python tools/visualize_data.py --config-file configs/Base-CMB-RCNN-FPN.yaml \\
        --source annotation --output-dir output/vis CMB.DATA_ROOT datasets/cmb_coco
    python tools/visualize_data.py --config-file C --source dataloader --output-dir output/vis

``--source annotation`` draws the dataset dicts of ``DATASETS.TRAIN`` (or ``--dataset``)
as exported, each mask labelled with its 3D ``lesion_id``; ``--source dataloader`` draws
what the training loader yields (augmented). Images are written to ``--output-dir``
(headless); ``--show`` opens a window instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401  (compat shims before detectron2)
from detection.config import add_cmb_config  # noqa: E402
from detection.data.register import register_cmb_datasets  # noqa: E402

import cv2  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

logger = logging.getLogger("cmb.visualize_data")


def setup(args: argparse.Namespace):
    """Config (+ CMB keys, trailing opts) with the export at CMB.DATA_ROOT registered."""
    cfg = get_cfg()
    add_cmb_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    if args.dataset:
        cfg.DATASETS.TRAIN = (args.dataset,)
    cfg.freeze()
    register_cmb_datasets(cfg.CMB.DATA_ROOT)
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (Detectron2's, plus ``--max-images``/``--only-positive``)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--source", choices=["annotation", "dataloader"], required=True,
                    help="visualize the annotations or the data loader (with augmentation)")
    ap.add_argument("--config-file", metavar="FILE", help="path to config file")
    ap.add_argument("--output-dir", default="./output/visualize_data", help="path to output dir")
    ap.add_argument("--show", action="store_true", help="show output in a window")
    ap.add_argument("--dataset", default=None, help="dataset name (default: DATASETS.TRAIN)")
    ap.add_argument("--max-images", type=int, default=50, help="stop after this many images")
    ap.add_argument("--only-positive", action="store_true", help="skip slices without a CMB")
    ap.add_argument("--scale", type=float, default=2.0, help="drawing scale (small lesions)")
    ap.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                    help="Modify config options using the command-line 'KEY VALUE' pairs")
    args = ap.parse_args(argv)
    args.opts = args.opts or []
    return args


def _output(vis, fname: str, args: argparse.Namespace) -> None:
    if args.show:
        cv2.imshow("window", vis.get_image()[:, :, ::-1])
        cv2.waitKey()
    else:
        filepath = os.path.join(args.output_dir, fname)
        logger.info("Saving to %s ...", filepath)
        vis.save(filepath)


def _record_name(dic: dict) -> str:
    if "patient_id" in dic and "slice_index" in dic:
        return f"{dic['patient_id']}_{int(dic['slice_index']):04d}.png"
    return os.path.splitext(os.path.basename(dic["file_name"]))[0] + ".png"


def draw_annotations(cfg, args: argparse.Namespace) -> int:
    """Draw the dataset dicts of ``DATASETS.TRAIN``; return the number of images written."""
    dicts = list(chain.from_iterable(DatasetCatalog.get(k) for k in cfg.DATASETS.TRAIN))
    metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    n = 0
    for dic in dicts:
        annos = dic.get("annotations", [])
        if args.only_positive and not annos:
            continue
        img = utils.read_image(dic["file_name"], "RGB")
        visualizer = Visualizer(img, metadata=metadata, scale=args.scale)
        if annos and all("lesion_id" in a for a in annos):
            vis = visualizer.overlay_instances(
                labels=[f"cmb {a['lesion_id']}" for a in annos],
                boxes=[utils.BoxMode.convert(a["bbox"], a["bbox_mode"], utils.BoxMode.XYXY_ABS)
                       for a in annos],
                masks=[a["segmentation"] for a in annos],
            )
        else:
            vis = visualizer.draw_dataset_dict(dic)
        _output(vis, _record_name(dic), args)
        n += 1
        if n >= args.max_images:
            break
    return n


def draw_dataloader(cfg, args: argparse.Namespace) -> int:
    """Draw what the training loader yields; return the number of images written."""
    try:  # the project's loader (SWI augmentation, positive oversampling)
        from detection.engine import Trainer

        loader = Trainer.build_train_loader(cfg)
    except ImportError:
        from detectron2.data import build_detection_train_loader

        loader = build_detection_train_loader(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    n = 0
    for batch in loader:
        for per_image in batch:
            inst = per_image.get("instances")
            if args.only_positive and (inst is None or len(inst) == 0):
                continue
            img = per_image["image"].permute(1, 2, 0).cpu().detach().numpy()
            img = utils.convert_image_to_rgb(img, cfg.INPUT.FORMAT)
            visualizer = Visualizer(img, metadata=metadata, scale=args.scale)
            fields = inst.get_fields() if inst is not None else {}
            labels = [metadata.thing_classes[i] for i in fields.get("gt_classes", [])]
            vis = visualizer.overlay_instances(
                labels=labels or None,
                boxes=fields.get("gt_boxes", None),
                masks=fields.get("gt_masks", None),
            )
            _output(vis, f"{n:05d}_" + _record_name(per_image), args)
            n += 1
            if n >= args.max_images:
                return n
    return n


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    setup_logger(name="cmb")
    logger.info("Arguments: %s", args)
    cfg = setup(args)
    os.makedirs(args.output_dir, exist_ok=True)
    n = draw_annotations(cfg, args) if args.source == "annotation" else draw_dataloader(cfg, args)
    logger.info("Wrote %d image(s) to %s", n, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
