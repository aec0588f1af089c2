"""cmb-csvd MIL: patient-level CSVD classification from lesion bags.

Standalone: depends on torch, numpy, pandas and scikit-learn, never on Detectron2
or on :mod:`detection`.
"""

CLASSES: tuple[str, ...] = ("aSVD", "CAA", "CADASIL")

__all__ = ["CLASSES"]
