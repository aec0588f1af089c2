"""Mid-sagittal plane and mirror darkness on a synthetic head with a tilted midline."""

from __future__ import annotations

from detection import lesions as L
from detection.symmetry import Plane, midsagittal_plane, mirror_ratio

import numpy as np
import pytest

SHAPE = (96, 112, 48)
SPACING = (1.0, 1.0, 2.0)
CENTRE = np.array([50.0, 54.0, 46.0])  # world mm of the head's centre (off the grid centre)
YAW = np.deg2rad(6.0)
# Symmetric dark structures (template mm from the head centre, |x| mirrored) and one
# bleed on the left only.
NUCLEI = [(np.array([18.0, 6.0, 0.0]), 4.0), (np.array([8.0, -14.0, -8.0]), 3.0)]
BLEED = (np.array([-24.0, -20.0, 10.0]), 2.5)
MIDLINE_BLEED = (np.array([1.5, 30.0, 0.0]), 2.0)  # its mirror image overlaps itself


def _rot_z(a: float) -> np.ndarray:
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def synthetic_head(seed: int = 0):
    """(image, brain, affine, true plane, template->world) of a head turned by YAW."""
    affine = np.diag([*SPACING, 1.0])
    idx = np.indices(SHAPE).reshape(3, -1).T.astype(np.float64)
    world = idx * SPACING
    rot = _rot_z(YAW)
    t = (world - CENTRE) @ rot  # template coordinates (rot^T (w - c))
    brain = ((t[:, 0] / 38) ** 2 + (t[:, 1] / 48) ** 2 + (t[:, 2] / 40) ** 2) <= 1
    img = np.full(len(t), 100.0)
    ax = np.abs(t[:, 0])
    # symmetric anatomy: bright "ventricles", a darker cortex band
    img[((ax - 6) / 4) ** 2 + (t[:, 1] / 16) ** 2 + ((t[:, 2] - 8) / 8) ** 2 <= 1] = 150.0
    outer = ((t[:, 0] / 38) ** 2 + (t[:, 1] / 48) ** 2 + (t[:, 2] / 40) ** 2)
    img[(outer > 0.75) & brain] = 85.0
    for c, r in NUCLEI:
        d = np.sqrt((ax - c[0]) ** 2 + (t[:, 1] - c[1]) ** 2 + (t[:, 2] - c[2]) ** 2)
        img[d <= r] = 40.0
    for c, r in (BLEED, MIDLINE_BLEED):
        img[np.linalg.norm(t - c, axis=1) <= r] = 20.0
    img = img.reshape(SHAPE) * brain.reshape(SHAPE)
    img = img + np.random.default_rng(seed).normal(0, 5.0, SHAPE)
    normal = rot @ np.array([1.0, 0.0, 0.0])
    plane = Plane(normal, float(normal @ CENTRE))
    return img.astype(np.float32), brain.reshape(SHAPE), affine, plane, rot


def _label_ball(centre_world: np.ndarray, radius: float, lid: int, labels: np.ndarray) -> None:
    idx = np.indices(SHAPE).reshape(3, -1).T * SPACING
    inside = (np.linalg.norm(idx - centre_world, axis=1) <= radius).reshape(SHAPE)
    labels[inside] = lid


def test_plane_found_and_reflection_is_an_involution():
    img, brain, affine, truth, _ = synthetic_head()
    est = midsagittal_plane(img, brain, affine)
    angle = np.rad2deg(np.arccos(min(1.0, abs(float(est.normal @ truth.normal)))))
    assert angle < 1.0
    assert abs(est.distance(CENTRE[None])[0]) < 1.0
    pts = np.random.default_rng(1).uniform(0, 90, (5, 3))
    assert np.allclose(est.reflect(est.reflect(pts)), pts)


def test_twin_structures_score_high_a_bleed_low():
    img, brain, affine, truth, rot = synthetic_head()
    plane = midsagittal_plane(img, brain, affine)
    labels = np.zeros(SHAPE, dtype=np.int32)
    (c_gp, r_gp), (c_rn, r_rn) = NUCLEI
    _label_ball(CENTRE + rot @ c_gp, r_gp, 1, labels)                 # right "pallidum"
    _label_ball(CENTRE + rot @ (c_rn * [-1, 1, 1]), r_rn, 2, labels)  # left "red nucleus"
    _label_ball(CENTRE + rot @ BLEED[0], BLEED[1], 3, labels)         # the bleed
    _label_ball(CENTRE + rot @ MIDLINE_BLEED[0], MIDLINE_BLEED[1], 4, labels)
    ratio = mirror_ratio(labels, img, brain, affine, plane)
    assert ratio[1] > 0.8 and ratio[2] > 0.8
    assert ratio[3] < 0.2
    assert ratio[4] < 0.2  # near the midline: the search meets the lesion itself, not a twin
    # Without the search the twin of a structure must sit exactly at the mirror image:
    # a plane 8 mm off misses it.
    off = Plane(plane.normal, plane.offset + 8.0)
    assert mirror_ratio(labels, img, brain, affine, off, search_mm=1.0)[1] < 0.5

    rej = L.reject_implausible(labels, affine, brain_mask=brain, image=img,
                               max_mirror_ratio=0.6, mirror_plane=plane)
    assert sorted(rej.rejected["lesion_id"]) == [1, 2]
    assert all("bilateral mimic" in r for r in rej.rejected["reason"])
    assert rej.kept_ids.tolist() == [3, 4]
    # off by default
    assert L.reject_implausible(labels, affine, brain_mask=brain, image=img).lesions.n == 4


def test_errors_name_the_problem():
    img, brain, affine, _, _ = synthetic_head()
    with pytest.raises(ValueError, match="empty"):
        midsagittal_plane(img, np.zeros_like(brain), affine)
    with pytest.raises(ValueError, match="shape"):
        midsagittal_plane(img[:-1], brain, affine)
    plane = Plane(np.array([1.0, 0, 0]), 48.0)
    with pytest.raises(ValueError, match="grid"):
        mirror_ratio(np.zeros(SHAPE, np.int32), img[:-1], brain, affine, plane)
