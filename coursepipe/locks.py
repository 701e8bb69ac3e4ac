"""Advisory locks: one writer per recipe on a root, one trainer per Ray run folder.

`flock` locks die with their process (a SIGKILL never leaves a lock behind), and the lock file
records who holds it, so a refused command can say whom it waits for. A process that holds a
lock passes it to its children through COURSEPIPE_LOCKS (a Prefect flow's `dvc repro`
subprocess runs stage commands under the flow's lock). flock works on local disks; on NFS it
depends on the mount, so on a cluster the run lock is best effort.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ENV = "COURSEPIPE_LOCKS"


class Locked(RuntimeError):
    """Another process holds the lock; the message names it."""


def _held() -> list[str]:
    return [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]


def holder(path: Path) -> str:
    """Who holds the lock at `path`, as its file records it."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, since {since})"


@contextmanager
def hold(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock file `path` for `what` (e.g. "recipe adult"); fail at once, naming the
    holder, when another process has it. Re-entrant within a process and its children."""
    path = Path(path).resolve()
    key = str(path)
    if key in _held():
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Locked(f"{what} is in use by {holder(path)}; wait for it to finish or stop it "
                     f"(lock file {path})") from None
    before = os.environ.get(ENV)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(sys.argv)[:300], "since": time.time()}).encode())
        os.environ[ENV] = os.pathsep.join([*_held(), key])
        yield path
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def recipe_lock(root: Path, recipe: str) -> Path:
    return Path(root) / ".locks" / f"{recipe}.lock"


def run_lock(storage: str, run_name: str) -> Path | None:
    """The lock beside a Ray run folder, for local storage (None for a URI such as s3://)."""
    if "://" in storage:
        return None
    return Path(storage) / f"{run_name}.lock"
