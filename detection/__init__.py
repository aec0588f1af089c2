"""cmb-csvd detection: SWI volumes, COCO export and the Detectron2 Mask R-CNN.

Everything that touches Detectron2 lives in this package. ``compat`` is imported
first so that Detectron2 v0.6 works with current Pillow, numpy and setuptools.
"""

from . import compat  # noqa: F401  (must run before any detectron2 import)

__all__ = ["compat"]
