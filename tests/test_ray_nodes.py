"""Several Ray nodes on this machine: the warm head a course run shares, and a two-node training
that loses a node mid-run and finishes from its last checkpoint (runs in the second pytest
process of `./run tests`, after tests/test_ray_cluster.py, like every `ray start` test)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import copy_project_files, sh, small_params, write_params
from coursepipe.distributed import cluster


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) != 0


def test_warm_cluster_is_joined_and_stopped_even_when_the_run_fails(validated):
    """What `./run course` and the Prefect flows wrap their stages in: the train stage's
    subprocess joins the head through RAY_ADDRESS; a failing stage still stops the head."""
    assert "RAY_ADDRESS" not in os.environ
    with pytest.raises(RuntimeError, match="a later stage failed"):
        with cluster.warm(num_cpus=2) as address:
            assert os.environ["RAY_ADDRESS"] == address and not refused(address)
            out = sh([sys.executable, "-m", "coursepipe.cli", "--root", str(validated.root), "train",
                      "adult"], cwd=validated.root).stdout
            assert f"training on the Ray cluster at {address}" in out, out
            raise RuntimeError("a later stage failed")
    assert "RAY_ADDRESS" not in os.environ
    deadline = time.time() + 30
    while not refused(address) and time.time() < deadline:
        time.sleep(1)
    assert refused(address), f"the head at {address} is still up"


def test_a_stopped_head_drains_and_stops_in_seconds(tmp_path):
    """Node.stop signals `ray start` alone, whose SIGTERM handler drains the node through the
    GCS; signalling the whole group took the GCS down first and the drain request waited out
    Ray's 30 s drain timeout (the stop below would then SIGKILL at 20 s, and the log says so)."""
    head = cluster.start_head(num_cpus=1, dashboard=False)
    try:
        driver = ("import ray; ray.init(address=%r); "
                  "print(ray.get(ray.remote(lambda: 41 + 1).remote()))" % head.address)
        assert "42" in sh([sys.executable, "-c", driver], cwd=tmp_path).stdout.splitlines()
    finally:
        head.stop(timeout=20)
    log = (Path(head.temp_dir) / "node.log").read_text(errors="replace")
    assert "finished draining" in log and "Failed to mark the local node as draining" not in log, log[-2000:]
    assert refused(head.address)


def alive_worker_nodes(address: str) -> set[str]:
    """Node ids of the live Ray Train worker actors (the State API of the head's dashboard)."""
    out = subprocess.run([cluster.ray_cli(), "list", "actors", "--format=json", "--limit=1000",
                          f"--address={address}"], capture_output=True, text=True).stdout
    try:
        actors = json.loads(out)
    except ValueError:
        return set()
    return {a["node_id"] for a in actors
            if a.get("state") == "ALIVE" and "RayTrainWorker" in (a.get("class_name") or "")}


def checkpoints(storage: Path) -> list[Path]:
    return sorted(storage.glob("*/checkpoint_*/checkpoint.sha256"))


def test_two_nodes_lose_one_mid_run_and_finish_from_the_last_checkpoint(tmp_path):
    """Head and worker node have 1 CPU each, so a 2-worker run must span both. The worker node is
    SIGKILLed after the first checkpoint (a machine lost); a replacement node joins; Ray Train
    restarts the worker group (max_failures) and the run continues from its last checkpoint,
    with every epoch in the history exactly once. Checkpoints go to a folder both nodes reach
    (on a real cluster: NFS or s3:// as `ray_storage`)."""
    root = tmp_path / "proj"
    root.mkdir()
    raw = small_params(rows=20000, epochs=6, bs=16, num_workers=2, cpus_per_worker=1, threads=1,
                       max_failures=2)
    raw["ray_storage"] = str(tmp_path / "shared-runs")
    write_params(root, raw)
    copy_project_files(root)
    for stage in ("fetch", "prepare", "validate"):
        sh([sys.executable, "-m", "coursepipe.cli", "--root", str(root), stage, "adult",
            *(["--no-dvc"] if stage == "fetch" else [])], cwd=root)

    head = cluster.start_head(num_cpus=1)
    nodes = [cluster.start_worker(head.address, num_cpus=1)]
    train = subprocess.Popen([sys.executable, "-m", "coursepipe.cli", "--root", str(root), "train", "adult"],
                             cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, RAY_ADDRESS=head.address), start_new_session=True)
    try:
        storage, spread = tmp_path / "shared-runs", set()
        deadline = time.time() + 300
        while not checkpoints(storage) and train.poll() is None and time.time() < deadline:
            spread = alive_worker_nodes(head.address) or spread
            time.sleep(1)
        assert checkpoints(storage), f"no checkpoint before the kill: {train.poll()}"
        spread = alive_worker_nodes(head.address) or spread
        assert len(spread) == 2, f"the two ranks were not on two nodes: {spread}"
        assert train.poll() is None, "the run ended before the node could be killed"
        os.killpg(nodes[0].proc.pid, signal.SIGKILL)          # the second machine is gone
        nodes.append(cluster.start_worker(head.address, num_cpus=1))  # ... and replaced
        out, _ = train.communicate(timeout=600)
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
        for node in nodes:
            node.stop(signal.SIGKILL, timeout=10)
        head.stop()
    assert train.returncode == 0, out[-4000:]
    assert "resumed from checkpoint after epoch" in out, out[-4000:]
    history = pd.read_csv(root / "reports" / "adult" / "history.csv")
    assert list(history["epoch"]) == list(range(6))             # each epoch once, none lost twice
    assert (root / "models" / "adult" / "model.pt").is_file()
