"""Safe archive extraction: no absolute paths, no `..`, no links, no devices; truncation caught.

Everything is checked before the first byte is written, and extraction goes to a temp folder that
is renamed into place, so a bad archive leaves the previous extraction untouched.
"""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from coursepipe.io import atomic_path


class ArchiveError(ValueError):
    """The archive is unreadable or would write outside its destination: the message names it."""


def _check_member(archive: Path, name: str) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive.name}: member {name!r} has an absolute path")
    if ".." in p.parts:
        raise ArchiveError(f"{archive.name}: member {name!r} points outside the archive ('..')")


def _tar_members(archive: Path) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()  # reads to the end: a truncated archive fails here
    except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ArchiveError(f"{archive.name}: not a complete tar archive ({e})") from None
    for m in members:
        _check_member(archive, m.name)
        if m.issym() or m.islnk():
            raise ArchiveError(f"{archive.name}: member {m.name!r} is a link to {m.linkname!r}; links are refused")
        if not (m.isfile() or m.isdir()):
            raise ArchiveError(f"{archive.name}: member {m.name!r} is not a regular file or folder")
    return members


def _zip_members(archive: Path) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()  # CRC-checks every member
            members = zf.infolist()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ArchiveError(f"{archive.name}: not a complete zip archive ({e})") from None
    if bad is not None:
        raise ArchiveError(f"{archive.name}: member {bad!r} is corrupt (CRC mismatch)")
    for m in members:
        _check_member(archive, m.filename)
        if (m.external_attr >> 16) & 0o170000 == 0o120000:
            raise ArchiveError(f"{archive.name}: member {m.filename!r} is a link; links are refused")
    return members


def extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract `archive` (.tgz/.tar/.zip) into `dest`, replacing it atomically. Returns `dest`."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    if zipfile.is_zipfile(archive):
        _zip_members(archive)
        with atomic_path(dest) as tmp, zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    else:
        _tar_members(archive)
        with atomic_path(dest) as tmp, tarfile.open(archive, "r:*") as tf:
            tf.extractall(tmp, filter="data")  # the stdlib's own guard, behind ours
    return dest


def deterministic_tgz(files: dict[str, bytes]) -> bytes:
    """A byte-reproducible .tgz of `files` (sorted, mtime 0, uid 0), so regenerating is a DVC no-op."""
    import gzip

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        dirs = sorted({str(p) for name in files for p in PurePosixPath(name).parents if str(p) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d + "/")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tf.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            tf.addfile(info, io.BytesIO(files[name]))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)
