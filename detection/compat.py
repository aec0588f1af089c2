"""Runtime shims that let Detectron2 v0.6 run with current Pillow, numpy and setuptools.

Imported first by :mod:`detection`, before anything touches Detectron2. Every shim
only fills in an attribute or module that is missing, so an environment where the
old API still exists (or an upstream Detectron2 that no longer needs it) is left
exactly as it was.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import sys
import types

import numpy as np
from PIL import Image

__all__ = ["apply"]


def _resource_filename(package_or_requirement: str, resource_name: str) -> str:
    """Minimal ``pkg_resources.resource_filename`` on top of :mod:`importlib.resources`."""
    return str(importlib.resources.files(package_or_requirement).joinpath(resource_name))


def apply() -> None:
    """Install the shims (idempotent)."""
    # Pillow >= 10 removed Image.LINEAR (default interp of detectron2.data.transforms).
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
    # numpy >= 1.24 removed np.int/np.float/np.str (data.build class histogram, sem-seg eval).
    for alias, builtin in (("int", int), ("float", float), ("str", str)):
        # Look in the module dict: hasattr() would trigger numpy's deprecation __getattr__.
        if alias not in vars(np):
            setattr(np, alias, builtin)
    # numpy 1.24-1.26 lack np.bool (structures.masks.polygons_to_bitmask); numpy 2 has it again.
    if "bool" not in vars(np):
        np.bool = np.bool_
    # setuptools >= 81 removed pkg_resources (imported by detectron2.model_zoo).
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = _resource_filename
        shim.__doc__ = "cmb-csvd shim: resource_filename only (setuptools >= 81 dropped it)."
        sys.modules["pkg_resources"] = shim


def fill_empty_extension() -> None:
    """Give an op-less ``detectron2._C`` the build-info functions ``collect_env`` calls.

    Not part of :func:`apply`: it imports detectron2 (and torch), which the light
    modules of :mod:`detection` must not pay for; :func:`detection.engine.setup_cfg`
    calls it before Detectron2's ``default_setup``.
    """
    try:
        import detectron2._C as ext
    except ImportError:  # no extension at all: collect_env reports that by itself
        return
    # The registry sdist is built with an empty vision.cpp: default_setup ->
    # collect_env_info calls _C.get_compiler_version / get_cuda_version.
    if not hasattr(ext, "get_compiler_version"):
        ext.get_compiler_version = lambda: "unknown (op-less _C extension)"
    if not hasattr(ext, "get_cuda_version"):
        ext.get_cuda_version = lambda: "not used (op-less _C extension)"
    if not hasattr(ext, "has_cuda"):
        ext.has_cuda = lambda: False


apply()
