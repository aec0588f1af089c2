"""cmb-csvd MIL: patient-level CSVD classification from lesion bags.

Standalone: depends on torch, numpy, pandas and scikit-learn, never on Detectron2
or on :mod:`detection`.

Modules (imported on demand, nothing heavy happens at import time):

- :mod:`mil.bagio` -- bag file format (``save_bag`` / ``load_bag``) and the index CSV.
- :mod:`mil.dataset` -- bag dataset, bag-level summary features, padding collation.
- :mod:`mil.model` -- gated-attention MIL network (Ilse et al. 2018).
- :mod:`mil.train` -- cross-validation, final model, external evaluation, outputs.
- :mod:`mil.metrics` -- classification metrics with bootstrap CIs, figures.
- :mod:`mil.baseline` -- rule-based (Boston v2.0 style) reference classifier.
- :mod:`mil.synthetic_bags` -- synthetic bags with known answers (tests, demo).
"""

CLASSES: tuple[str, ...] = ("aSVD", "CAA", "CADASIL")

#: Instance feature columns the detector side writes (any subset may be present;
#: always addressed by name, never by position).
FEATURE_NAMES: tuple[str, ...] = (
    "score",
    "volume_mm3",
    "diameter_mm",
    "elongation",
    "contrast",
    "n_slices",
    "region_lobar",
    "region_deep",
    "region_infratentorial",
    "depth_mm",
    "pos_lr",
    "pos_ap",
    "pos_si",
)

#: MARS-style region one-hot columns, in a fixed order.
REGION_COLUMNS: tuple[str, ...] = ("region_lobar", "region_deep", "region_infratentorial")

__all__ = ["CLASSES", "FEATURE_NAMES", "REGION_COLUMNS"]
