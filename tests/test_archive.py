"""Safe extraction: every bad archive raises ArchiveError naming it (and the member), and the
previous extraction in `dest` survives untouched."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from coursepipe.data.archive import ArchiveError, deterministic_tgz, extract

FILES = {"sample/a.csv": b"x,y\n1,2\n", "sample/sub/b.txt": b"hello\n" * 1000}


def tgz(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    """Write a tar archive of (name, bytes) files and raw TarInfo entries (links, odd names)."""
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def zipped(path: Path, files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dest(tmp_path) -> Path:
    """A previous good extraction that a failed one must leave alone."""
    d = tmp_path / "out" / "raw"
    d.mkdir(parents=True)
    (d / "previous.csv").write_bytes(b"kept\n")
    return d


def assert_refused(archive: Path, dest: Path, *needles: str) -> ArchiveError:
    """extract() must raise ArchiveError naming the archive and `needles`, leaving dest and its
    folder exactly as they were (no temp folders left)."""
    before, siblings = tree(dest), sorted(os.listdir(dest.parent))
    with pytest.raises(ArchiveError) as err:
        extract(archive, dest)
    msg = str(err.value)
    assert archive.name in msg, msg
    assert "\n" not in msg  # the CLI prints it as one line
    for needle in needles:
        assert needle in msg, msg
    assert tree(dest) == before
    assert sorted(os.listdir(dest.parent)) == siblings
    return err.value


# ----------------------------------------------------------------------------- good archives

def test_good_tgz_extracts_and_replaces_previous(tmp_path, dest):
    archive = tmp_path / "good.tgz"
    archive.write_bytes(deterministic_tgz(FILES))
    assert extract(archive, dest) == dest
    assert tree(dest) == {"sample/a.csv": FILES["sample/a.csv"], "sample/sub/b.txt": FILES["sample/sub/b.txt"]}
    assert sorted(os.listdir(dest.parent)) == ["raw"]  # the old copy parked during the swap is gone


def test_good_zip_extracts(tmp_path, dest):
    archive = zipped(tmp_path / "good.zip", FILES)
    extract(archive, dest)
    assert tree(dest) == FILES


def test_deterministic_tgz_is_byte_stable():
    a = deterministic_tgz(FILES)
    b = deterministic_tgz(dict(reversed(list(FILES.items()))))  # insertion order must not matter
    assert a == b
    assert a[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    with tarfile.open(fileobj=io.BytesIO(a)) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["sample", "sample/sub", "sample/a.csv", "sample/sub/b.txt"]
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}
    assert deterministic_tgz({**FILES, "sample/a.csv": b"changed"}) != a


# ----------------------------------------------------------------------------- bad tar archives

def test_missing_archive(tmp_path, dest):
    with pytest.raises(ArchiveError, match="nope.tgz"):
        extract(tmp_path / "nope.tgz", dest)
    assert tree(dest) == {"previous.csv": b"kept\n"}


def test_truncated_tgz(tmp_path, dest):
    blob = deterministic_tgz({"sample/big.bin": os.urandom(200_000)})
    archive = tmp_path / "cut.tgz"
    archive.write_bytes(blob[: len(blob) // 2])
    assert_refused(archive, dest, "not a complete", "sample/big.bin")


def test_truncated_plain_tar_names_member(tmp_path, dest):
    """An uncompressed tar cut inside a member's data: the headers all read, the data does not."""
    full = tgz(tmp_path / "full.tar", [("sample/a.csv", b"ok\n"), ("sample/big.bin", os.urandom(100_000))], "w")
    archive = tmp_path / "cut.tar"
    archive.write_bytes(full.read_bytes()[:50_000])
    assert_refused(archive, dest, "sample/big.bin")


@pytest.mark.parametrize("name", ["../evil.txt", "sample/../../evil.txt", "/etc/evil.txt"])
def test_tar_member_outside_dest(tmp_path, dest, name):
    archive = tgz(tmp_path / "escape.tgz", [("sample/ok.txt", b"ok"), (name, b"evil")])
    assert_refused(archive, dest, name)
    assert not (tmp_path / "evil.txt").exists() and not (dest.parent / "evil.txt").exists()


@pytest.mark.parametrize("kind,target", [(tarfile.SYMTYPE, "/etc/passwd"), (tarfile.SYMTYPE, "ok.txt"),
                                         (tarfile.LNKTYPE, "sample/ok.txt")])
def test_tar_links_refused(tmp_path, dest, kind, target):
    archive = tgz(tmp_path / "links.tgz", [("sample/ok.txt", b"ok"), link("sample/link", target, kind)])
    assert_refused(archive, dest, "sample/link", "link")


def test_tar_device_refused(tmp_path, dest):
    fifo = tarfile.TarInfo("sample/pipe")
    fifo.type = tarfile.FIFOTYPE
    archive = tgz(tmp_path / "fifo.tgz", [fifo])
    assert_refused(archive, dest, "sample/pipe")


def test_not_an_archive(tmp_path, dest):
    archive = tmp_path / "page.tgz"
    archive.write_bytes(b"<html>404 Not Found</html>\n")  # what a wrong URL often serves
    assert_refused(archive, dest, "not a .tgz, .tar or .zip archive")


# ----------------------------------------------------------------------------- bad zip archives

@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt"])
def test_zip_member_outside_dest(tmp_path, dest, name):
    archive = zipped(tmp_path / "escape.zip", {"ok.txt": b"ok", name: b"evil"})
    assert_refused(archive, dest, name)


def test_zip_symlink_refused(tmp_path, dest):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("sample/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    assert_refused(archive, dest, "sample/link", "link")


def test_zip_corrupt_member_data(tmp_path, dest):
    """Flipped bytes inside a compressed member: the CRC (or inflate) check names that member."""
    good = zipped(tmp_path / "good.zip", {"sample/a.csv": b"a,b\n" * 5000}).read_bytes()
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        info = zf.getinfo("sample/a.csv")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # local header is 30 bytes
    blob = bytearray(good)
    for i in range(start + 5, start + 15):
        blob[i] ^= 0xFF
    archive = tmp_path / "corrupt.zip"
    archive.write_bytes(bytes(blob))
    assert_refused(archive, dest, "sample/a.csv")


def test_zip_corrupt_stored_member(tmp_path, dest):
    good = zipped(tmp_path / "good.zip", {"sample/a.csv": b"a,b\n" * 100}, zipfile.ZIP_STORED).read_bytes()
    archive = tmp_path / "crc.zip"
    archive.write_bytes(good.replace(b"a,b\n", b"a,c\n", 1))
    assert_refused(archive, dest, "sample/a.csv", "CRC")


def test_zip_truncated(tmp_path, dest):
    """Cut in half, the central directory is gone: still reported as a broken zip, not a tar."""
    good = zipped(tmp_path / "good.zip", {"sample/a.bin": os.urandom(50_000)}).read_bytes()
    archive = tmp_path / "cut.zip"
    archive.write_bytes(good[: len(good) // 2])
    assert_refused(archive, dest, "not a complete zip archive")
