"""Training engine: SWI augmentation mapper, oversampling, train + ``--eval-only``."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import detection  # noqa: F401
from detection.engine import (
    ClippedSGD,
    CMBDatasetMapper,
    IntensityTransform,
    LesionAwareCrop,
    Trainer,
    export_mismatches,
    positive_repeat_factors,
    setup_cfg,
)

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.solver import build_optimizer

REPO = Path(__file__).resolve().parents[2]
INSTANT = REPO / "configs" / "quick_schedules" / "cmb_R_18_FPN_instant_test.yaml"
sys.path.insert(0, str(REPO / "tools"))


def _write_slice_dataset(root: Path, n_images: int = 6, size: int = 128,
                         halo: float = 0.0) -> Path:
    """A tiny COCO dataset of SWI-like slices: grey brain, dark round foci, some empty.
    With ``halo`` > 0 each focus has a blooming halo that deep (grey levels), 3 px wide."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_images):
        img = np.clip(rng.normal(140, 8, (size, size)), 0, 255)
        n_lesions = 0 if i % 3 == 2 else 1 + i % 2
        masks = []
        for _ in range(n_lesions):
            cy, cx = rng.integers(20, size - 20, 2)
            r = rng.uniform(3, 6)
            rr = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            m = rr <= r
            img -= halo * np.exp(-0.5 * (np.maximum(rr - r, 0) / 3.0) ** 2)
            img[m] = 30
            masks.append(m)
        name = f"images/{i:03d}.png"
        cv2.imwrite(str(root / name), np.repeat(img.astype(np.uint8)[..., None], 3, axis=2))
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for m in masks:
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            bbox = mask_util.toBbox(rle).tolist()
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                    "segmentation": rle, "bbox": bbox, "area": float(m.sum()), "iscrowd": 0,
                }
            )
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "cmb"}]}
    path = root / "train.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture()
def tiny_dataset(tmp_path: Path):
    name = f"cmbtest_{tmp_path.name}"
    json_file = _write_slice_dataset(tmp_path / "data")
    register_coco_instances(name, {}, str(json_file), str(tmp_path / "data"))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_lesion_aware_crop_keeps_the_lesion() -> None:
    np.random.seed(0)  # noqa: NPY002 (Detectron2 augmentations use the global RNG)
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    box = np.array([[350.0, 10.0, 362.0, 20.0]])
    aug = LesionAwareCrop(64, keep_prob=1.0)
    for _ in range(50):
        t = aug.get_transform(image, box)
        assert (t.w, t.h) == (64, 64)
        assert t.x0 <= 350 and t.x0 + 64 >= 362
        assert t.y0 <= 10 and t.y0 + 64 >= 20
        assert 0 <= t.x0 <= 400 - 64 and 0 <= t.y0 <= 300 - 64


def test_intensity_transform_changes_grey_levels_not_geometry() -> None:
    img = np.tile(np.arange(0, 200, 2, dtype=np.uint8), (100, 1))[..., None].repeat(3, 2)
    t = IntensityTransform(contrast=1.5, shift=10.0)
    out = t.apply_image(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out.std() > img.std()
    coords = np.array([[3.0, 4.0]])
    assert np.array_equal(t.apply_coords(coords), coords)
    seg = np.eye(5, dtype=np.uint8)
    assert np.array_equal(t.apply_segmentation(seg), seg)


def test_positive_repeat_factors() -> None:
    dicts = [{"annotations": [{}]}, {"annotations": []}, {}]
    assert positive_repeat_factors(dicts, 4.0).tolist() == [4.0, 1.0, 1.0]


def test_mapper_boxes_follow_masks_after_augmentation(tiny_dataset: str) -> None:
    np.random.seed(1)  # noqa: NPY002
    cfg = setup_cfg(INSTANT, ["CMB.AUG.CROP_SIZE", "64", "CMB.AUG.ROTATION", "15.0"])
    mapper = CMBDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get(tiny_dataset)
    seen = 0
    for rec in records * 3:
        out = mapper(rec)
        assert tuple(out["image"].shape) == (3, 64, 64)
        inst = out["instances"]
        for box, mask in zip(inst.gt_boxes.tensor, inst.gt_masks.tensor):
            ys, xs = np.nonzero(mask.numpy())
            assert len(xs) > 0
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            seen += 1
    assert seen > 0
    test_mapper = CMBDatasetMapper(cfg, is_train=False)
    out = test_mapper(records[0])
    assert tuple(out["image"].shape) == (3, 128, 128) and "instances" not in out


@pytest.mark.slow
def test_instant_config_trains_then_eval_only_reloads(tiny_dataset: str, tmp_path: Path) -> None:
    import train_net

    out_dir = tmp_path / "run"
    common = [
        "--config-file", str(INSTANT), "--num-gpus", "0",
    ]
    opts = [
        "OUTPUT_DIR", str(out_dir), "CMB.DATA_ROOT", str(tmp_path / "none"),
        "DATASETS.TRAIN", f"('{tiny_dataset}',)", "DATASETS.TEST", f"('{tiny_dataset}',)",
        "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2", "SEED", "3",
    ]
    args = train_net.default_argument_parser().parse_args([*common, *opts])
    train_net.main(args)
    assert (out_dir / "model_final.pth").is_file()
    assert (out_dir / "model_best.pth").is_file()  # BestCheckpointer ran after EvalHook
    # The project's own log records reach OUTPUT_DIR/log.txt beside Detectron2's.
    assert "with CMBs, oversampled" in (out_dir / "log.txt").read_text()
    metrics = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    assert any("segm/AP50" in m for m in metrics)
    assert any("segm_raw/AP50" in m for m in metrics)  # the unfused instances beside them
    assert any("total_loss" in m and np.isfinite(m["total_loss"]) for m in metrics)

    eval_args = train_net.default_argument_parser().parse_args(
        [*common, "--eval-only", *opts, "MODEL.WEIGHTS", str(out_dir / "model_final.pth"),
         "TEST.AUG.ENABLED", "True"]
    )
    res = train_net.main(eval_args)
    # One test dataset: Trainer.test returns its results directly; with TEST.AUG.ENABLED
    # also those of the mirrored pass, in their own folder.
    assert set(res) >= {"bbox", "segm", "bbox_raw", "segm_raw", "bbox_TTA", "segm_TTA",
                        "bbox_raw_TTA", "segm_raw_TTA"}
    assert (out_dir / "inference" / tiny_dataset / "raw" / "coco_instances_results.json").is_file()
    assert (out_dir / "inference_TTA" / tiny_dataset / "coco_instances_results.json").is_file()
    ap50 = res["segm"]["AP50"]
    assert np.isnan(ap50) or 0.0 <= ap50 <= 100.0



def test_noise_blur_is_seeded_and_keeps_geometry() -> None:
    from detection.engine import NoiseBlurTransform

    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[18:22, 18:22] = 200
    t = NoiseBlurTransform(sigma=1.0, noise_std=5.0, seed=7)
    a, b = t.apply_image(img), t.apply_image(img)
    assert np.array_equal(a, b)  # the same transform gives the same image (seeded)
    assert a[20, 20, 0] < 200 and a[16, 20, 0] > 0  # blurred: peak lower, spread out
    assert not np.array_equal(a, NoiseBlurTransform(1.0, 5.0, seed=8).apply_image(img))
    seg = np.eye(6, dtype=np.uint8)
    assert np.array_equal(t.apply_segmentation(seg), seg)


def test_slice_mix_fades_a_bleed_seen_in_one_slice_only() -> None:
    from detection.engine import SliceMixTransform

    img = np.full((20, 20, 3), 120, dtype=np.uint8)
    img[8:12, 8:12, 1] = 20  # in the centre slice only
    out = SliceMixTransform(0.5).apply_image(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out[10, 10, 1] == 70  # 0.5 * 20 + 0.5 * 120
    assert out[10, 10, 0] == out[10, 10, 2] == 95  # neighbours get a quarter of it
    assert np.array_equal(out[0, 0], img[0, 0])  # uniform background unchanged
    assert np.array_equal(SliceMixTransform(0.0).apply_image(img), img)


def test_fade_lesions_lifts_the_lesion_to_its_background() -> None:
    from detection.engine import fade_lesions

    img = np.full((40, 40, 3), 120, dtype=np.uint8)
    yy, xx = np.mgrid[:40, :40]
    m = (yy - 20) ** 2 + (xx - 20) ** 2 <= 9
    img[m] = 30
    far = np.zeros_like(m)
    far[2:4, 2:4] = True
    same = fade_lesions(img, m[None], [0.0])
    assert np.array_equal(same, img)
    half = fade_lesions(img, m[None], [0.5])
    assert half[20, 20, 0] == 75  # halfway between 30 and the ring's 120
    full = fade_lesions(img, m[None], [1.0])
    assert full[20, 20, 0] == 120
    assert np.array_equal(full[~m], img[~m])  # only the dark lesion moves
    with pytest.raises(ValueError, match="masks"):
        fade_lesions(img, np.stack([m, far]), [0.5])


def _dark_disc(size: int = 60, radius: float = 5.0, noise: float = 0.0):
    """A grey slice (3 channels) with one dark disc at the centre and its mask."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size // 2) ** 2 + (xx - size // 2) ** 2
    img = np.full((size, size, 3), 120.0) + rng.normal(0, noise, (size, size, 3))
    img[r2 <= radius ** 2] = 20
    return np.clip(img, 0, 255).astype(np.uint8), r2 <= radius ** 2


def test_scale_lesions_shrinks_the_dark_blob_and_its_mask() -> None:
    from detection.engine import scale_lesions

    img, m = _dark_disc(radius=6.0)
    same, same_m = scale_lesions(img, m[None], [1.0])
    assert np.array_equal(same, img) and np.array_equal(same_m[0], m)
    np.random.seed(0)  # noqa: NPY002
    out, masks = scale_lesions(img, m[None], [0.5])
    assert out.dtype == np.uint8 and out.shape == img.shape
    dark = out[..., 1] < 70
    # Half the radius: about a quarter of the area, for the dark pixels and the mask.
    assert 0.15 < dark.sum() / m.sum() < 0.4
    assert 0.15 < masks[0].sum() / m.sum() < 0.4
    assert np.array_equal(dark, masks[0])  # the mask follows the blob
    assert masks[0][30, 30] and out[30, 30, 1] == 20  # centred where it was
    assert out[30, 36, 1] > 100  # the old rim is background again
    assert np.array_equal(out[:10], img[:10])  # anatomy far away untouched
    big, big_m = scale_lesions(img, m[None], [1.5])
    assert big_m[0].sum() > 1.8 * m.sum() and big[30, 37, 1] < 70


def test_scale_lesions_keeps_the_background_noise_and_a_tiny_lesion() -> None:
    from detection.engine import scale_lesions

    img, m = _dark_disc(radius=6.0, noise=8.0)
    np.random.seed(0)  # noqa: NPY002
    out, _ = scale_lesions(img, m[None], [0.5])
    yy, xx = np.mgrid[:60, :60]
    r = np.sqrt((yy - 30) ** 2 + (xx - 30) ** 2)
    erased = (r > 5) & (r < 7)  # was lesion, now background
    far = r > 20
    # The erased rim has the background's level and noise, not a flat grey.
    assert abs(out[erased].mean() - out[far].mean()) < 6
    assert out[erased].astype(float).std() > 0.5 * out[far].astype(float).std()
    tiny = np.zeros_like(m)
    tiny[30, 30] = True
    _, masks = scale_lesions(img, tiny[None], [0.3])
    assert masks[0].sum() == 1 and masks[0][30, 30]  # never scaled away
    with pytest.raises(ValueError, match="scale factors"):
        scale_lesions(img, m[None], [0.5, 0.7])
    with pytest.raises(ValueError, match="positive"):
        scale_lesions(img, m[None], [0.0])


def test_mapper_lesion_scale_moves_masks_and_boxes(tiny_dataset: str) -> None:
    flat = ["CMB.AUG.ROTATION", "0.0", "CMB.AUG.BRIGHTNESS", "0.0", "CMB.AUG.HFLIP", "False",
            "CMB.AUG.CONTRAST", "(1.0, 1.0)", "CMB.AUG.SCALE", "(1.0, 1.0)"]
    mapper = CMBDatasetMapper(setup_cfg(INSTANT, flat + [
        "CMB.AUG.LESION_SCALE", "(0.5, 0.5)", "CMB.AUG.LESION_SCALE_PROB", "1.0"]),
        is_train=True)
    plain = CMBDatasetMapper(setup_cfg(INSTANT, flat), is_train=True)
    rec = next(r for r in DatasetCatalog.get(tiny_dataset) if r["annotations"])
    np.random.seed(3)  # noqa: NPY002  (the same crop for both)
    out = mapper(rec)
    np.random.seed(3)  # noqa: NPY002
    ref = plain(rec)
    inst, ref_inst = out["instances"], ref["instances"]
    assert len(inst) == len(ref_inst) == len(rec["annotations"])
    area = inst.gt_masks.tensor.flatten(1).sum(1)
    ref_area = ref_inst.gt_masks.tensor.flatten(1).sum(1)
    assert torch.all(area < 0.5 * ref_area)
    assert torch.equal(inst.gt_boxes.tensor, inst.gt_masks.get_bounding_boxes().tensor)
    # The shrunk box sits inside the original one.
    b, rb = inst.gt_boxes.tensor, ref_inst.gt_boxes.tensor
    assert torch.all(b[:, :2] >= rb[:, :2]) and torch.all(b[:, 2:] <= rb[:, 2:])
    dark = (out["image"][1] < 80).sum()
    assert dark < 0.6 * (ref["image"][1] < 80).sum()
    with pytest.raises(ValueError, match="lesion_scale"):
        CMBDatasetMapper(is_train=True, augmentations=[], image_format="RGB",
                         lesion_scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="lesion_scale_prob"):
        CMBDatasetMapper(is_train=True, augmentations=[], image_format="RGB",
                         lesion_scale_prob=1.5)


def test_test_mapper_zooms_only_when_asked(tiny_dataset: str) -> None:
    from detection.engine import Zoom, build_cmb_augmentations

    rec = next(r for r in DatasetCatalog.get(tiny_dataset) if r["annotations"])
    assert build_cmb_augmentations(setup_cfg(INSTANT), is_train=False) == []
    plain = CMBDatasetMapper(setup_cfg(INSTANT), is_train=False)(rec)
    cfg = setup_cfg(INSTANT, ["CMB.INFER.ZOOM", "1.5"])
    augs = build_cmb_augmentations(cfg, is_train=False)
    assert len(augs) == 1 and isinstance(augs[0], Zoom)
    out = CMBDatasetMapper(cfg, is_train=False)(rec)
    h, w = plain["image"].shape[1:]
    assert tuple(out["image"].shape[1:]) == (round(1.5 * h), round(1.5 * w))
    # the record keeps the slice's own size: Detectron2 maps the outputs back to it
    assert (out["height"], out["width"]) == (rec["height"], rec["width"]) == (h, w)
    with pytest.raises(ValueError, match="ZOOM"):
        build_cmb_augmentations(setup_cfg(INSTANT, ["CMB.INFER.ZOOM", "0.0"]), is_train=False)
    with pytest.raises(ValueError, match="positive"):
        Zoom(-2.0)


def test_mapper_lesion_fade_keeps_masks(tiny_dataset: str) -> None:
    np.random.seed(2)  # noqa: NPY002
    cfg = setup_cfg(INSTANT, ["CMB.AUG.LESION_FADE", "1.0", "CMB.AUG.LESION_FADE_PROB", "1.0",
                              "CMB.AUG.ROTATION", "0.0", "CMB.AUG.BRIGHTNESS", "0.0",
                              "CMB.AUG.CONTRAST", "(1.0, 1.0)", "CMB.AUG.SCALE", "(1.0, 1.0)"])
    mapper = CMBDatasetMapper(cfg, is_train=True)
    plain = CMBDatasetMapper(setup_cfg(INSTANT, ["CMB.AUG.ROTATION", "0.0",
                                                 "CMB.AUG.BRIGHTNESS", "0.0",
                                                 "CMB.AUG.CONTRAST", "(1.0, 1.0)",
                                                 "CMB.AUG.SCALE", "(1.0, 1.0)"]), is_train=True)
    rec = next(r for r in DatasetCatalog.get(tiny_dataset) if r["annotations"])
    out = mapper(rec)
    ref = plain(rec)
    inst = out["instances"]
    assert len(inst) == len(rec["annotations"])  # faded lesions keep their masks
    lesion = inst.gt_masks.tensor.any(0)
    faded = out["image"][1][lesion].float().mean()
    before = ref["image"][1][ref["instances"].gt_masks.tensor.any(0)].float().mean()
    assert faded > before + 20  # lifted from ~30 towards the ~140 background
    with pytest.raises(ValueError, match="lesion_fade"):
        CMBDatasetMapper(is_train=True, augmentations=[], image_format="RGB", lesion_fade=2.0)


def _bloomed_disc(depth: float, width: float, size: int = 80, radius: float = 4.0,
                  noise: float = 0.0):
    """A bleed (dark disc, its mask) with a Gaussian blooming halo of ``depth`` grey
    levels and ``width`` px outside it, in all three 2.5D channels."""
    yy, xx = np.mgrid[:size, :size]
    r = np.sqrt((yy - size // 2) ** 2 + (xx - size // 2) ** 2)
    mask = r <= radius
    d = np.maximum(r - radius, 0.0)
    img = 120.0 - depth * np.exp(-0.5 * (d / width) ** 2)
    img[mask] = 15.0
    img = np.repeat(img[..., None], 3, axis=2)
    img += np.random.default_rng(2).normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, d


def test_bloom_lesions_narrows_the_halo_and_keeps_the_bleed() -> None:
    from detection.engine import bloom_lesions

    img, m, d = _bloomed_disc(depth=60.0, width=3.0, noise=4.0)
    assert np.array_equal(bloom_lesions(img, m[None], [1.0]), img)
    out = bloom_lesions(img, m[None], [0.7])
    assert out.dtype == np.uint8 and out.shape == img.shape
    # The bleed itself is untouched in its own slice (the centre channel) ...
    assert np.array_equal(out[..., 1][m], img[..., 1][m])
    # ... and the halo now looks like one rendered with 0.7 x the depth and the width.
    want, _, _ = _bloomed_disc(depth=42.0, width=2.1, noise=4.0)
    halo = (d > 0) & (d < 9)
    before = np.abs(img[..., 1][halo].astype(float) - want[..., 1][halo]).mean()
    after = np.abs(out[..., 1][halo].astype(float) - want[..., 1][halo]).mean()
    assert before > 8 and after < 0.4 * before
    # Beyond the halo's reach nothing changes, noise included.
    assert np.array_equal(out[d > 20], img[d > 20])
    # The neighbouring slices' footprint (halo above and below the bleed) is lifted too.
    assert out[..., 0][m].mean() > img[..., 0][m].mean() + 10
    # A factor above 1 widens and deepens the halo.
    wide = bloom_lesions(img, m[None], [1.3])
    ring = (d > 2) & (d < 6)
    assert wide[..., 1][ring].mean() < img[..., 1][ring].mean() - 5
    with pytest.raises(ValueError, match="blooming factors"):
        bloom_lesions(img, m[None], [0.7, 0.8])
    with pytest.raises(ValueError, match="positive"):
        bloom_lesions(img, m[None], [-1.0])


@pytest.fixture()
def haloed_dataset(tmp_path: Path):
    name = f"cmbhalo_{tmp_path.name}"
    json_file = _write_slice_dataset(tmp_path / "halo", halo=50.0)
    register_coco_instances(name, {}, str(json_file), str(tmp_path / "halo"))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_mapper_bloom_keeps_masks_and_lifts_the_halo(haloed_dataset: str) -> None:
    flat = ["CMB.AUG.ROTATION", "0.0", "CMB.AUG.BRIGHTNESS", "0.0", "CMB.AUG.HFLIP", "False",
            "CMB.AUG.CONTRAST", "(1.0, 1.0)", "CMB.AUG.SCALE", "(1.0, 1.0)",
            "CMB.AUG.CROP_KEEP_LESION_PROB", "1.0"]
    cfg = setup_cfg(INSTANT, flat + ["CMB.AUG.BLOOM", "(0.5, 0.5)", "CMB.AUG.BLOOM_PROB", "1.0"])
    mapper = CMBDatasetMapper(cfg, is_train=True)
    plain = CMBDatasetMapper(setup_cfg(INSTANT, flat), is_train=True)
    assert CMBDatasetMapper(cfg, is_train=False).bloom == (1.0, 1.0)  # training only
    rec = next(r for r in DatasetCatalog.get(haloed_dataset) if r["annotations"])
    np.random.seed(4)  # noqa: NPY002  (the same crop for both)
    out = mapper(rec)
    np.random.seed(4)  # noqa: NPY002
    ref = plain(rec)
    assert len(ref["instances"]) > 0
    assert torch.equal(out["instances"].gt_masks.tensor, ref["instances"].gt_masks.tensor)
    lesion = ref["instances"].gt_masks.tensor.any(0)
    assert torch.equal(out["image"][1][lesion], ref["image"][1][lesion])
    # the halo just outside the bleed comes up
    edge = torch.from_numpy(cv2.dilate(lesion.numpy().astype(np.uint8),
                                       np.ones((5, 5), np.uint8)).astype(bool)) & ~lesion
    assert out["image"][1][edge].float().mean() > ref["image"][1][edge].float().mean() + 3
    with pytest.raises(ValueError, match="bloom"):
        CMBDatasetMapper(is_train=True, augmentations=[], image_format="RGB", bloom=(0.0, 1.0))
    with pytest.raises(ValueError, match="bloom_prob"):
        CMBDatasetMapper(is_train=True, augmentations=[], image_format="RGB", bloom_prob=-0.1)


def test_clipped_sgd_matches_detectron2_bit_for_bit() -> None:
    """The batched clipping + multi-tensor SGD give the same weights as Detectron2's
    per-parameter clipper and single-tensor SGD, clipped and unclipped steps alike."""
    cfg = setup_cfg(Path(__file__).resolve().parents[2] / "configs" / "CMB-RCNN-Lite-FPN-cpu.yaml")
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "norm"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8),
                                torch.nn.Conv2d(8, 4, 1))
    twin = copy.deepcopy(model)
    ours = Trainer.build_optimizer(cfg, model)
    theirs = build_optimizer(cfg, twin)
    assert isinstance(ours, ClippedSGD) and not isinstance(theirs, ClippedSGD)
    assert [len(g["params"]) for g in ours.param_groups] == [
        len(g["params"]) for g in theirs.param_groups]
    rng = torch.Generator().manual_seed(1)
    clipped = 0
    for step in range(6):
        for p, q in zip(model.parameters(), twin.parameters()):
            g = torch.randn(p.shape, generator=rng) * (50.0 if step % 2 else 0.01)
            p.grad, q.grad = g.clone(), g.clone()
            clipped += int(g.norm() > cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
        ours.step()
        theirs.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert clipped > 0
    # Elsewhere (GPU, clipping off or by value) it is Detectron2's own optimizer.
    cfg.defrost()
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    assert not isinstance(Trainer.build_optimizer(cfg, model), ClippedSGD)


def test_export_mismatches_name_the_keys_that_differ(tmp_path: Path) -> None:
    from detection.data.export_coco import ExportParams

    cfg = setup_cfg(INSTANT)
    assert export_mismatches(cfg, tmp_path) == []  # no export there
    assert tuple(cfg.CMB.INTENSITY_PERCENTILES) == (0.0, 99.0)  # the configs' window
    params = ExportParams(context_offset=int(cfg.CMB.CONTEXT_OFFSET),
                          target_spacing=float(cfg.CMB.TARGET_SPACING), percentiles=(0.0, 99.0))
    (tmp_path / "export_meta.json").write_text(json.dumps({"params": params.as_dict()}))
    assert export_mismatches(cfg, tmp_path) == []
    cfg.defrost()
    cfg.CMB.INTENSITY_PERCENTILES = (1.0, 99.0)
    cfg.CMB.BIAS_DEGREE = 2
    msgs = export_mismatches(cfg, tmp_path)
    assert len(msgs) == 2
    assert "percentiles=[0.0, 99.0]" in msgs[1] and "CMB.INTENSITY_PERCENTILES" in msgs[1]
    assert "CMB.BIAS_DEGREE" in msgs[0]
    (tmp_path / "export_meta.json").write_text("{not json")
    assert "unreadable" in export_mismatches(cfg, tmp_path)[0]
