"""CPU end to end: build the instant-test model, one training step, one inference.

Mirrors Detectron2's tests/modeling/test_model_e2e.py: a batch that includes an
image without instances must train and infer.
"""

from __future__ import annotations

from pathlib import Path

import detection  # noqa: F401
from detection.config import add_cmb_config

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

CONFIG = (
    Path(__file__).resolve().parents[2]
    / "configs"
    / "quick_schedules"
    / "cmb_R_18_FPN_instant_test.yaml"
)


def _instant_cfg():
    cfg = get_cfg()
    add_cmb_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _image_with_blob(size: int, boxes: list[tuple[int, int, int, int]]) -> dict:
    img = torch.full((3, size, size), 120, dtype=torch.uint8)
    inst = Instances((size, size))
    masks = torch.zeros((len(boxes), size, size), dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        img[:, y0:y1, x0:x1] = 20  # dark focus, like a microbleed on SWI
        masks[i, y0:y1, x0:x1] = True
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
    inst.gt_masks = BitMasks(masks)
    return {"image": img, "height": size, "width": size, "instances": inst}


def test_train_step_and_inference_with_empty_image() -> None:
    torch.manual_seed(0)
    cfg = _instant_cfg()
    model = build_model(cfg)
    model.train()
    batch = [_image_with_blob(128, [(40, 40, 48, 48), (80, 90, 86, 96)]), _image_with_blob(128, [])]
    with EventStorage():
        losses = model(batch)
    expected = {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    assert expected <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.zero_grad()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()

    model.eval()
    with torch.no_grad():
        outputs = model([{"image": b["image"], "height": 128, "width": 128} for b in batch])
    assert len(outputs) == 2
    for out in outputs:
        inst = out["instances"]
        assert inst.image_size == (128, 128)
        assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
        if len(inst):
            assert inst.pred_masks.shape[1:] == (128, 128)
