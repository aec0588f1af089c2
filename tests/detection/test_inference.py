"""Volume inference: mask pasting, grid mapping, and a whole-volume run on CPU."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import detection  # noqa: F401
from detection.engine import setup_cfg
from detection.inference import (
    MirroredPassTTA,
    VolumePredictor,
    image_mask_to_ras_plane,
    paste_mask_in_box,
)

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

INSTANT = (Path(__file__).resolve().parents[2] / "configs" / "quick_schedules"
           / "cmb_R_18_FPN_instant_test.yaml")


def test_paste_in_box_matches_detectron2_full_image_paste() -> None:
    rng = np.random.default_rng(0)
    h, w = 60, 80
    probs = rng.uniform(0, 1, (3, 28, 28)).astype(np.float32)
    probs[:, 8:20, 8:20] = 0.95
    boxes = np.array([[10.2, 5.7, 30.9, 22.1], [50, 40, 62, 58], [70.5, 50.5, 85, 65]])
    ref = paste_masks_in_image(torch.from_numpy(probs), Boxes(torch.from_numpy(boxes)),
                               (h, w), threshold=0.5).numpy()
    for k in range(3):
        rs, cs, m = paste_mask_in_box(probs[k], boxes[k], h, w)
        full = np.zeros((h, w), dtype=bool)
        full[rs, cs] = m
        # Same pixel sampling as Detectron2 up to interpolation at the 0.5 boundary.
        disagreement = np.logical_xor(full, ref[k]).sum()
        assert disagreement <= 0.03 * max(ref[k].sum(), 1) + 2
        assert not full[:, : int(boxes[k][0])].any()  # nothing outside its box


def test_image_mask_to_ras_plane_orientation_and_tiny_lesions() -> None:
    nx, ny = 10, 12
    mask = np.zeros((24, 20), dtype=bool)  # (H, W) at half the voxel size
    mask[0:2, 18:20] = True  # anterior row first, rightmost column
    plane = image_mask_to_ras_plane(mask, nx, ny)
    assert plane.shape == (nx, ny)
    assert plane[nx - 1, ny - 1] and plane.sum() == 1  # right-anterior voxel
    tiny = np.zeros((24, 20), dtype=bool)
    tiny[5, 5] = True  # a quarter of a voxel: kept as its best voxel
    assert image_mask_to_ras_plane(tiny, nx, ny).sum() == 1


@pytest.fixture(scope="module")
def instant_weights(tmp_path_factory) -> tuple[object, Path]:
    torch.manual_seed(0)
    cfg = setup_cfg(INSTANT, ["CMB.DATA_ROOT", "/nonexistent", "CMB.TARGET_SPACING", "1.0",
                              "CMB.INFER.SCORE_THRESH", "0.0"])
    model = build_model(cfg)
    out = tmp_path_factory.mktemp("w")
    DetectionCheckpointer(model, save_dir=str(out)).save("model")
    return cfg, out / "model.pth"


def test_volume_predictor_writes_outputs_on_the_input_grid(instant_weights, tmp_path) -> None:
    cfg, weights = instant_weights
    rng = np.random.default_rng(1)
    data = rng.normal(100, 5, (40, 48, 10)).astype(np.float32)
    data[8:32, 8:40, 2:8] += 50  # a "brain"
    data[15:18, 20:23, 4:6] = 5  # a dark focus
    # LPS-like orientation (x flipped) with 1 x 1 x 2 mm voxels: output must match it.
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [20, -24, -10]
    swi = tmp_path / "swi.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), swi)
    predictor = VolumePredictor(cfg, str(weights))
    pred = predictor(swi, patient_id="P1")
    out = pred.write(tmp_path / "P1")
    img = nib.load(out / "cmb_pred.nii.gz")
    assert img.shape == data.shape
    assert np.allclose(img.affine, affine)
    labels = np.asarray(img.dataobj)
    table = pd.read_csv(out / "lesions.csv")
    assert sorted(set(np.unique(labels)) - {0}) == sorted(table["lesion_id"].tolist())
    assert (out / "overlay.png").stat().st_size > 0
    assert pred.n_slices <= data.shape[2]
    assert not list(out.glob(".*"))  # no temporary files left


def test_fast_path_keeps_the_plain_models_detections(instant_weights) -> None:
    """Raised ROI score threshold + channels-last: the instances >= INFER.SCORE_THRESH
    are those of the plain model (Detectron2 defaults) filtered afterwards."""
    cfg, weights = instant_weights
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (3, 96, 80), dtype=np.uint8)
    img[:, 40:46, 30:36] = 5
    plain = build_model(cfg)
    plain.eval()
    DetectionCheckpointer(plain).load(str(weights))
    with torch.inference_mode():
        ref = plain.inference([{"image": torch.as_tensor(img), "height": 96, "width": 80}],
                              do_postprocess=False)[0]
    assert len(ref) > 4, "the random model should give some instances to compare"
    # a threshold in the widest gap between the middle scores (no score near it)
    s = ref.scores.sort(descending=True).values
    lo, hi = len(s) // 4, 3 * len(s) // 4
    k = lo + int(torch.argmax(s[lo:hi] - s[lo + 1:hi + 1]))
    thresh = float((s[k] + s[k + 1]) / 2)
    cfg2 = cfg.clone()
    cfg2.defrost()
    cfg2.CMB.INFER.SCORE_THRESH = thresh
    fast = VolumePredictor(cfg2, str(weights))
    assert fast.model.roi_heads.box_predictor.test_score_thresh == thresh
    with torch.inference_mode():
        got = fast.model.inference([fast._to_input(img.transpose(1, 2, 0))],
                                   do_postprocess=False)[0]
    keep = ref.scores >= thresh
    assert 0 < int(keep.sum()) == len(got)
    torch.testing.assert_close(got.scores, ref.scores[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor[keep],
                               atol=1e-2, rtol=0)


def test_fuse_flip_instances_means_matched_and_halves_unmatched() -> None:
    from detection.inference import fuse_flip_instances

    def box(y0: int, x0: int, s: int = 4) -> np.ndarray:
        m = np.zeros((20, 20), dtype=bool)
        m[y0:y0 + s, x0:x0 + s] = True
        return m

    a = [box(2, 2), box(10, 10)]
    b = [box(2, 3), box(15, 2)]  # first overlaps a[0] (IoU 0.6), second is new
    masks, scores = fuse_flip_instances(a, np.array([0.9, 0.6]), b, np.array([0.7, 0.8]))
    assert scores.tolist() == pytest.approx([0.8, 0.4, 0.3])
    assert np.array_equal(masks[0], a[0])  # the higher-scoring member's mask
    assert np.array_equal(masks[1], b[1]) and np.array_equal(masks[2], a[1])
    # nothing in one pass: everything at half score; nothing anywhere: empty
    m2, s2 = fuse_flip_instances(a, np.array([0.9, 0.6]), [], np.zeros(0))
    assert s2.tolist() == pytest.approx([0.45, 0.3]) and len(m2) == 2
    m3, s3 = fuse_flip_instances([], np.zeros(0), [], np.zeros(0))
    assert m3 == [] and s3.shape == (0,)


def _focus_volume(tmp_path: Path) -> Path:
    """A small noisy "brain" with one dark focus, 1 x 1 x 2 mm voxels, saved as NIfTI."""
    rng = np.random.default_rng(1)
    data = rng.normal(100, 5, (40, 48, 10)).astype(np.float32)
    data[8:32, 8:40, 2:8] += 50
    data[15:18, 20:23, 4:6] = 5
    swi = tmp_path / "swi.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), swi)
    return swi


def test_flip_tta_runs_both_passes(instant_weights, tmp_path) -> None:
    cfg, weights = instant_weights
    cfg2 = cfg.clone()
    cfg2.defrost()
    cfg2.CMB.INFER.TTA_HFLIP = True
    cfg2.CMB.INFER.SCORE_THRESH = 0.2
    swi = _focus_volume(tmp_path)
    tta = VolumePredictor(cfg2, str(weights))
    assert tta.model.roi_heads.box_predictor.test_score_thresh == pytest.approx(0.1)
    calls = []
    inner = tta.model.inference

    def counting(inputs, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(len(inputs))
        return inner(inputs, **kw)

    tta.model.inference = counting
    pred = tta(swi, patient_id="P1")
    assert len(calls) % 2 == 0  # each batch: plain pass, then mirrored pass
    assert sum(calls) == 2 * pred.n_slices
    assert (pred.table["max_score"] >= 0.2).all()


def test_window_masks_round_trip_flip_and_iou_as_full_slices() -> None:
    """Window masks (tight, or padded like a pasted box with empty margins) give the
    full-slice mask back, mirror like it, and their IoU is the full-slice IoU."""
    from detection.inference import WindowMask, _mask_box, _window_iou, as_full, as_window

    rng = np.random.default_rng(0)

    def padded(m: np.ndarray) -> WindowMask:  # a paste window: box with empty margins
        box = _mask_box(m)
        if box is None:
            return WindowMask(3, 4, np.zeros((2, 5), dtype=bool), m.shape)
        r0, c0 = max(box[0] - 2, 0), max(box[2] - 1, 0)
        r1, c1 = min(box[1] + 1, m.shape[0]), min(box[3] + 3, m.shape[1])
        return WindowMask(r0, c0, m[r0:r1, c0:c1].copy(), m.shape)

    for _ in range(50):
        a = np.zeros((30, 40), dtype=bool)
        b = np.zeros((30, 40), dtype=bool)
        for m in (a, b):
            if rng.random() < 0.9:  # sometimes empty
                r, c = rng.integers(0, 25), rng.integers(0, 35)
                m[r:r + rng.integers(1, 6), c:c + rng.integers(1, 6)] = True
        union = int((a | b).sum())
        full = int((a & b).sum()) / union if union else 0.0  # over the whole slice
        for wa, wb in ((as_window(a), as_window(b)), (padded(a), padded(b)),
                       (padded(a), as_window(b))):
            assert _window_iou(wa, wb) == full
            assert np.array_equal(as_full(wa), a) and np.array_equal(wb.full(), b)
            assert np.array_equal(wa.flip_lr().full(), a[:, ::-1])
    assert as_window(np.zeros((3, 3), dtype=bool)).window.size == 0
    one = np.zeros((5, 5), dtype=bool)
    one[1:3, 2] = True
    w = as_window(one)
    assert w.bounds == (1, 3, 2, 3) and as_window(w) is w


def test_fuse_reads_each_pass_down_to_its_floor() -> None:
    """The pass floor decides whether a weak mirrored instance pairs up or counts as 0."""
    m = np.zeros((20, 20), dtype=bool)
    m[5:9, 5:9] = True
    other = np.zeros_like(m)
    other[12:15, 12:15] = True
    passes = [(3, ([m], np.array([0.9])), ([m.copy(), other], np.array([0.15, 0.15])))]
    [(z, masks, scores)] = VolumePredictor.fuse(passes, 0.1)
    assert z == 3 and scores.tolist() == pytest.approx([0.525, 0.075])
    assert np.array_equal(masks[0], m) and np.array_equal(masks[1], other)
    [(_, masks, scores)] = VolumePredictor.fuse(passes, 0.2)
    assert scores.tolist() == pytest.approx([0.45]) and len(masks) == 1
    # without a mirrored pass the floor only filters
    [(_, masks, scores)] = VolumePredictor.fuse([(0, ([m, other], np.array([0.9, 0.15])),
                                                   None)], 0.2)
    assert scores.tolist() == pytest.approx([0.9]) and np.array_equal(masks[0], m)


def test_tta_pass_thresh_is_checked(instant_weights) -> None:
    cfg, weights = instant_weights
    bad = cfg.clone()
    bad.defrost()
    bad.CMB.INFER.TTA_HFLIP = True
    bad.CMB.INFER.TTA_PASS_THRESH = 0.9
    with pytest.raises(ValueError, match="TTA_PASS_THRESH"):
        VolumePredictor(bad, str(weights))


def test_candidate_threshold_leaves_the_fused_lesions_alone(instant_weights, tmp_path) -> None:
    """With the mirrored pass, a weak mirrored twin (0.15) of a 0.9 instance pairs up for
    the candidates (floor 0.025: mean 0.525) but not for the lesions (floor 0.25: 0.45 <
    0.5), whether or not candidates are asked for."""
    cfg, weights = instant_weights
    swi = _focus_volume(tmp_path)

    def crafted(prep, slices=None, progress=False):  # noqa: ANN001, ANN202
        h, w = prep.images.shape[1:]
        nx, ny = 40, 48
        rr, cc = np.mgrid[0:h, 0:w]
        x = (cc + 0.5) * nx / w - 0.5  # export layout -> RAS voxel (export_meta.json)
        y = ny - 1 - ((rr + 0.5) * ny / h - 0.5)
        focus = (x >= 14.5) & (x < 17.5) & (y >= 19.5) & (y < 22.5)
        return [(4, ([focus], np.array([0.9])), ([focus.copy()], np.array([0.15])))]

    outs = []
    for cand in (0.0, 0.05):
        c = cfg.clone()
        c.defrost()
        c.CMB.INFER.SCORE_THRESH = 0.5
        c.CMB.INFER.TTA_HFLIP = True
        c.CMB.INFER.CANDIDATE_THRESH = cand
        vp = VolumePredictor(c, str(weights))
        vp.detect_passes = crafted
        outs.append(vp(swi, patient_id="P1"))
    plain, with_c = outs
    assert len(plain.table) == 0 and np.array_equal(plain.labels_ras, with_c.labels_ras)
    assert len(with_c.table) == 0
    assert with_c.candidates["max_score"].tolist() == pytest.approx([0.525])


@pytest.mark.parametrize("tta", [False, True])
def test_candidates_below_the_operating_threshold(instant_weights, tmp_path, tta) -> None:
    """CANDIDATE_THRESH adds candidates.csv and leaves the operating outputs unchanged,
    with the mirrored pass too (whose fusion reads each pass down to a floor)."""
    cfg, weights = instant_weights
    swi = _focus_volume(tmp_path)
    base = cfg.clone()
    base.defrost()
    base.CMB.INFER.SCORE_THRESH = 0.5
    base.CMB.INFER.TTA_HFLIP = tta
    plain = VolumePredictor(base, str(weights))(swi, patient_id="P1")
    with_c = base.clone()
    with_c.CMB.INFER.CANDIDATE_THRESH = 0.05
    pred = VolumePredictor(with_c, str(weights))(swi, patient_id="P1")
    assert np.array_equal(pred.labels_ras, plain.labels_ras)
    pd.testing.assert_frame_equal(pred.table, plain.table)
    cands = pred.candidates
    assert plain.candidates is None and cands is not None
    assert len(cands) > 0  # (merging lower-scoring slices may join or reject lesions)
    assert (cands["max_score"] >= 0.05).all()
    out = pred.write(tmp_path / "P1", overlay=False)
    assert (out / "candidates.csv").is_file()
    assert not (plain.write(tmp_path / "P0", overlay=False) / "candidates.csv").exists()


def test_zoom_and_intensity_window_follow_the_config(instant_weights, tmp_path) -> None:
    cfg, weights = instant_weights
    swi = _focus_volume(tmp_path)
    plain = VolumePredictor(cfg, str(weights))
    zcfg = cfg.clone()
    zcfg.defrost()
    zcfg.CMB.INFER.ZOOM = 2.0
    zoomed = VolumePredictor(zcfg, str(weights))
    assert zoomed.params.target_spacing == pytest.approx(cfg.CMB.TARGET_SPACING / 2)
    seen = []
    inner = zoomed.model.inference

    def shapes(inputs, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.extend(tuple(x["image"].shape[1:]) for x in inputs)
        return inner(inputs, **kw)

    zoomed.model.inference = shapes
    wcfg = cfg.clone()
    wcfg.defrost()
    wcfg.CMB.INTENSITY_PERCENTILES = (2.0, 99.5)
    assert plain.params.percentiles == tuple(cfg.CMB.INTENSITY_PERCENTILES)
    assert VolumePredictor(wcfg, str(weights)).params.percentiles == (2.0, 99.5)
    pred = zoomed(swi, patient_id="P1")
    # 40 x 48 voxels of 1 mm at TARGET_SPACING 1.0 / zoom 2: 96 rows (y) x 80 columns (x)
    assert seen and set(seen) == {(96, 80)}
    assert pred.labels_ras.shape == plain(swi, patient_id="P1").labels_ras.shape
    out = pred.write(tmp_path / "P1", overlay=False)
    assert nib.load(out / "cmb_pred.nii.gz").shape == (40, 48, 10)
    bad = cfg.clone()
    bad.defrost()
    bad.CMB.INFER.ZOOM = -1.0
    with pytest.raises(ValueError, match="ZOOM"):
        VolumePredictor(bad, str(weights))
    bad.CMB.INFER.ZOOM = 1.5
    bad.CMB.TARGET_SPACING = 0.0
    with pytest.raises(ValueError, match="TARGET_SPACING"):
        VolumePredictor(bad, str(weights))


def test_parenchyma_surround_rule_follows_the_config(instant_weights, tmp_path) -> None:
    """CMB.INFER.MIN_PARENCHYMA_SURROUND rejects a focus inside a dark nucleus, keeps one in
    plain tissue, and 0 turns the rule off."""
    from detection.data.volume import load_case

    cfg, weights = instant_weights
    i, j = np.mgrid[:60, :60]
    data = np.full((60, 60, 8), 100.0, np.float32)
    data[((i - 40) ** 2 + (j - 30) ** 2 <= 64)[:, :, None] & (np.arange(8) >= 2)
         & (np.arange(8) <= 5)] = 40.0  # 16 mm iron-rich nucleus, slices 2-5
    foci = [((i - 15) ** 2 + (j - 30) ** 2 <= 2), ((i - 40) ** 2 + (j - 30) ** 2 <= 2)]
    for f in foci:
        data[:, :, 3:5][f] = 10.0
    swi, brain = tmp_path / "swi.nii.gz", tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), swi)
    nib.save(nib.Nifti1Image(np.ones(data.shape, np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), brain)
    case = load_case(swi, None, brain)
    # slice detections in the export layout (rows anterior -> posterior): RAS plane.T[::-1]
    dets = [(z, [f.T[::-1].copy() for f in foci], np.array([0.9, 0.9])) for z in (3, 4)]
    out = {}
    for share in (0.5, 0.0):
        c = cfg.clone()
        c.defrost()
        c.CMB.INFER.MIN_PARENCHYMA_SURROUND = share
        rej, table = VolumePredictor(c, str(weights))._merge(dets, case.swi, case.brain, 0.5, "P")
        out[share] = (table, rej.rejected)
    table, rejected = out[0.5]
    assert len(table) == 1 and table["i"].round().tolist() == [15]
    assert rejected["reason"].str.startswith("not surrounded by parenchyma").tolist() == [True]
    assert len(out[0.0][0]) == 2 and out[0.0][1].empty


def test_mirror_rule_follows_the_config(instant_weights, tmp_path, caplog) -> None:
    """CMB.INFER.MAX_MIRROR_RATIO rejects a focus on one of two mirror-image nuclei, keeps a
    focus without a twin, estimates the midline once per volume, and 0 turns it off."""
    from detection.data.volume import load_case

    cfg, weights = instant_weights
    i, j = np.mgrid[:60, :64]
    brain2d = ((i - 29.5) / 27) ** 2 + ((j - 31.5) / 30) ** 2 <= 1
    data = np.where(brain2d[:, :, None], 100.0, 0.0).repeat(8, axis=2).astype(np.float32)
    ventricles = (((np.abs(i - 29.5) - 6) / 3) ** 2 + ((j - 36) / 10) ** 2) <= 1
    data[ventricles] = 150.0
    nuclei = (np.abs(i - 29.5) - 14.5) ** 2 + (j - 24) ** 2 <= 6  # x = 15 and 44
    data[:, :, 2:6][nuclei] = 45.0
    focus_nucleus = (i - 15) ** 2 + (j - 24) ** 2 <= 2
    focus_alone = (i - 20) ** 2 + (j - 48) ** 2 <= 2
    data[:, :, 3:5][focus_alone] = 45.0
    data += np.random.default_rng(0).normal(0, 2.0, data.shape).astype(np.float32)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    swi, brain = tmp_path / "swi.nii.gz", tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), swi)
    nib.save(nib.Nifti1Image(np.repeat(brain2d[:, :, None], 8, 2).astype(np.uint8), aff), brain)
    case = load_case(swi, None, brain)
    foci = [focus_nucleus, focus_alone]
    dets = [(z, [f.T[::-1].copy() for f in foci], np.array([0.9, 0.9])) for z in (3, 4)]
    out = {}
    for ratio in (0.9, 0.0):
        c = cfg.clone()
        c.defrost()
        c.CMB.INFER.MIN_PARENCHYMA_SURROUND = 0.0
        c.CMB.INFER.MAX_MIRROR_RATIO = ratio
        vp = VolumePredictor(c, str(weights))
        rej, table = vp._merge(dets, case.swi, case.brain, 0.5, "P")
        out[ratio] = (table, rej.rejected, vp)
    table, rejected, vp = out[0.9]
    assert table["i"].round().tolist() == [20]
    assert rejected["reason"].str.startswith("bilateral mimic").tolist() == [True]
    plane = vp._plane_cache[2]
    assert abs(abs(plane.normal[0]) - 1) < 1e-3 and vp._mirror_plane(case.swi, case.brain) is plane
    # Another volume (the same head 6 mm to the left) gets its own plane.
    shifted = case.swi.data.copy()
    moved = dataclasses.replace(case.swi, data=np.roll(shifted, -6, axis=0))
    other = vp._mirror_plane(moved, np.roll(case.brain, -6, axis=0))
    assert other is not plane and abs(abs(other.offset - plane.offset) - 6.0) < 1.0
    assert len(out[0.0][0]) == 2 and out[0.0][1].empty and out[0.0][2]._plane_cache is None
    # A brain mask too small for a midline: the rule is skipped for that volume, with a warning.
    tiny = np.zeros_like(case.brain)
    tiny[28:31, 30:33, 3] = True
    with caplog.at_level(logging.WARNING, logger="detection.inference"):
        assert vp._mirror_plane(case.swi, tiny) is None
    assert "no mid-sagittal plane" in caplog.text


class _DarkSpotModel(torch.nn.Module):
    """Stand-in detector: one instance per dark spot (grey < 100), scored 0.9 in the left
    half of the image and 0.5 in the right half, plus a spurious 0.3 instance in the
    top-left corner of every image it sees."""

    def inference(self, batched_inputs):
        out = []
        for x in batched_inputs:
            grey = x["image"][1]
            h, w = grey.shape
            dark = grey < 100
            masks, scores = [], []
            for c0 in (0, w // 2):  # one spot per half in these tests
                m = torch.zeros((h, w), dtype=torch.bool)
                m[:, c0:c0 + w // 2] = dark[:, c0:c0 + w // 2]
                if m.any():
                    masks.append(m)
                    scores.append(0.9 if c0 == 0 else 0.5)
            corner = torch.zeros((h, w), dtype=torch.bool)
            corner[0:3, 0:3] = True
            masks.append(corner)
            scores.append(0.3)
            inst = Instances((h, w))
            inst.pred_masks = torch.stack(masks)
            inst.pred_boxes = Boxes(torch.stack([_tight_box(m) for m in masks]))
            inst.scores = torch.tensor(scores)
            inst.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
            out.append({"instances": inst})
        return out


def _tight_box(m: torch.Tensor) -> torch.Tensor:
    rows = torch.nonzero(m.any(1))[:, 0]
    cols = torch.nonzero(m.any(0))[:, 0]
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)


def test_mirrored_pass_tta_fuses_the_passes_like_the_volume_predictor() -> None:
    """Each spot is found in both passes (left 0.9 / right 0.5 -> mean 0.7, back at its own
    place with its own box); the corner artefact of each pass lands on opposite corners,
    so each is unmatched and keeps half its score."""
    cfg = setup_cfg(Path(__file__).resolve().parents[2] / "configs" / "CMB-RCNN-Lite-FPN-cpu.yaml")
    h, w = 20, 40
    img = torch.full((3, h, w), 200, dtype=torch.uint8)
    img[:, 5:9, 6:9] = 0  # left spot
    img[:, 10:13, 28:33] = 50  # right spot
    tta = MirroredPassTTA(cfg, _DarkSpotModel()).eval()
    inst = tta([{"image": img, "height": h, "width": w}])[0]["instances"]
    assert len(inst) == 4
    assert inst.scores.tolist() == pytest.approx([0.7, 0.7, 0.15, 0.15])
    spots = {int(torch.nonzero(m.any(0))[0, 0]): (m, b) for m, b in
             zip(inst.pred_masks[:2], inst.pred_boxes.tensor[:2])}
    assert sorted(spots) == [6, 28]
    assert torch.equal(spots[6][0], img[0] == 0)  # each spot back at its own place
    assert torch.equal(spots[28][0], img[0] == 50)
    corners = {tuple(_tight_box(m).tolist()) for m in inst.pred_masks[2:]}
    assert corners == {(0.0, 0.0, 3.0, 3.0), (w - 3.0, 0.0, float(w), 3.0)}
    for m, b in zip(inst.pred_masks, inst.pred_boxes.tensor):
        assert torch.equal(b, _tight_box(m))
    # Pass instances under the volume predictor's lowest floor are left out.
    tta.floor = 0.35
    inst = tta([{"image": img, "height": h, "width": w}])[0]["instances"]
    assert inst.scores.tolist() == pytest.approx([0.7, 0.7])


def test_mask_threshold_grows_masks_without_changing_detections(instant_weights,
                                                                tmp_path) -> None:
    """CMB.INFER.MASK_THRESH binarises the pasted mask probabilities: a lower value gives
    the same instances (scores, boxes) with masks that contain the 0.5 ones."""
    from detection.data.export_coco import prepare_case
    from detection.data.volume import load_case

    cfg, weights = instant_weights
    swi = _focus_volume(tmp_path)
    passes = {}
    for t in (0.5, 0.3):
        c = cfg.clone()
        c.defrost()
        c.CMB.INFER.MASK_THRESH = t
        vp = VolumePredictor(c, str(weights))
        assert vp.mask_thresh == t
        prep = prepare_case(load_case(swi, None, None), vp.params)
        passes[t] = vp.detect_passes(prep)
    n_inst = grown = 0
    for (z5, (m5, s5), _), (z3, (m3, s3), _) in zip(passes[0.5], passes[0.3], strict=True):
        assert z5 == z3
        np.testing.assert_array_equal(s5, s3)
        for a, b in zip(m5, m3, strict=True):
            full_a, full_b = a.full(), b.full()
            assert not (full_a & ~full_b).any()  # every 0.5 pixel is kept at 0.3
            grown += int(full_b.sum() > full_a.sum())
            n_inst += 1
    assert n_inst > 0 and grown > 0
    for bad in (0.0, 1.0, -0.2):
        c = cfg.clone()
        c.defrost()
        c.CMB.INFER.MASK_THRESH = bad
        with pytest.raises(ValueError, match="MASK_THRESH"):
            VolumePredictor(c, str(weights))
