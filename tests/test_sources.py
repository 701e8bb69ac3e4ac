"""fetch(): downloads from a loopback HTTP server, local archives and the synthetic generator.
A bad checksum or an unreachable URL raises SourceError naming the source, and whatever good
archive is already in data/ stays byte-identical, with no temp files left beside it."""
from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
import time

import pytest

from conftest import small_params, write_params
from coursepipe import recipes
from coursepipe.data.archive import deterministic_tgz
from coursepipe.sources import SourceError, fetch

GOOD = deterministic_tgz({"adult_sample/adult.csv": b"age,salary\n39,<50k\n"})
OTHER = deterministic_tgz({"adult_sample/adult.csv": b"age,salary\n50,>=50k\n"})
LABEL = "recipes.adult.sources.web"


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class Server:
    """A loopback HTTP server: `files` maps a URL path to the bytes served there."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 5  # s: a stuck client cannot hold a handler thread past the test

            def do_GET(self):
                outer.requests.append(self.path)
                if self.path == "/cut.tgz":  # promises the whole archive, sends a quarter of it
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(GOOD)))
                    self.end_headers()
                    self.wfile.write(GOOD[: len(GOOD) // 4])
                    self.close_connection = True
                    return
                if self.path not in outer.files:
                    self.send_error(404)
                    return
                body = outer.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    with Server() as s:
        s.files["/adult.tgz"] = GOOD
        yield s


def cfg_for(root, **source):
    """The adult recipe of a small params.yaml in `root`, its active source replaced by `web`."""
    root.mkdir(parents=True, exist_ok=True)
    raw = small_params()
    adult = raw["recipes"]["adult"]
    adult["sources"]["web"] = source
    adult["source"] = "web"
    return recipes.load_params(write_params(root, raw)).recipe("adult")


def fetch_into(root, cfg, **kw):
    gen = cfg.active_source.generate
    return fetch(cfg, root / "data", root, synthesize=recipes.get(gen).synthesize if gen else None, **kw)


def data_listing(root) -> list[str]:
    """Every file under data/, temp files included (an empty recipe folder holds no data)."""
    data = root / "data"
    return sorted(str(p.relative_to(data)) for p in data.rglob("*") if not p.is_dir()) \
        if data.exists() else []


# ----------------------------------------------------------------------------- http(s) urls

def test_download_with_sha256(tmp_path, server):
    cfg = cfg_for(tmp_path, url=f"{server.url}/adult.tgz", sha256=sha256(GOOD))
    path = fetch_into(tmp_path, cfg)
    assert path == tmp_path / "data" / "adult" / "web.tgz" and path.read_bytes() == GOOD
    assert data_listing(tmp_path) == ["adult/web.tgz"]

    fetch_into(tmp_path, cfg)  # verified copy already there: no second download
    assert server.requests == ["/adult.tgz"]


def test_download_with_md5(tmp_path, server):
    md5 = hashlib.md5(GOOD).hexdigest()
    path = fetch_into(tmp_path, cfg_for(tmp_path, url=f"{server.url}/adult.tgz", md5=md5))
    assert path.read_bytes() == GOOD

    other = tmp_path / "other"
    bad = cfg_for(other, url=f"{server.url}/adult.tgz", md5=hashlib.md5(OTHER).hexdigest())
    with pytest.raises(SourceError) as err:
        fetch_into(other, bad)
    assert LABEL in str(err.value) and "md5" in str(err.value)
    assert hashlib.md5(OTHER).hexdigest() in str(err.value) and md5 in str(err.value)
    assert data_listing(other) == []


def test_wrong_checksum_keeps_good_copy(tmp_path, server):
    cfg = cfg_for(tmp_path, url=f"{server.url}/adult.tgz", sha256=sha256(GOOD))
    dest = fetch_into(tmp_path, cfg)
    before = dest.stat()

    server.files["/adult.tgz"] = OTHER  # the server now hands out something else
    with pytest.raises(SourceError) as err:
        fetch_into(tmp_path, cfg, force=True)
    msg = str(err.value)
    assert LABEL in msg and sha256(GOOD) in msg and sha256(OTHER) in msg, msg
    assert dest.read_bytes() == GOOD and dest.stat().st_mtime_ns == before.st_mtime_ns
    assert data_listing(tmp_path) == ["adult/web.tgz"]


def test_checksum_changed_in_params_keeps_old_copy(tmp_path, server):
    """params now expect other bytes: the old file fails the check, a re-download fails too."""
    fetch_into(tmp_path, cfg_for(tmp_path, url=f"{server.url}/adult.tgz", sha256=sha256(GOOD)))
    with pytest.raises(SourceError, match=sha256(OTHER)):
        fetch_into(tmp_path, cfg_for(tmp_path, url=f"{server.url}/adult.tgz", sha256=sha256(OTHER)))
    assert (tmp_path / "data" / "adult" / "web.tgz").read_bytes() == GOOD
    assert data_listing(tmp_path) == ["adult/web.tgz"]


def test_damaged_copy_is_replaced(tmp_path, server):
    cfg = cfg_for(tmp_path, url=f"{server.url}/adult.tgz", sha256=sha256(GOOD))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "adult").mkdir(parents=True)
    (tmp_path / "data" / "adult" / "web.tgz").write_bytes(GOOD[:10])
    assert fetch_into(tmp_path, cfg).read_bytes() == GOOD


def test_http_404(tmp_path, server):
    url = f"{server.url}/missing.tgz"
    with pytest.raises(SourceError) as err:
        fetch_into(tmp_path, cfg_for(tmp_path, url=url, sha256=sha256(GOOD)))
    assert LABEL in str(err.value) and url in str(err.value) and "404" in str(err.value)
    assert data_listing(tmp_path) == []


def test_download_cut_short(tmp_path, server):
    url = f"{server.url}/cut.tgz"
    with pytest.raises(SourceError) as err:
        fetch_into(tmp_path, cfg_for(tmp_path, url=url, sha256=sha256(GOOD)))
    msg = str(err.value)
    assert url in msg and "cut short" in msg and str(len(GOOD)) in msg, msg
    assert data_listing(tmp_path) == []


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url", [f"http://127.0.0.1:{closed_port()}/adult.tgz",
                                 "http://nonexistent.invalid/x.tgz"])
def test_unreachable_url(tmp_path, url):
    cfg = cfg_for(tmp_path, url=url, sha256=sha256(GOOD))
    (tmp_path / "data").mkdir()
    t0 = time.perf_counter()
    with pytest.raises(SourceError) as err:
        fetch_into(tmp_path, cfg)
    msg = str(err.value)
    assert LABEL in msg and url in msg and "path:" in msg, msg  # the hint: use a local copy
    assert data_listing(tmp_path) == []
    assert time.perf_counter() - t0 < 30


def test_unreachable_url_keeps_good_copy(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/adult.tgz"
    dest = tmp_path / "data" / "adult" / "web.tgz"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(GOOD)
    with pytest.raises(SourceError):
        fetch_into(tmp_path, cfg_for(tmp_path, url=url, sha256=sha256(GOOD)), force=True)
    assert dest.read_bytes() == GOOD and data_listing(tmp_path) == ["adult/web.tgz"]


def test_file_url(tmp_path):
    src = tmp_path / "mirror" / "adult.tgz"
    src.parent.mkdir()
    src.write_bytes(GOOD)
    path = fetch_into(tmp_path, cfg_for(tmp_path, url=src.as_uri(), sha256=sha256(GOOD)))
    assert path.read_bytes() == GOOD


# ----------------------------------------------------------------------------- local paths

def test_local_path_is_relative_to_root(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    (root / "archives").mkdir(parents=True)
    (root / "archives" / "adult.tgz").write_bytes(GOOD)
    monkeypatch.chdir(tmp_path)  # not the root: the path must still resolve against it
    path = fetch_into(root, cfg_for(root, path="archives/adult.tgz", sha256=sha256(GOOD)))
    assert path.read_bytes() == GOOD and data_listing(root) == ["adult/web.tgz"]


def test_local_path_missing(tmp_path):
    with pytest.raises(SourceError) as err:
        fetch_into(tmp_path, cfg_for(tmp_path, path="archives/nope.tgz", sha256=sha256(GOOD)))
    msg = str(err.value)
    assert LABEL in msg and str(tmp_path / "archives" / "nope.tgz") in msg and "not found" in msg
    assert data_listing(tmp_path) == []


def test_local_path_is_a_folder(tmp_path):
    (tmp_path / "archives").mkdir()
    with pytest.raises(SourceError, match="not a file"):
        fetch_into(tmp_path, cfg_for(tmp_path, path="archives", sha256=sha256(GOOD)))


def test_local_path_wrong_checksum_keeps_good_copy(tmp_path):
    (tmp_path / "new.tgz").write_bytes(OTHER)
    dest = tmp_path / "data" / "adult" / "web.tgz"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(GOOD)
    with pytest.raises(SourceError) as err:
        fetch_into(tmp_path, cfg_for(tmp_path, path="new.tgz", sha256=sha256(GOOD)), force=True)
    assert LABEL in str(err.value) and sha256(OTHER) in str(err.value)
    assert dest.read_bytes() == GOOD and data_listing(tmp_path) == ["adult/web.tgz"]


# ----------------------------------------------------------------------------- generated samples

def test_generated_sample_is_reproducible_and_refetch_is_noop(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    a = fetch_into(one, cfg_for(one, generate="adult", rows=300, seed=3))
    b = fetch_into(two, cfg_for(two, generate="adult", rows=300, seed=3))
    assert a.read_bytes() == b.read_bytes()

    before = a.stat()
    fetch_into(one, cfg_for(one, generate="adult", rows=300, seed=3))
    after = a.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert data_listing(one) == ["adult/web.tgz"]

    c = fetch_into(one, cfg_for(one, generate="adult", rows=300, seed=4))  # new seed: new file
    assert c.read_bytes() != b.read_bytes()
