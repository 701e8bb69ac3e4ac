"""The training techniques in coursepipe/learn: schedules, fine_tune pieces, the LR finder."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from torch import nn

from coursepipe.config import evolve
from coursepipe.learn import fine_tune, lr_finder, program
from coursepipe.learn.schedule import one_cycle_lr, one_cycle_mom
from coursepipe.stages import prepare


def test_one_cycle_shape():
    f = one_cycle_lr(1e-2, pct_start=0.25, div=25, div_final=1e5)
    assert f(0) == pytest.approx(1e-2 / 25)
    assert f(0.25) == pytest.approx(1e-2)
    assert f(1) == pytest.approx(1e-2 / 1e5)
    assert f(0.1) < f(0.2) and f(0.5) > f(0.9)
    m = one_cycle_mom((0.95, 0.85, 0.95), 0.25)
    assert m(0) == pytest.approx(0.95) and m(0.25) == pytest.approx(0.85) and m(1) == pytest.approx(0.95)


def test_discriminative_lrs_are_geometric():
    assert fine_tune.lr_scales(3, 1e-5, 1e-3) == pytest.approx([0.01, 0.1, 1.0])
    assert fine_tune.lr_scales(2, 1e-3, 1e-3) == [1.0, 1.0]


def test_phases_follow_fastai_fine_tune(adult_cfg):
    t = dataclasses.replace(adult_cfg.train, freeze_epochs=1, epochs=3, lr=1e-2, lr_mult=100)
    frozen, unfrozen = fine_tune.phases(t)
    assert frozen == fine_tune.Phase(1, (1e-2, 1e-2), 0.99, frozen=True)
    assert unfrozen.epochs == 3 and unfrozen.lr == pytest.approx((5e-5, 5e-3)) and not unfrozen.frozen
    assert fine_tune.locate([frozen, unfrozen], 0) == (0, 0)
    assert fine_tune.locate([frozen, unfrozen], 2) == (1, 1)
    assert fine_tune.locate([frozen, unfrozen], 4) == (2, 0)
    assert len(fine_tune.phases(dataclasses.replace(t, freeze_epochs=0))) == 1
    # lesson 1's explicit unfrozen slice(1e-6, 1e-4)
    _, lesson1 = fine_tune.phases(dataclasses.replace(t, unfrozen_lr=1e-4))
    assert lesson1.lr == pytest.approx((1e-6, 1e-4))


def test_freeze_keeps_batchnorm_trainable():
    body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    head = nn.Linear(8, 2)
    model = nn.Sequential(body, head)
    groups = [list(body.parameters()), list(head.parameters())]
    fine_tune.freeze_to(model, groups, -1)
    assert not body[0].weight.requires_grad and body[1].weight.requires_grad
    assert head.weight.requires_grad
    fine_tune.freeze_to(model, groups, 0)
    assert all(p.requires_grad for p in model.parameters())


def bn_run(mode: str) -> tuple[bool, bool, bool]:
    """Run a frozen then an unfrozen phase with train.bn = mode on a body with BatchNorm; return
    whether the body's running mean moved in each phase and whether the head's BN moved at all."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
    head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 2))
    model = nn.Sequential(body, head)
    groups = [list(body.parameters()), list(head.parameters())]
    x, y = torch.randn(64, 4) * 3 + 1, torch.randint(0, 2, (64,))
    batches = lambda epoch=0: [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]  # noqa: E731
    learn = program.Learner(model, batches, batches, nn.CrossEntropyLoss(),
                            torch.optim.SGD(model.parameters(), lr=0.1),
                            cbs=[fine_tune.BodyBatchNorm(mode, groups)] if mode != "train" else [])
    moved, head_before = [], head[0].running_mean.clone()
    for n in (-1, 0):                       # frozen phase, then unfrozen
        before = body[1].running_mean.clone()
        fine_tune.freeze_to(model, groups, n, train_bn=mode == "train")
        learn.fit(1)
        moved.append(not torch.equal(before, body[1].running_mean))
    return moved[0], moved[1], not torch.equal(head_before, head[0].running_mean)


def test_train_bn_modes_keep_or_update_the_body_statistics():
    assert bn_run("train") == (True, True, True)             # fastai: BN always learns
    assert bn_run("freeze_frozen") == (False, True, True)    # fastai train_bn=False + BnFreeze
    assert bn_run("fixed_stats") == (False, False, True)     # pretrained statistics kept; head's BN trains


def test_channels_last_converts_the_model_and_image_batches_and_computes_the_same():
    """train.channels_last: the conv weights and every 4-D batch in NHWC; the numbers unchanged."""
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return x

    def run(fmt):
        torch.manual_seed(0)
        model = nn.Sequential(Spy(), nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        model = model.to(memory_format=fmt)
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
        learn = program.Learner(model, lambda epoch=0: [(x, y)], lambda: [(x, y)], nn.CrossEntropyLoss(),
                                torch.optim.SGD(model.parameters(), lr=0.1), memory_format=fmt)
        learn.fit(1)
        return model[1].weight

    w_last = run(torch.channels_last)
    assert seen and all(seen) and w_last.is_contiguous(memory_format=torch.channels_last)
    seen.clear()
    w_plain = run(torch.contiguous_format)
    assert not any(seen)
    assert torch.allclose(w_last, w_plain, atol=1e-6)


def quiet() -> program.Hooks:
    return program.Hooks(show=False)


def test_frozen_phase_trains_only_the_head_then_lrs_spread(prepared, adult_cfg, adult):
    cfg = evolve(adult_cfg, train=evolve(adult_cfg.train, freeze_epochs=1))
    parts = program.build(adult, cfg.model, cfg.train, prepare.load(prepared, "adult"), quiet())
    frozen, unfrozen = fine_tune.phases(cfg.train)
    emb_before = [p.detach().clone() for p in parts.groups[0]]
    head_before = [p.detach().clone() for p in parts.groups[-1]]
    program.enter_phase(parts, frozen, cfg.train)
    parts.learn.fit(1)
    assert all(torch.equal(a, b) for a, b in zip(emb_before, parts.groups[0]))
    assert not all(torch.equal(a, b) for a, b in zip(head_before, parts.groups[-1]))
    program.enter_phase(parts, unfrozen, cfg.train)
    parts.learn.fit(1, epoch_offset=1)
    lrs = [g["lr"] for g in parts.learn.opt.param_groups]
    assert lrs[0] / lrs[1] == pytest.approx(1 / cfg.train.lr_mult)
    assert not all(torch.equal(a, b) for a, b in zip(emb_before, parts.groups[0]))
    assert [h["epoch"] for h in parts.recorder.history] == [0, 1]


def test_lr_finder_suggests_and_restores(prepared, adult_cfg, adult):
    parts = program.build(adult, adult_cfg.model, adult_cfg.train, prepare.load(prepared, "adult"), quiet())
    program.enter_phase(parts, fine_tune.phases(adult_cfg.train)[0], adult_cfg.train)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    result = lr_finder.lr_find(parts.learn, 1e-6, 10.0, num_it=60)
    assert 10 <= len(result["lrs"]) <= 60 and result["lrs"] == sorted(result["lrs"])
    assert result["losses"][-1] > min(result["losses"])       # it ran into divergence or rising loss
    i_min = result["losses"].index(min(result["losses"]))
    assert result["suggestions"]["minimum"] == pytest.approx(result["lrs"][i_min] / 10)
    assert result["lrs"][0] <= result["suggestions"]["steep"] <= result["lrs"][-1]
    assert all(torch.equal(v, parts.model.state_dict()[k]) for k, v in before.items())
    assert lr_finder.plot(result, "t")[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the training program

def test_the_program_runs_in_process_and_resumes_exactly_from_its_own_checkpoint(prepared, adult_cfg, adult):
    """The function the Ray worker runs, with local hooks: its epoch-0 checkpoint state is plain
    tensors and values (weights_only loads it), and a run resumed from it finishes exactly as the
    uninterrupted run did (weights, optimiser, schedule position and RNG states restored)."""
    frame = prepare.load(prepared, "adult")
    t = evolve(adult_cfg.train, epochs=2)
    saved = []

    def keep(metrics, make_state):  # as the Ray hook does: serialise the state when it is made
        buf = io.BytesIO()
        torch.save(make_state(), buf)
        saved.append(buf.getvalue())

    whole = program.train(adult, adult_cfg.model, t, frame, program.Hooks(show=False, report=keep))
    assert [h["epoch"] for h in whole.history] == [0, 1] and whole.start_epoch == 0
    after_epoch0 = torch.load(io.BytesIO(saved[0]), weights_only=True)  # no pickled objects in it

    resumed = program.train(adult, adult_cfg.model, t, frame,
                            program.Hooks(show=False, resume=lambda: after_epoch0))
    assert resumed.start_epoch == 1 and [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[0] == whole.history[0]
    for key in ("train_loss", "valid_loss", "accuracy"):
        assert resumed.history[1][key] == pytest.approx(whole.history[1][key], rel=1e-6), key


def test_rng_state_round_trips_through_plain_values():
    import random

    import numpy as np

    program.seed_everything(7)
    state = program.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    program.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def _validate_rank(rank: int, store: str, out: str) -> None:
    """One DDP rank: rank 0 holds every validation batch, rank 1 none (the streaming path)."""
    import torch.distributed as dist

    from coursepipe.learn.loop import Learner
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    valid = (lambda: [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]) if rank == 0 else (lambda: [])

    def reduce(t):
        dist.all_reduce(t)
        return t
    learn = Learner(model, lambda e: [], valid, nn.CrossEntropyLoss(),
                    torch.optim.SGD(model.parameters(), lr=0.1), reduce=reduce)
    res = learn.validate()
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(res["valid_loss"]))
    dist.destroy_process_group()


def test_ranks_with_unequal_validation_batches_do_not_wait_on_each_other(tmp_path):
    """DDP's wrapped forward broadcasts buffers (a collective): validation scoring through it hung
    when one rank had batches and the other none."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_validate_rank, args=(r, str(tmp_path / "store"), str(tmp_path / "loss")))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(alive), "validation hung: a rank waited in a collective the other never joined"
    assert all(p.exitcode == 0 for p in procs)
    losses = {(tmp_path / f"loss.{r}").read_text() for r in (0, 1)}
    assert len(losses) == 1   # both ranks report the same summed loss
