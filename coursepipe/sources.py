"""Fetch a recipe's raw archive into data/: download (https/file URL), copy (local path) or
generate (synthetic sample), verify its checksum, then rename it into place.

A wrong checksum or an unreachable URL raises SourceError naming the source; the file already in
data/ is kept as it was.
"""
from __future__ import annotations

import hashlib
import http.client
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from coursepipe.config import RecipeConfig, Source
from coursepipe.io import atomic_path, write_bytes


class SourceError(RuntimeError):
    """A source cannot be fetched or does not match its checksum."""


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, source: Source, label: str) -> None:
    """Raise SourceError unless `path` matches every checksum the source declares."""
    for algo in ("sha256", "md5"):
        want = getattr(source, algo)
        if want and (got := file_digest(path, algo)) != want.lower():
            raise SourceError(f"{label}: {algo} mismatch for {path.name}: expected {want}, got {got}")


def _download(url: str, dest: Path, label: str, timeout: float = 60.0) -> None:
    got = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {label}") as bar:
                for chunk in iter(lambda: r.read(1 << 16), b""):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:  # reached, but refused: the address is what is wrong
        raise SourceError(f"{label}: {url} answered HTTP {e.code} {e.reason}; check the url in "
                          f"params.yaml, or point the source at a local copy with `path:`.") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException,
            ValueError) as e:
        reason = getattr(e, "reason", e)
        raise SourceError(f"{label}: cannot reach {url} ({reason}). If this machine is offline, "
                          f"point the source at a local copy with `path:`.") from None
    # http.client ends a body that stops early without an error: say so, not "checksum mismatch"
    if total is not None and got < total:
        raise SourceError(f"{label}: download of {url} cut short: got {got} of {total} bytes; "
                          f"run fetch again")


def fetch(cfg: RecipeConfig, data_dir: Path, root: Path, force: bool = False) -> Path:
    """Make data/<recipe>-<source>.tgz match the active source. Returns its path."""
    from coursepipe.recipes import get_recipe

    source, label = cfg.active_source, f"recipes.{cfg.name}.sources.{cfg.source}"
    dest = data_dir / cfg.source_file
    if source.generate:
        recipe = get_recipe(source.generate)
        blob = recipe.synthesize(rows=source.rows, seed=source.seed)
        if not force and dest.is_file() and dest.read_bytes() == blob:
            return dest
        return write_bytes(dest, blob)
    if not force and dest.is_file():
        try:
            verify(dest, source, label)
            return dest  # already here and intact
        except SourceError:
            pass  # stale or damaged: fetch again, replacing it only once the new copy verifies
    with atomic_path(dest) as tmp:
        if source.url:
            _download(source.url, tmp, label)
        else:
            src = Path(source.path)
            src = src if src.is_absolute() else root / src
            if not src.exists():
                raise SourceError(f"{label}: local archive {src} not found (a relative `path:` is "
                                  f"relative to the project root)")
            if not src.is_file():
                raise SourceError(f"{label}: local archive {src} is not a file")
            shutil.copyfile(src, tmp)
        verify(tmp, source, label)
    return dest
