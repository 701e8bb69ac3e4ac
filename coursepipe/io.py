"""Atomic file output: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


TMP_TAG = ".tmp-"  # temp folders are named .<dest name>.tmp-<pid>-<random> beside dest


def _owner_alive(folder: Path) -> bool:
    """Whether the process that made a temp folder still runs (on this host)."""
    try:
        pid = int(folder.name.rsplit(TMP_TAG, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def recover(dest: str | os.PathLike) -> list[str]:
    """Clean what a killed `atomic_path` left beside `dest`; returns what it did.

    A kill between the two renames of a directory swap leaves `dest` missing and the old output
    parked in the temp folder: it is put back (the new one never became the output, so the old
    one is what dvc.lock still describes). Temp folders of live processes are left alone.
    """
    dest = Path(dest)
    done: list[str] = []
    if not dest.parent.is_dir():
        return done
    for stale in sorted(dest.parent.glob(f".{glob.escape(dest.name)}{TMP_TAG}*")):
        if not stale.is_dir() or _owner_alive(stale):
            continue
        old = stale / (dest.name + ".old")
        if not dest.exists() and old.exists():
            os.replace(old, dest)
            done.append(f"restored {dest} from {stale.name}")
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"removed stale {stale.name}")
    for line in done:
        log.warning("%s", line)
    return done


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success rename it over `dest` (file or directory).

    What an earlier, killed call left behind is recovered first (see `recover`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_TAG}{os.getpid()}-", dir=dest.parent)) / dest.name
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            # os.replace cannot swap a directory over a non-empty one: park the old one first.
            old = tmp.parent / (dest.name + ".old")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_text(dest: str | os.PathLike, text: str) -> Path:
    return write_bytes(dest, text.encode())


def write_json(dest: str | os.PathLike, obj: Any) -> Path:
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (DVC 3's md5 of a file is algo="md5")."""
    import hashlib

    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
