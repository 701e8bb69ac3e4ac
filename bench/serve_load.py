"""Load on the serving app: uvicorn, then the Ray Serve deployment, same exports, same requests.

    python bench/serve_load.py --root R                 # R/export/<recipe>/ from `./run course`
    python bench/serve_load.py --root R --requests 500  # quicker
    python bench/serve_load.py --root R --no-ray        # uvicorn only

Each server runs as its own `coursepipe serve` process (so its RSS is its own, not the load
generator's); every model gets `--requests` requests at `--concurrency` in flight, one model
after another (coursepipe/serve/load.py: the model's own sample request, bounded, then stop).
Prints p50 / p99 latency, requests per second and errors per model, the server's RSS before and
after (for Ray Serve: the replicas' RSS summed), and the Ray / uvicorn throughput ratio.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from coursepipe.serve import load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, port: int, ray: bool, timeout: float = 180.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "coursepipe.cli", "--root", str(root), "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd + (["--ray"] if ray else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"server on port {port} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def rss_mb(proc: subprocess.Popen, ray: bool) -> float:
    """The serving processes' resident memory: the uvicorn process, or every Serve replica."""
    if not ray:
        return psutil.Process(proc.pid).memory_info().rss / 2**20
    total = 0
    for p in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:coursepipe" in part for part in (p.info["cmdline"] or [])):
            total += p.memory_info().rss
    return total / 2**20


def run(root: Path, ray: bool, requests: int, concurrency: int) -> dict[str, load.Load]:
    port = free_port()
    label = "Ray Serve" if ray else "uvicorn"
    proc = start(root, port, ray)
    url = f"http://127.0.0.1:{port}"
    try:
        described = load.models(url)
        for d in described:  # one warm-up request each: first-call session set-up is not load
            call = load.sample_call(d)
            httpx.request(call.method, url + call.path, json=call.json, timeout=60)
        before = rss_mb(proc, ray)
        print(f"\n{label} ({'serve.ray replicas' if ray else 'one process'}), {requests} requests "
              f"per model at concurrency {concurrency}")
        print(load.HEADER)
        results = {}
        for d in described:
            results[d["name"]] = r = load.hammer(url, load.sample_call(d), requests, concurrency)
            print(r.line(d["name"]) + (f"   first error: {r.first_error}" if r.errors else ""), flush=True)
        after = rss_mb(proc, ray)
        print(f"server RSS: {before:.0f} MB before, {after:.0f} MB after ({after / before:.2f}x)")
        return results
    finally:
        stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=".", type=Path, help="project root whose export/ is served")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    local = run(args.root.resolve(), False, args.requests, args.concurrency)
    if args.no_ray:
        return
    remote = run(args.root.resolve(), True, args.requests, args.concurrency)
    print("\nreq/s ratio Ray Serve / uvicorn: " + ", ".join(
        f"{n} {remote[n].rps / local[n].rps:.2f}x" for n in local if n in remote))


if __name__ == "__main__":
    main()
