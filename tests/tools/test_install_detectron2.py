"""tools/install_detectron2.py: pinned checksum, clear failure with the log's path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "install_detectron2.py"


def _load():
    spec = importlib.util.spec_from_file_location("install_detectron2", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_existing_detectron2_is_kept(capsys) -> None:
    mod = _load()
    assert mod.main(["--python", sys.executable]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_checksum_mismatch_fails_with_log_path(tmp_path: Path, capsys) -> None:
    mod = _load()
    fake = tmp_path / "pb1-detectron2-0.6.tar.gz"
    fake.write_bytes(b"not the pinned archive")
    log = tmp_path / "build.log"
    rc = mod.main(["--python", sys.executable, "--force", "--sdist", str(fake),
                   "--log", str(log)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "sha256" in err and mod.SDIST_SHA256 in err
    assert str(log) in err and log.is_file()


def test_missing_local_archive(tmp_path: Path, capsys) -> None:
    mod = _load()
    rc = mod.main(["--python", sys.executable, "--force", "--sdist", str(tmp_path / "nope.tgz"),
                   "--log", str(tmp_path / "b.log")])
    assert rc == 1
    assert "no such source archive" in capsys.readouterr().err
