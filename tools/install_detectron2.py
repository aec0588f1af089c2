#!/usr/bin/env python
"""Install Detectron2 into the running Python environment (called by ``make install``).

Detectron2 has no official release on the package registry. The registry's
``pb1-detectron2==0.6`` source distribution is Detectron2 v0.6 without its C++
sources; we pin its sha256, give its ``_C`` extension an empty ``vision.cpp`` and
build it against the torch already installed (``--no-build-isolation``, because its
setup.py imports torch). The standard Mask R-CNN path only needs torchvision's
ROIAlign and NMS, so nothing this project uses is lost.

If ``import detectron2`` already works (for example a user's upstream build), this
script does nothing and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
EMPTY_VISION_CPP = """// Empty extension: the registry's source distribution ships no C++ sources.
// Mask R-CNN uses torchvision's ROIAlign and NMS, so no custom op is needed.
#include <torch/extension.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
"""


def detectron2_importable(python: str) -> bool:
    """True when ``import detectron2`` works in ``python`` (checked in a subprocess)."""
    proc = subprocess.run([python, "-c", "import detectron2"], capture_output=True)
    return proc.returncode == 0


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_logged(cmd: list[str], log) -> None:
    """Run ``cmd`` with its output appended to ``log``; raise on a non-zero exit."""
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)


def fail(log_path: Path, message: str, tail: int = 40) -> int:
    """Print ``message``, the log's path and its last lines; return an exit code."""
    print(f"[install_detectron2] ERROR: {message}", file=sys.stderr)
    print(f"[install_detectron2] full build log: {log_path}", file=sys.stderr)
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-tail:]
    except OSError:
        lines = []
    for line in lines:
        print(f"    {line}", file=sys.stderr)
    return 1


def install(python: str, log_path: Path, sdist: Path | None = None,
            pip_args: tuple[str, ...] = ()) -> int:
    """Download (or take ``sdist``), verify, patch, build and install the pinned sdist."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="d2-build-") as tmp, open(log_path, "w") as log:
        tmpdir = Path(tmp)
        if sdist is not None:
            if not sdist.is_file():
                return fail(log_path, f"{sdist}: no such source archive")
            archives = [sdist]
        else:
            print(f"[install_detectron2] downloading {SDIST_NAME}=={SDIST_VERSION} (source) ...")
            try:
                run_logged(
                    [python, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                     "--no-binary", ":all:", "-d", str(tmpdir),
                     f"{SDIST_NAME}=={SDIST_VERSION}"],
                    log,
                )
            except subprocess.CalledProcessError:
                log.flush()
                return fail(log_path, "download of the Detectron2 source distribution failed")
            archives = sorted(tmpdir.glob("*.tar.gz"))
        if len(archives) != 1:
            return fail(log_path, f"expected one source archive, found {archives}")
        archive = archives[0]
        got = sha256_of(archive)
        if got != SDIST_SHA256:
            log.write(f"sha256 mismatch: got {got}, expected {SDIST_SHA256}\n")
            log.flush()
            return fail(log_path, f"sha256 of {archive.name} is {got}, expected {SDIST_SHA256}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmpdir / "src", filter="data")
        roots = [p for p in (tmpdir / "src").iterdir() if (p / "setup.py").exists()]
        if len(roots) != 1:
            return fail(log_path, "unexpected layout of the source archive")
        root = roots[0]
        csrc = root / "detectron2" / "layers" / "csrc"
        csrc.mkdir(parents=True, exist_ok=True)
        (csrc / "vision.cpp").write_text(EMPTY_VISION_CPP)
        print("[install_detectron2] building and installing (about a minute on 2 cores) ...")
        try:
            run_logged(
                [python, "-m", "pip", "install", "--no-build-isolation", *pip_args, str(root)],
                log,
            )
        except subprocess.CalledProcessError:
            log.flush()
            return fail(log_path, "building Detectron2 failed")
    if not detectron2_importable(python):
        return fail(log_path, "Detectron2 installed but `import detectron2` still fails")
    print("[install_detectron2] Detectron2 v0.6 installed")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the environment to install into")
    parser.add_argument("--log", type=Path, default=None,
                        help="build log path (default: <env>/detectron2-build.log)")
    parser.add_argument("--force", action="store_true",
                        help="build even when detectron2 already imports")
    parser.add_argument("--sdist", type=Path, default=None,
                        help="use this local copy of the source archive (offline machines); "
                             "its sha256 is still checked")
    parser.add_argument("--no-deps", action="store_true",
                        help="install without Detectron2's dependencies (already present)")
    args = parser.parse_args(argv)
    if not args.force and detectron2_importable(args.python):
        print("[install_detectron2] `import detectron2` already works; nothing to do")
        return 0
    log_path = args.log or Path(sys.prefix) / "detectron2-build.log"
    return install(args.python, log_path, args.sdist, ("--no-deps",) if args.no_deps else ())


if __name__ == "__main__":
    sys.exit(main())
