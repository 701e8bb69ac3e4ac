"""A bounded load generator for the app: N requests at a fixed concurrency, then it stops.

    python -m coursepipe.serve.load http://127.0.0.1:8000 --requests 2000 --concurrency 16

sends each served model its own sample request (GET /api/models/{name} tells what it takes)
and prints latency percentiles, requests per second and errors per model. The bench
(bench/serve_load.py) and the tests call `hammer` directly.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: dict | None = None


@dataclass
class Load:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    first_error: str | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def line(self, name: str) -> str:
        return (f"{name:<15}{self.requests:>7}{self.errors:>7}{self.rps:>9.1f}"
                f"{self.p50_ms:>9.1f}{self.p99_ms:>9.1f}")


HEADER = f"{'model':<15}{'reqs':>7}{'errors':>7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"


def sample_image(mode: str, size: list[int]) -> str:
    """A base64 PNG at the model's own size: the request measures the model, not the resize."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    arr = rng.integers(0, 255, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sample_call(description: dict) -> Call:
    """One realistic request for a model, from its GET /api/models/{name} description."""
    name, page, form = description["name"], description["page"], description["form"]
    api = f"/api/models/{name}"
    if page == "image":
        return Call("POST", f"{api}/predict", {"inputs": [{"image_base64": sample_image(form["mode"], form["size"])}]})
    if page == "tabular":
        row = {f["name"]: f["choices"][0] if f["type"] == "category" else f["default"] for f in form["fields"]}
        return Call("POST", f"{api}/predict", {"inputs": [row]})
    if page == "collab":
        return Call("GET", f"{api}/recommend?user={form['users'][0]}&n={form['recommend_n']}")
    if page == "text":
        return Call("POST", f"{api}/predict", {"inputs": [{"text": "one , two , three ,", "n": 3}]})
    raise ValueError(f"{name}: no sample request for page {page!r}")


async def _hammer(url: str, call: Call, n: int, concurrency: int, timeout: float) -> Load:
    import httpx

    latencies: list[float] = []
    errors, first_error = 0, None
    todo = iter(range(n))

    async def worker(client):
        nonlocal errors, first_error
        for _ in todo:  # a shared iterator: exactly n requests in all, then every worker stops
            t0 = time.perf_counter()
            try:
                r = await client.request(call.method, call.path, json=call.json)
                ok, why = r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                ok, why = False, f"{type(e).__name__}: {e}"
            latencies.append(time.perf_counter() - t0)
            if not ok:
                errors += 1
                first_error = first_error or why

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return Load(requests=n, errors=errors, seconds=seconds, p50_ms=float(np.percentile(ms, 50)),
                p99_ms=float(np.percentile(ms, 99)), first_error=first_error)


def hammer(url: str, call: Call, n: int, concurrency: int, timeout: float = 60.0) -> Load:
    """Send `call` n times, `concurrency` in flight, and measure."""
    return asyncio.run(_hammer(url, call, n, concurrency, timeout))


def models(url: str) -> list[dict]:
    import httpx

    listed = httpx.get(f"{url}/api/models", timeout=30).json()
    return [httpx.get(f"{url}/api/models/{m['name']}", timeout=30).json() for m in listed]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coursepipe.serve.load", description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    print(HEADER)
    failed = 0
    for d in models(args.url):
        result = hammer(args.url, sample_call(d), args.requests, args.concurrency)
        print(result.line(d["name"]) + (f"   first error: {result.first_error}" if result.errors else ""))
        failed += result.errors
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
