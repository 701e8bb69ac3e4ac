"""Local Ray nodes started with the `ray` CLI: one warm head for a whole course run, and the
extra nodes the multi-node tests add.

Why: every `dvc repro train@<r>` is its own process; without a cluster to join, each one starts
and stops a private Ray instance (10-25 s a stage on 2 cores). `warm()` starts one head, points
RAY_ADDRESS at it for every child process (the DVC stages inherit the environment; the train
stage joins whatever RAY_ADDRESS names), and stops it when the run ends, also when a stage
failed. With RAY_ADDRESS already set, the cluster it names is used and nothing is started.

Nodes run `ray start --block` in their own process group and are stopped by signal (`Node.stop`),
never by `ray stop` (which would stop every Ray process of the user, other sessions' included). This
module starts processes only; it imports nothing of Ray.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# Ray settings a cluster started here inherits (a value already in the environment wins).
RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # its error line, and nothing to watch on one box
    # How often (s) the controller polls the workers, default 2. A worker's report() blocks until
    # the poll takes the previous one, and the end of training is noticed at the next poll: at
    # 2 s, adult's 0.8 s epochs waited ~1 s each and fit() spent ~5 s more in teardown.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_AUTH_MODE": "disabled",  # local nodes: no token prompt or warning
    # How long (ms) an idle worker process beyond the node's idle quota (its free CPUs) lives,
    # default 1000. Ray Data's decode tasks (data_path: ray_data) import torch and the recipe's
    # kind, seconds per process; between two epochs' executions they sat idle for longer than
    # 1 s and were killed, so every epoch started them again (2-core box: 4.5-8 s of each
    # epoch's first batch, 3.3 s with them kept; docs/RESULTS.md, issue 12).
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
    # How long (s) a SIGTERMed node waits for its drain, default 30: the wait lets a live
    # cluster's Serve proxies stop routing to the node's replicas. A node started here ends with
    # its run, so nothing reroutes; a head that had hosted Ray Serve waited the whole 30 s.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    """The `ray` executable of this interpreter's environment (not whatever PATH finds)."""
    return str(Path(sys.executable).parent / "ray")


def node_env() -> dict[str, str]:
    return {**RAY_ENV, **os.environ}


@dataclass
class Node:
    """A `ray start --block` process (and its children, in one process group)."""
    proc: subprocess.Popen
    address: str                      # the head's GCS address, host:port
    temp_dir: str
    dashboard: str | None = None      # http://host:port on a head started with the dashboard
    log: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45.0) -> None:
        """Stop the node: `sig` to its `ray start` process, which drains the node and stops the
        processes it started; then SIGKILL to whatever of its process group is left, at once
        when it exits, or after `timeout`. SIGKILL goes to the whole group (a machine lost)."""
        if self.proc.poll() is not None:
            return
        # Not SIGTERM to the whole group: Ray 2.60's `ray start --block` answers SIGTERM by
        # asking the GCS to drain the node, and with the GCS SIGTERMed at the same moment that
        # request waits out RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s). Measured on a head that
        # had run a driver's tasks: 33.6 s to stop that way, 1.9 s by the leader alone.
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)
            else:
                os.kill(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _start(args: list[str], temp_dir: str) -> subprocess.Popen:
    out = open(Path(temp_dir) / "node.log", "w")  # noqa: SIM115 - the node outlives this call
    return subprocess.Popen([ray_cli(), "start", "--block", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}", *args],
                            stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=node_env())


def _wait(node: Node, ready: str, timeout: float) -> Node:
    """Until the node's log says `ready`; a RuntimeError with its log if it exits or times out."""
    log = Path(node.temp_dir) / "node.log"
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if ready in text:
            return node
        if node.proc.poll() is not None:
            raise RuntimeError(f"ray node exited ({node.proc.returncode}) before it was ready:\n{text[-3000:]}")
        time.sleep(0.5)
    node.stop()
    raise RuntimeError(f"ray node not ready after {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def start_head(num_cpus: int | None = None, dashboard: bool = True, resources: str | None = None,
               timeout: float = 120.0) -> Node:
    """A head node on free ports (several clusters can share one machine), with the dashboard
    (the State API that Ray Train's controller queries, and `ray job submit`) when asked."""
    # short: Ray's socket paths have a length cap
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    gcs = free_port()
    args = ["--head", f"--port={gcs}", f"--num-cpus={num_cpus or os.cpu_count() or 1}",
            f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    dash = None
    if dashboard:
        port = free_port()
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}"]
        dash = f"http://127.0.0.1:{port}"
    else:
        args.append("--include-dashboard=false")
    if resources:
        args.append(f"--resources={resources}")
    node = Node(_start(args, temp), f"127.0.0.1:{gcs}", temp, dash)
    return _wait(node, "Ray runtime started", timeout)


def start_worker(address: str, num_cpus: int, resources: str | None = None,
                 timeout: float = 120.0) -> Node:
    """A second node joining the head at `address` (its own CPUs and custom resources)."""
    temp = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    args = [f"--address={address}", f"--num-cpus={num_cpus}", f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    if resources:
        args.append(f"--resources={resources}")
    return _wait(Node(_start(args, temp), address, temp), "Ray runtime started", timeout)


@contextlib.contextmanager
def warm(num_cpus: int | None = None) -> Iterator[str]:
    """RAY_ADDRESS of one head kept up for the duration (see the module docstring)."""
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    t0 = time.perf_counter()
    head = start_head(num_cpus)
    print(f"Ray head at {head.address} for this run ({time.perf_counter() - t0:.1f} s to start; "
          f"every train stage joins it)", flush=True)
    os.environ["RAY_ADDRESS"] = head.address
    try:
        yield head.address
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        head.stop()
