"""The compat shims make Detectron2 v0.6 importable with current libraries."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image


def test_detectron2_modules_import() -> None:
    code = (
        "import detection, detectron2.data, detectron2.engine, detectron2.evaluation, "
        "detectron2.model_zoo; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_shims_do_not_override_existing_attributes() -> None:
    import detection.compat as compat

    before = Image.BILINEAR
    compat.apply()
    assert Image.LINEAR == before
    assert np.bool is np.bool_  # numpy 2 has np.bool again: untouched
    assert int is int


def test_class_histogram_and_bitmask_helpers_work() -> None:
    import detection  # noqa: F401

    from detectron2.structures.masks import polygons_to_bitmask

    mask = polygons_to_bitmask([np.array([0, 0, 8, 0, 8, 8, 0, 8], dtype=float)], 10, 10)
    assert mask.dtype == bool and mask.sum() > 40


def test_import_detection_stays_light() -> None:
    """The numpy-only modules of ``detection`` must not drag in detectron2 or torch."""
    code = (
        "import sys, detection, detection.lesions; "
        "print(any(m.split('.')[0] in ('detectron2', 'torch') for m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
