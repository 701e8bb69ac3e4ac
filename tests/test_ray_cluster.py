"""The Ray door against a real local cluster (`ray start --head`): a local `dvc`-style stage run
that trains on the cluster named by RAY_ADDRESS, and `ray job submit` of a whole pipeline."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, sh, small_params, write_params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head node in its own process group, stopped by signal (not `ray stop`, which would also
    stop the test session's own local Ray)."""
    gcs, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length cap
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    address, dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:  # the job API answers once the dashboard is up
        probe = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list",
                                f"--address={dashboard}"], capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(3)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"ray head did not come up: {proc.stdout.read() if proc.stdout else ''}")
    yield {"address": address, "dashboard": dashboard}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_train_stage_joins_the_cluster_named_by_ray_address(validated, ray_head):
    prepared = validated
    out = sh([sys.executable, "-m", "coursepipe.cli", "--root", str(prepared.root), "train", "adult"],
             cwd=prepared.root, RAY_ADDRESS=ray_head["address"]).stdout
    assert f"Ray cluster at {ray_head['address']}" in out, out
    assert (prepared.model("adult") / "model.pt").is_file()   # written locally, by the driver
    # The cluster saw our driver: its job table lists a finished driver running the train command.
    jobs = sh([str(Path(sys.executable).parent / "ray"), "list", "jobs", "--format=json",
               f"--address={ray_head['address']}"], cwd=prepared.root).stdout
    assert "coursepipe.cli" in jobs and "train" in jobs


def test_ray_job_submit_runs_the_pipeline_into_shared_storage(tmp_path, ray_head):
    shared = tmp_path / "shared"           # stands for NFS / a bucket mount seen by every node
    shared.mkdir()
    write_params(shared, small_params(rows=2000))
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit",
           f"--address={ray_head['dashboard']}", f"--working-dir={REPO}", "--",
           sys.executable, "-m", "coursepipe.cli", "--root", str(shared), "pipeline", "adult"]
    deadline = time.time() + 90
    while True:  # the head's job agent can lag its job list: "No available agent", try again
        proc = sh(cmd, cwd=REPO, check=False)
        if "No available agent" not in proc.stdout or time.time() > deadline:
            break
        time.sleep(3)
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "succeeded" in out, out
    metrics = json.loads((shared / "metrics" / "adult.json").read_text())
    assert metrics["accuracy"] > 0.7
    assert (shared / "export" / "adult" / "model.onnx").is_file()
    assert not (shared / "dvc.lock").exists()   # a job writes outputs, not DVC's lock
