"""Atomic output files: every writer in ``detection`` goes through a temporary file in
the target folder that is renamed onto the final name only once it is complete, so an
interrupted run never leaves a half-written output behind."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_output", "copy_atomic", "json_ready", "shown_path", "write_json_atomic",
           "write_text_atomic"]


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block
    succeeds (mode 0644, as ``mkstemp`` creates 0600), delete it when it raises.

    ``suffix`` (default: the name's suffixes, e.g. ``.nii.gz``) lets writers that pick
    the format from the name (nibabel, matplotlib) write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""
    path = Path(path)
    with atomic_output(path, ".tmp") as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    return path


def json_ready(x: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, tuples to lists, keys to str,
    NaN/inf to None (so the file is strict JSON), paths to str."""
    if isinstance(x, Mapping):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_ready(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` (through :func:`json_ready`: NaN/inf as null) as strict JSON to
    ``path`` atomically."""
    text = json.dumps(json_ready(obj), indent=indent, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically."""
    dst = Path(dst)
    with atomic_output(dst, ".tmp") as tmp:
        shutil.copyfile(src, tmp)
    return dst


def shown_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` when inside it, else its file name only: for results
    that are committed, which must not name folders of the machine they ran on."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path(root).resolve()))
    except ValueError:
        return p.name
