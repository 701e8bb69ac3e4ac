"""Safe archive extraction: no absolute paths, no `..`, no links, no devices; truncation caught.

Everything is checked before the first byte is written, and extraction goes to a temp folder that
is renamed into place, so a bad archive leaves the previous extraction untouched.
"""
from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
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
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        raise ArchiveError(f"{archive.name}: not a .tgz, .tar or .zip archive (an error page saved "
                           f"under this name, or cut short before the first member?)") from None
    members: list[tarfile.TarInfo] = []
    try:
        with tf:
            while (m := tf.next()) is not None:  # reads to the end: a truncated archive fails here
                members.append(m)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        # the data that ran out belongs to the last header read: name it
        after = f" (cut in or after member {members[-1].name!r})" if members else ""
        raise ArchiveError(f"{archive.name}: not a complete tar archive{after}: {e}") from None
    for m in members:
        _check_member(archive, m.name)
        if m.issym() or m.islnk():
            raise ArchiveError(f"{archive.name}: member {m.name!r} is a link to {m.linkname!r}; links are refused")
        if not (m.isfile() or m.isdir()):
            raise ArchiveError(f"{archive.name}: member {m.name!r} is not a regular file or folder")
    return members


def _check_zip_data(archive: Path, zf: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """Read one member to its end: zipfile checks the CRC there (testzip misses inflate errors)."""
    try:
        with zf.open(member) as f:
            while f.read(1 << 20):
                pass
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ArchiveError(f"{archive.name}: member {member.filename!r} is corrupt ({e})") from None


def _zip_members(archive: Path) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:  # names first: cheap, and refused before any data is inflated
                _check_member(archive, m.filename)
                if (m.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ArchiveError(f"{archive.name}: member {m.filename!r} is a link; links are refused")
            for m in members:
                _check_zip_data(archive, zf, m)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ArchiveError(f"{archive.name}: not a complete zip archive ({e})") from None
    return members


def _looks_like_zip(archive: Path) -> bool:
    """By name or magic bytes, not by is_zipfile: a cut zip has lost the end record it looks for."""
    with open(archive, "rb") as f:
        magic = f.read(4)
    return archive.suffix.lower() == ".zip" or magic in (b"PK\x03\x04", b"PK\x05\x06")


def extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract `archive` (.tgz/.tar/.zip) into `dest`, replacing it atomically. Returns `dest`."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    if _looks_like_zip(archive):
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
