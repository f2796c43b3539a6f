"""Atomic writes: every file goes to a temporary name in its folder and is renamed over the
target, so an interruption leaves the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _usual_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the mode open()/mkdir() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def write_via_temp(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(temporary_path)`` fills the file (any writer that takes a path), then it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _usual_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    write_via_temp(path, write)


def write_json(path: str | os.PathLike, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str).encode())


def write_directory(directory: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """``fill(staging)`` writes a folder beside ``directory``, which is then renamed into place: an
    interruption leaves the previous folder (or none), never half of one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        fill(staging)
        _usual_mode(staging, directory=True)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
