#!/usr/bin/env python
"""Predictions beside ground truth on slices (Detectron2's visualize_json_results.py).

Reads ``coco_instances_results.json`` written by the COCOEvaluator (``inference/<dataset>/``
of a training or ``--eval-only`` run) and draws, for each slice, the ground truth (left)
next to the predictions above ``--conf-threshold`` (right).

    python tools/visualize_json_results.py --input output/x/inference/cmb_external/\\
        coco_instances_results.json --data-root datasets/cmb_coco --dataset cmb_external \\
        --output output/x/vis --only-positive
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detection  # noqa: E402,F401
from detection.data.register import register_cmb_datasets  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

logger = logging.getLogger("cmb.visualize_json_results")


def predictions_to_instances(preds: list[dict], shape: tuple[int, int], thresh: float) -> Instances:
    """COCO result records of one image -> ``Instances`` above ``thresh``."""
    kept = [p for p in preds if p["score"] > thresh]
    inst = Instances(shape)
    inst.scores = torch.tensor([p["score"] for p in kept], dtype=torch.float32)
    boxes = [BoxMode.convert(p["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for p in kept]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.pred_classes = torch.zeros(len(kept), dtype=torch.int64)
    if kept and "segmentation" in kept[0]:
        inst.pred_masks = [p["segmentation"] for p in kept]  # RLE dicts: Visualizer decodes
    return inst


def main(argv: list[str] | None = None) -> int:
    """Draw every (or every positive) slice of the dataset; returns an exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="coco_instances_results.json")
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    parser.add_argument("--dataset", default="cmb_external", help="registered dataset name")
    parser.add_argument("--data-root", default="datasets/cmb_coco", help="COCO export folder")
    parser.add_argument("--conf-threshold", type=float, default=0.5, help="score threshold")
    parser.add_argument("--only-positive", action="store_true",
                        help="only slices with ground truth or predictions above threshold")
    parser.add_argument("--max-images", type=int, default=0, help="stop after N images (0 = all)")
    args = parser.parse_args(argv)
    setup_logger(name="cmb")

    results_path = Path(args.input)
    if not results_path.is_file():
        parser.error(f"{results_path}: no such results file")
    predictions = json.loads(results_path.read_text())
    by_image: dict[int, list[dict]] = defaultdict(list)
    for p in predictions:
        by_image[p["image_id"]].append(p)

    if args.dataset not in DatasetCatalog.list():
        register_cmb_datasets(Path(args.data_root))
    dicts = DatasetCatalog.get(args.dataset)
    metadata = MetadataCatalog.get(args.dataset)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for record in tqdm.tqdm(dicts, desc="slices"):
        img = cv2.imread(record["file_name"], cv2.IMREAD_COLOR)[:, :, ::-1]
        shape = img.shape[:2]
        preds = predictions_to_instances(by_image.get(record["image_id"], []), shape,
                                         args.conf_threshold)
        if args.only_positive and not record.get("annotations") and len(preds) == 0:
            continue
        vis_gt = Visualizer(img, metadata).draw_dataset_dict(record).get_image()
        vis_pred = Visualizer(img, metadata).draw_instance_predictions(preds).get_image()
        both = np.concatenate([vis_gt, vis_pred], axis=1)
        src = Path(record["file_name"])  # images/<patient_id>/<slice>.png
        name = f"{src.parent.name}_{src.stem}"
        cv2.imwrite(str(out_dir / f"{name}.png"), both[:, :, ::-1])
        written += 1
        if args.max_images and written >= args.max_images:
            break
    logger.info("wrote %d images to %s", written, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
