"""The Prefect door and the `dvc repro` door leave the same workspace (real Prefect API, real DVC)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from conftest import REPO, dvc, fetch, make_repo, sh
from coursepipe.stages import STAGES

GIT = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


@pytest.fixture(scope="module")
def flow_repo(tmp_path_factory, prefect_api):
    """A temp repo after one Prefect `course` flow run for adult: (repo, flow-run state)."""
    from flows.course import course

    repo = make_repo(tmp_path_factory.mktemp("flow") / "repo")
    state = course(recipe="adult", root=str(repo), return_state=True)
    return repo, state


def test_flow_runs_every_stage_and_publishes_metrics(flow_repo):
    repo, state = flow_repo
    assert state.is_completed(), state
    metrics = state.result()
    assert metrics == json.loads((repo / "metrics" / "adult.json").read_text())
    assert metrics["accuracy"] > 0.75
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {f"{s}@adult" for s in STAGES} <= set(lock["stages"])
    assert (repo / "export" / "adult" / "model.onnx").is_file()
    assert (repo / "data.dvc").is_file()                 # fetch versioned the raw archive ...
    assert any((repo / ".dvcstore").rglob("*"))          # ... and pushed it to the local remote


def test_flow_logs_stream_dvc_output_and_table_artifact(flow_repo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, LogFilter, LogFilterFlowRunId

    repo, state = flow_repo
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key={"any_": ["adult-metrics"]}))
    text = "\n".join(log.message for log in logs)
    assert "Running stage 'train@adult'" in text          # the stage's own output reached the API
    # one Ray head for the flow run, joined by the train stage's `dvc repro` subprocess
    head = text.split("Ray head at ", 1)[1].split()[0]
    assert f"training on the Ray cluster at {head}" in text
    assert "accuracy" in text                              # the per-epoch table, streamed
    assert artifacts and artifacts[0].type == "table"


def test_dvc_repro_after_the_flow_is_a_noop(flow_repo):
    repo, _ = flow_repo
    lock_before = (repo / "dvc.lock").read_text()
    assert "up to date" in dvc(repo, "status").stdout
    out = dvc(repo, "repro").stdout
    assert "Running stage" not in out, out
    assert (repo / "dvc.lock").read_text() == lock_before


def test_course_all_without_the_warm_cluster_starts_no_head(flow_repo, monkeypatch):
    """`python -m flows.course --all --no-warm-cluster`: neither the course-all flow nor its
    per-recipe subflows start a head (the subflows used to start one each with their default)."""
    import contextlib

    from flows import course as flows

    repo, _ = flow_repo
    lock_before = (repo / "dvc.lock").read_text()
    started = []
    monkeypatch.setattr(flows.cluster, "warm", lambda *a, **k: started.append(a) or contextlib.nullcontext())
    state = flows.course_all(root=str(repo), recipes=["adult"], warm_cluster=False, return_state=True)
    assert state.is_completed(), state
    assert started == []
    assert (repo / "dvc.lock").read_text() == lock_before   # every stage was up to date


def test_changing_a_train_param_reruns_only_downstream_stages(flow_repo):
    repo, _ = flow_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    original = (repo / "params.yaml").read_text()
    params["recipes"]["adult"]["train"]["lr"] = 0.02
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(dvc(repo, "status", "--json").stdout)
    finally:
        (repo / "params.yaml").write_text(original)
    # DVC reports the stage whose own deps changed; evaluate/export follow once its outputs do.
    assert set(status) == {"train@adult"}, status
    assert status["train@adult"][0]["changed deps"]["params.yaml"] == {"recipes.adult.train": "modified"}


# one knob of every section, and the only stage whose declared params it changes (the param audit
# in the recipe tests shows each stage reads only what it declares; here DVC agrees)
KNOBS = [
    ("recipes.adult.source", "uci", {"prepare@adult"}),
    ("recipes.adult.sources.synthetic.rows", 2500, {"prepare@adult"}),
    ("recipes.adult.prepare.seed", 1, {"prepare@adult"}),          # a new key in an empty section
    ("defaults.prepare.valid_pct", 0.25, {"prepare@adult"}),
    ("recipes.adult.validate.examples", 7, {"validate@adult"}),
    ("defaults.validate.min_rows", 500, {"validate@adult"}),
    ("recipes.adult.model.emb_drop", 0.1, {"train@adult"}),
    ("recipes.adult.train.lr", 0.02, {"train@adult"}),
    ("defaults.train.pct_start", 0.3, {"train@adult"}),
    ("recipes.adult.evaluate.bs", 128, {"evaluate@adult"}),
    ("defaults.evaluate.bs", 512, {"evaluate@adult"}),
    ("recipes.adult.export.parity_rows", 100, {"export@adult"}),
    ("defaults.export.opset", 17, {"export@adult"}),
    ("recipes.adult.schedule.cron", "5 1 * * *", set()),             # the deployment's, no stage's
    ("ray_storage", "/tmp/elsewhere", set()),                         # where, not what
]


def test_each_knob_reruns_exactly_the_stage_that_reads_it(flow_repo):
    repo, _ = flow_repo
    original = (repo / "params.yaml").read_text()
    try:
        for key, value, stages in KNOBS:
            raw = yaml.safe_load(original)
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[leaf] = value
            (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            status = json.loads(dvc(repo, "status", "--json").stdout)
            assert set(status) == stages, (key, status)
    finally:
        (repo / "params.yaml").write_text(original)
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


def test_dvc_experiment_and_metrics_diff(flow_repo):
    repo, _ = flow_repo
    sh(["git", "add", "-A"], cwd=repo, **GIT)
    sh(["git", "commit", "-qm", "baseline run"], cwd=repo, **GIT)
    dvc(repo, "exp", "run", "-S", "recipes.adult.train.lr=0.003")
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    change = diff["metrics/adult.json"]["accuracy"]
    assert change["old"] != change["new"]
    shown = dvc(repo, "exp", "show", "--json").stdout
    assert "0.003" in shown


def test_nightly_deployment_is_registered_with_the_params_cron(project, prefect_api):
    from prefect.client.orchestration import get_client

    from flows.deploy import deployment_name, register

    raw = yaml.safe_load(project.params.read_text())
    raw["recipes"]["adult"]["schedule"]["cron"] = "15 3 * * 1"
    project.params.write_text(yaml.safe_dump(raw, sort_keys=False))
    (dep_id,) = register(str(project.root))
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"course/{deployment_name('adult')}")
    assert dep.id == dep_id
    assert [s.schedule.cron for s in dep.schedules] == ["15 3 * * 1"]
    assert dep.schedules[0].active
    assert dep.parameters == {"recipe": "adult", "root": str(project.root)}


def test_committed_data_dvc_is_what_fetch_generates_and_dvc_pull_restores_it(tmp_path):
    """data.dvc is committed: fetching every recipe's default (synthetic) source on a fresh clone
    reproduces it byte for byte, and once pushed, `dvc pull` brings data/ back."""
    import shutil

    from coursepipe import recipes
    from coursepipe.paths import Paths

    repo = make_repo(tmp_path / "repo")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    shutil.copy(REPO / "data.dvc", repo / "data.dvc")
    assert json.loads(dvc(repo, "status", "--json", "data.dvc").stdout)  # a fresh clone: no data/ yet
    paths = Paths(repo)
    params = recipes.load_params(paths.params)
    for name in params.recipes:
        fetch(params.recipe(name), paths)
    dvc(repo, "add", "data")                                  # what `coursepipe fetch` runs after
    assert (repo / "data.dvc").read_bytes() == (REPO / "data.dvc").read_bytes()  # git status: clean
    assert json.loads(dvc(repo, "status", "--json", "data.dvc").stdout) == {}

    dvc(repo, "push", "data.dvc")
    files = {p.relative_to(repo): p.read_bytes() for p in sorted((repo / "data").rglob("*")) if p.is_file()}
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull", "data.dvc")
    assert {p.relative_to(repo): p.read_bytes() for p in sorted((repo / "data").rglob("*")) if p.is_file()} == files


def test_course_all_fetches_each_recipe_once_across_upstream_chains(prefect_api, tmp_path,
                                                                    monkeypatch):
    """imdb starts from imdb_lm, which starts from imdb_pretrain: in one course-all run each
    source is fetched once, not once per recipe whose chain names it (the stages are stubbed:
    this is the flow's order of work, on the project's own params.yaml)."""
    import contextlib
    import shutil

    from flows import course as flows

    repo = tmp_path
    shutil.copyfile(REPO / "params.yaml", repo / "params.yaml")
    fetches = []
    monkeypatch.setattr(flows.cluster, "warm", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(flows, "fetch", lambda name, root: fetches.append(name))
    monkeypatch.setattr(flows, "STAGE_TASKS", {s: (lambda recipe, root: None) for s in STAGES})
    monkeypatch.setattr(flows, "report", lambda recipe, root: {"recipe": recipe})
    chain = ["imdb_pretrain", "imdb_lm", "imdb"]
    state = flows.course_all(root=str(repo), recipes=chain, return_state=True)
    assert state.is_completed(), state
    assert state.result() == {name: {"recipe": name} for name in chain}
    assert fetches == chain                                     # was 6: 1 + 2 + 3
    fetches.clear()
    flows.course(recipe="imdb", root=str(repo))                 # on its own: the whole chain
    assert fetches == chain
