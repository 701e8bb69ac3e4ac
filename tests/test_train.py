"""Real Ray Train runs (2 CPU workers, gloo) on a tiny synthetic adult table."""
from __future__ import annotations

import pandas as pd
import torch

from audit import run_stage
from coursepipe.config import evolve
from coursepipe.data.batches import shard_batches
from coursepipe.distributed import ray_train
from coursepipe.stages import prepare, train


def with_train(cfg, **kw):
    return evolve(cfg, train=evolve(cfg.train, **kw))


def majority_rate(paths) -> float:
    valid = prepare.load(paths, "adult").query("is_valid")
    return valid["salary"].value_counts(normalize=True).max()


def test_run_name_follows_params_and_data(adult_cfg):
    same = train.run_name(adult_cfg, "digest-a")
    assert same == train.run_name(adult_cfg, "digest-a")
    assert same != train.run_name(adult_cfg, "digest-b")
    assert same != train.run_name(with_train(adult_cfg, lr=0.02), "digest-a")


def test_shards_are_disjoint_and_equal_sized():
    shards = [shard_batches(103, 8, r, 2, seed=1, epoch=0, shuffle=True, drop_last=True)
              for r in range(2)]
    rows = [torch.cat(s).tolist() for s in shards]
    assert len(shards[0]) == len(shards[1])                  # DDP needs equal step counts
    assert not set(rows[0]) & set(rows[1])
    assert all(len(b) == 4 for s in shards for b in s)       # global bs 8 over 2 ranks
    again = shard_batches(103, 8, 0, 2, seed=1, epoch=0, shuffle=True, drop_last=True)
    assert [b.tolist() for b in again] == [b.tolist() for b in shards[0]]  # resume replays


def test_two_workers_fine_tune_and_a_restart_resumes(validated, adult_cfg, adult, ray_session):
    prepared = validated
    # fine_tune: 1 frozen epoch, then 1 unfrozen; DDP is re-wrapped at the phase change
    cfg = with_train(adult_cfg, num_workers=2, freeze_epochs=1, epochs=1)
    storage = prepared.runs(".runs")
    first = run_stage("train", cfg, adult, prepared, storage=storage, verbose=False)  # audited

    assert [h["epoch"] for h in first.history] == [0, 1]
    assert first.history[-1]["accuracy"] > majority_rate(prepared) + 0.03
    assert first.train_seconds > 0
    assert len(first.rank_checksums) == 2 and first.rank_checksums[0] == first.rank_checksums[1]
    hist = pd.read_csv(prepared.history("adult"))
    assert list(hist["epoch"]) == [0, 1] and "valid_loss" in hist
    bundle = train.load_model(prepared, adult)
    assert bundle.run_name == first.run_name

    # Same params and data: the run name repeats, Ray finds the finished run's last checkpoint,
    # and nothing is trained again; the saved weights are the checkpoint's.
    again = train.run(cfg, adult, prepared, storage=storage, verbose=False)
    assert again.run_name == first.run_name
    assert again.history == first.history
    assert again.train_seconds < first.train_seconds / 2
    bundle2 = train.load_model(prepared, adult)
    for k, v in bundle.model.state_dict().items():
        assert torch.equal(v, bundle2.model.state_dict()[k]), k


def test_interrupted_run_continues_from_its_checkpoint(prepared, adult_cfg, adult, ray_session):
    frame = prepare.load(prepared, "adult")
    storage = prepared.runs(".runs")
    m = adult_cfg.model
    one = ray_train.fit(adult, m, with_train(adult_cfg, epochs=1).train, frame, storage, "resume-test",
                        verbose=False)
    # A longer run under the same name picks up after epoch 0 instead of starting over.
    two = ray_train.fit(adult, m, with_train(adult_cfg, epochs=2).train, frame, storage, "resume-test",
                        verbose=False)
    assert two.start_epoch == 1
    assert two.history[0] == one.history[0]
    assert [h["epoch"] for h in two.history] == [0, 1]
    assert not torch.equal(one.state["model"]["layers.0.weight"], two.state["model"]["layers.0.weight"])


def _train_workers(since: float):
    """Ray Train worker processes started after `since` (their title is set by Ray:
    ray::RayTrainWorker...); older ones belong to earlier, finished runs and may still be exiting."""
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        try:
            if p.info["create_time"] >= since and p.is_running() and \
                    any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_killed_worker_is_survived(project, adult, ray_session):
    """SIGKILL a worker mid-run: FailureConfig restarts the group, which resumes from the last
    checkpoint; the run finishes with every epoch exactly once."""
    import threading
    import time

    from conftest import fetch, load_cfg, small_params, write_params

    write_params(project.root, small_params(rows=30000))
    cfg = with_train(load_cfg(project), num_workers=2, epochs=4, max_failures=1)
    fetch(cfg, project)
    prepare.run(cfg, adult, project)
    frame = prepare.load(project, "adult")
    storage = project.runs(".runs")
    out = {}
    since = time.time() - 1  # create_time has ~10 ms resolution
    fitter = threading.Thread(target=lambda: out.update(
        result=ray_train.fit(adult, cfg.model, cfg.train, frame, storage, "kill-test", verbose=False)))
    fitter.start()
    snapshot = project.root / ".runs" / "kill-test" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 120
    while time.time() < deadline and not snapshot.is_file():
        time.sleep(0.2)  # wait until Ray has registered epoch 0's checkpoint
    victims = _train_workers(since)
    assert victims, "no Ray Train worker process found"
    victims[-1].kill()
    fitter.join(timeout=240)
    assert not fitter.is_alive()
    result = out["result"]
    assert result.start_epoch >= 1          # the restarted group resumed, it did not start over
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
