"""The Ray door against a real local cluster (`ray start --head`): a local `dvc`-style stage run
that trains on the cluster named by RAY_ADDRESS, and `ray job submit` of a whole pipeline."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, sh, small_params, write_params
from coursepipe.distributed import cluster
from coursepipe.distributed.cluster import free_port


@pytest.fixture(scope="module")
def ray_head():
    """A head node in its own process group, stopped by signal (not `ray stop`, which would also
    stop the test session's own local Ray)."""
    head = cluster.start_head(num_cpus=2)
    deadline = time.time() + 120
    while time.time() < deadline:  # the job API answers once the dashboard is up
        probe = subprocess.run([cluster.ray_cli(), "job", "list", f"--address={head.dashboard}"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(3)
    else:
        head.stop()
        pytest.fail("ray head's job API did not come up")
    yield {"address": head.address, "dashboard": head.dashboard}
    head.stop()


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


def test_serve_ray_joins_the_cluster_named_by_ray_address(tmp_path, ray_head):
    """`coursepipe serve --ray` with RAY_ADDRESS: the app's replicas run on that cluster (last in
    this file: its replicas hold 1 of the head's 2 CPUs until the head stops)."""
    import httpx
    import pandas as pd

    from coursepipe.serve.models import load_script
    from serving import build_exports
    root = build_exports(tmp_path / "served", ("adult",))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "coursepipe.cli", "--root", str(root), "serve", "--ray",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env=dict(os.environ, RAY_ADDRESS=ray_head["address"], RAY_AUTH_MODE="disabled"))
    try:
        deadline, answer = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                answer = httpx.get(f"{url}/api/models", timeout=5)
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert answer is not None and answer.status_code == 200, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert [m["name"] for m in answer.json()] == ["adult"]
        actors = sh([str(Path(sys.executable).parent / "ray"), "list", "actors", "--format=json", "--limit=1000",
                     f"--address={ray_head['address']}"], cwd=root).stdout
        replicas = [a for a in json.loads(actors)
                    if a.get("state") == "ALIVE" and "ServeReplica:coursepipe" in (a.get("class_name") or "")]
        assert len(replicas) == 2, actors[-2000:]  # params.yaml serve.ray.replicas, on the cluster
        # answers through Serve's proxy and replicas are the export's own, refusals included
        folder = root / "export" / "adult"
        module = load_script(folder)
        sess, state = module.load(folder)
        row = {c: state["categories"][c][1] for c in state["cat_names"]} | {"age": 40, "fnlwgt": 1e5,
                                                                            "education-num": 9}
        out = httpx.post(f"{url}/api/models/adult/predict", json={"inputs": [row]}, timeout=60).json()
        expected = module.predict_proba(sess, state, pd.DataFrame([row]))[0]
        assert out["outputs"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-6)
        assert httpx.get(f"{url}/api/models/nope", timeout=60).status_code == 404
        long = {"inputs": [{**row, "race": "x" * 6000}]}
        assert httpx.post(f"{url}/api/models/adult/predict", json=long, timeout=60).status_code == 413
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
