"""The streaming data path (`train.data_path: ray_data`): the driver and the workers hold the
prepared table without its image bytes; each rank reads its rows from Ray Data, decoded in Ray
Data's tasks; one worker reruns an epoch exactly."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import fetch, load_cfg, write_params
from coursepipe import config, recipes
from coursepipe.distributed.ray_train import ShardBatches, decode_rows, shuffle_rows
from test_pets import tiny_params

OWN = recipes.get("own_images")


def streamed(project, rows: int = 60, **train):
    """own_images' synthetic sample, prepared and validated, with train.data_path: ray_data."""
    from coursepipe.stages import prepare, validate
    from coursepipe.validation.suites import init_suite

    raw = tiny_params("own_images", rows=rows)
    raw["recipes"]["own_images"]["validate"]["min_per_class"] = 2
    raw["recipes"]["own_images"]["train"].update({"data_path": "ray_data", "freeze_epochs": 0,
                                                  "epochs": 2, **train})
    write_params(project.root, raw)
    cfg = load_cfg(project, "own_images")
    init_suite(cfg, OWN, project)
    fetch(cfg, project)
    prepare.run(cfg, OWN, project)
    validate.run(cfg, OWN, project)
    return cfg


def test_the_driver_frame_has_no_image_bytes_and_the_same_processor(project):
    from coursepipe.stages import prepare, train

    cfg = streamed(project)
    frame, stream = train.load_frame(cfg, OWN, project)
    full = prepare.load(project, "own_images")
    assert "image" not in frame.columns and len(frame) == len(full)
    assert stream.processor == OWN.kind.fit_processor(OWN, full[~full["is_valid"]], cfg.model)
    # one map_batches call: the kind's own tensors, as numpy, for the rows it uses
    out = decode_rows(OWN, stream.processor, cfg.model, full.head(7))
    x, y = OWN.kind.tensors(OWN, stream.processor, full.head(7))
    assert np.array_equal(out["t0"], x.numpy()) and np.array_equal(out["t1"], y.numpy())
    assert out["t0"].dtype == np.uint8 and out["t0"].shape[1:] == (3, 32, 32)


def test_prepared_image_rows_are_in_a_seeded_random_order_not_class_by_class(project):
    """The streaming path reads row groups through a small shuffle buffer: a class-sorted table
    would make its batches one class each."""
    from coursepipe.stages import prepare

    cfg = streamed(project)
    labels = prepare.load(project, "own_images")["label"].tolist()
    runs = sum(a != b for a, b in zip(labels, labels[1:])) + 1
    assert runs > len(labels) // 3, f"{runs} runs of one class in {len(labels)} rows"
    assert labels != sorted(labels)
    prepare.run(cfg, OWN, project)   # the same seed: the same order, byte for byte
    assert prepare.load(project, "own_images")["label"].tolist() == labels


def test_data_stats_are_fitted_from_the_training_pixels_on_the_driver(project):
    from coursepipe.stages import prepare, train

    cfg = streamed(project)
    cfg = dataclasses.replace(cfg, model=config.evolve(cfg.model, normalize="data"))
    _, stream = train.load_frame(cfg, OWN, project)
    full = prepare.load(project, "own_images")
    assert stream.processor["mean"] == OWN.kind.fit_processor(OWN, full[~full["is_valid"]], cfg.model)["mean"]


def test_a_kind_without_a_streaming_path_is_refused_naming_the_key(prepared, adult_cfg, adult):
    from coursepipe.stages import train

    cfg = dataclasses.replace(adult_cfg, train=config.evolve(adult_cfg.train, data_path="ray_data"))
    with pytest.raises(config.ConfigError, match=r"recipes.adult.train.data_path: ray_data"):
        train.load_frame(cfg, adult, prepared)


def test_the_lessons_language_model_keeps_memory_and_is_refused_naming_its_model_section(project):
    """human_numbers is one ordered document (a shuffle of its rows would be another task): its
    kind streams AWD-LSTM corpora only, and says so before anything is read."""
    from conftest import small_params
    from coursepipe.stages import train

    raw = small_params(recipes=("human_numbers",))
    raw["recipes"]["human_numbers"]["train"]["data_path"] = "ray_data"
    write_params(project.root, raw)
    with pytest.raises(config.ConfigError, match=r"recipes.human_numbers.train.data_path: ray_data "
                                                  r".*language_model has none for a LMModel model"):
        train.load_frame(load_cfg(project, "human_numbers"), recipes.get("human_numbers"), project)


def test_a_corpus_whose_texts_are_not_in_text_is_refused_the_streaming_path(project):
    from conftest import small_params
    from coursepipe.contract import Schema

    raw = small_params(recipes=("imdb_pretrain", "imdb_lm"))
    raw["recipes"]["imdb_lm"]["train"]["data_path"] = "ray_data"
    write_params(project.root, raw)
    cfg, lm = load_cfg(project, "imdb_lm"), recipes.get("imdb_lm")
    lm.check_config(cfg)                                   # the corpus recipes stream "text"
    other = dataclasses.replace(lm, schema=Schema(columns=("review", "part"), target="review"))
    with pytest.raises(config.ConfigError, match=r"recipes.imdb_lm.train.data_path: ray_data streams "
                                                  r"the text column 'text'.*'review'"):
        other.check_config(cfg)


def test_every_rank_takes_the_same_steps_and_validation_counts_each_row_once():
    a = [ShardBatches("train", 101, 10, r, 2, 0, True, 64) for r in (0, 1)]
    assert [len(s) for s in a] == [10, 10] and a[0].bs == 5     # 50 rows a rank, batches of 5
    v = [ShardBatches("valid", 101, 10, r, 2, 0, False, 64) for r in (0, 1)]
    assert [len(s) for s in v] == [11, 0] and list(v[1]()) == []


class FakeShard:
    """ray.train.get_dataset_shard's stand-in: 5 batches of (image, label), counting executions."""

    def __init__(self):
        self.executions = 0

    def iter_torch_batches(self, batch_size, drop_last, **shuffle):
        import torch
        self.executions += 1
        for i in range(5):
            yield {"t0": torch.full((batch_size, 3, 4, 4), i, dtype=torch.uint8),
                   "t1": torch.arange(batch_size) + 100 * i}


@pytest.mark.parametrize("cache_mb, last_epoch, executions", [
    (1, 3, 1),     # fits: streamed once, epochs 1-3 scored from the kept batches
    (0, 3, 4),     # valid_cache_mb: 0: a Ray Data execution every epoch
    (1, 0, 4),     # the only epoch: nothing is kept for an epoch that never comes
])
def test_the_validation_split_is_kept_once_and_scored_identically(monkeypatch, cache_mb, last_epoch,
                                                                  executions):
    import ray.train
    from coursepipe.distributed import ray_train

    shard = FakeShard()
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard)
    ray_train.DATA_WAITS.clear()
    clock = {"epoch": 0}
    valid = ShardBatches("valid", 40, 8, 0, 1, 0, False, 64, cache_bytes=cache_mb * 2 ** 20,
                         last_epoch=last_epoch, clock=clock)
    passes = []
    for epoch in range(4):
        clock["epoch"] = epoch
        passes.append([tuple(x.tolist() for x in b) for b in valid()])
    assert shard.executions == executions
    assert all(p == passes[0] for p in passes) and len(passes[0]) == 5  # every row, same order
    assert [w["source"] for w in ray_train.DATA_WAITS] == \
        ["stream"] * executions + ["cache"] * (4 - executions)
    assert [w["epoch"] for w in ray_train.DATA_WAITS] == [0, 1, 2, 3]


@pytest.mark.parametrize("cache_mb, valid_sources", [
    (1, ["stream, started ahead", "cache", "cache"]),   # kept after epoch 0: started ahead once
    (0, ["stream, started ahead"] * 3),                 # streamed every epoch: started every epoch
])
def test_a_streamed_validation_pass_starts_once_its_train_pass_has_a_batch(monkeypatch, cache_mb,
                                                                           valid_sources):
    import ray.train
    from coursepipe.distributed import ray_train

    shards = {"train": FakeShard(), "valid": FakeShard()}
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shards[name])
    ray_train.DATA_WAITS.clear()
    clock, siblings = {"epoch": 0}, {}
    train = ShardBatches("train", 40, 8, 0, 1, 0, True, 64, last_epoch=2, clock=clock, siblings=siblings)
    valid = ShardBatches("valid", 40, 8, 0, 1, 0, False, 64, cache_bytes=cache_mb * 2 ** 20,
                         last_epoch=2, clock=clock, siblings=siblings)
    for epoch in range(3):
        batches = train(epoch)
        next(batches)
        assert valid.ahead is None  # not yet: the train pass's execution comes first
        next(batches)
        if valid.cache is None:  # the validation execution began before the train pass's end
            valid.ahead.thread.join()
            assert valid.ahead.epoch == epoch and shards["valid"].executions == epoch + 1
        assert len(list(batches)) == 3
        assert len(list(valid())) == 5
    assert [w["source"] for w in ray_train.DATA_WAITS if w["split"] == "valid"] == valid_sources
    assert shards["valid"].executions == valid_sources.count("stream, started ahead")


def test_a_validation_split_over_the_bound_is_streamed_every_epoch(monkeypatch):
    import ray.train

    shard = FakeShard()
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard)
    one_batch = 8 * 3 * 4 * 4 + 8 * 8       # uint8 images + int64 labels
    valid = ShardBatches("valid", 40, 8, 0, 1, 0, False, 64, cache_bytes=4 * one_batch, last_epoch=3)
    for _ in range(3):
        assert len(list(valid())) == 5
    assert shard.executions == 3 and valid.cache is None  # 5 batches > 4 batches' bytes


def test_one_worker_streams_trains_and_reruns_identically(project, ray_session, tmp_path):
    """Two runs: the second streams the validation split every epoch (valid_cache_mb: 0) where
    the first scores epoch 1 from the batches it kept; the histories are equal."""
    from coursepipe.distributed import ray_train
    from coursepipe.stages import train

    cfg = streamed(project)
    frame, stream = train.load_frame(cfg, OWN, project)
    runs = [ray_train.fit(OWN, cfg.model, config.evolve(cfg.train, valid_cache_mb=mb), frame,
                          storage=str(tmp_path / f"s{mb}"), run_name="stream", verbose=False,
                          stream=stream) for mb in (cfg.train.valid_cache_mb, 0)]
    a, b = (r.history for r in runs)
    assert [h["epoch"] for h in a] == [0, 1]
    assert [(h["train_loss"], h["valid_loss"], h["accuracy"]) for h in a] == \
        [(h["train_loss"], h["valid_loss"], h["accuracy"]) for h in b]
    # rank 0's passes: a Ray Data execution of its train shard every epoch (the next one started
    # when a train pass ends); of the validation split only in epoch 0 when it is kept
    ahead = "stream, started ahead"
    assert [(w["split"], w["epoch"], w["source"]) for w in runs[0].worker["data_waits"]] == \
        [("train", 0, "stream"), ("valid", 0, ahead), ("train", 1, ahead), ("valid", 1, "cache")]
    assert [w["source"] for w in runs[1].worker["data_waits"]] == ["stream", ahead, ahead, ahead]
    t = cfg.train
    assert all(w["batches"] == (48 // t.bs if w["split"] == "train" else -(-12 // t.valid_bs))
               for r in runs for w in r.worker["data_waits"])           # every batch, every pass
    n_valid = 12                                                 # 20 % of 60 rows
    assert a[-1]["accuracy"] * n_valid == pytest.approx(round(a[-1]["accuracy"] * n_valid))  # each row once
    # it trains on what it streams (6 steps on 48 images: the loss, not yet the accuracy, moves;
    # that each row's tensors are the kind's own for that row is the first test's check)
    assert a[-1]["train_loss"] < a[0]["train_loss"]




def test_two_ranks_stream_their_shards_in_step(project, ray_session, tmp_path):
    """Two DDP ranks on the streaming path (decode tasks sharing the workers' CPUs: 2 x 1 of 2
    are taken): each takes the same number of steps, rank 0 scores every validation row, and
    the ranks' weights are equal at the end."""
    from coursepipe.distributed import ray_train
    from coursepipe.stages import train

    cfg = streamed(project, num_workers=2, cpus_per_worker=1, decode_cpus=0.0, epochs=1)
    frame, stream = train.load_frame(cfg, OWN, project)
    run = ray_train.fit(OWN, cfg.model, cfg.train, frame, storage=str(tmp_path), run_name="two",
                        verbose=False, stream=stream)
    assert len(run.rank_checksums) == 2 and run.rank_checksums[0] == run.rank_checksums[1]
    parts = run.worker["rss_now_mb"]                      # rank 0's memory by kind, at its end
    assert set(parts) == {"anon", "file", "shmem"} and parts["anon"] > 100
    waits = {w["split"]: w for w in run.worker["data_waits"]}           # rank 0's passes
    assert waits["train"]["batches"] == (48 // 2) // (cfg.train.bs // 2)
    assert waits["valid"]["batches"] == -(-12 // cfg.train.valid_bs)     # all 12 rows, on rank 0
    assert run.history[-1]["accuracy"] * 12 == pytest.approx(round(run.history[-1]["accuracy"] * 12))

@pytest.mark.parametrize("env, v2", [(None, False), ("1", True), ("true", True), ("0", False)])
def test_the_table_is_read_by_the_v1_parquet_reader_unless_ray_is_told_otherwise(
        project, ray_session, monkeypatch, capfd, env, v2):
    """V2 lists files and reads footers in new actor processes every epoch (its source operator
    is ListFiles); V1 reads the footer once, here, and each epoch is one ReadParquet task."""
    from coursepipe.distributed import ray_train
    from coursepipe.stages import train

    if env is None:
        monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    else:
        monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", env)
    cfg = streamed(project)
    _, stream = train.load_frame(cfg, OWN, project)
    capfd.readouterr()
    plan = ray_train.datasets(OWN, cfg.model, cfg.train, stream)["train"]._logical_plan.dag
    assert "Estimated parquet" not in "".join(capfd.readouterr())  # no INFO lines in the stage's log
    while plan.input_dependencies:  # down to the source operator
        plan = plan.input_dependencies[0]
    assert plan.name == ("ListFiles" if v2 else "ReadParquet")


@pytest.mark.parametrize("buffer", [1, 64, 65, 256])
def test_a_small_shuffle_buffer_still_gives_only_whole_batches(ray_session, buffer):
    """Ray Data's own local shuffle, as a rank asks for it: every batch full, none left out."""
    import ray.data

    ds = ray.data.range(800, override_num_blocks=27)  # blocks as the prepared table's split gives
    sizes = [len(b["id"]) for b in ds.iter_batches(
        batch_size=64, drop_last=True, local_shuffle_buffer_size=shuffle_rows(buffer, 64),
        local_shuffle_seed=1)]
    assert sizes == [64] * (800 // 64)


def test_a_streaming_run_with_no_cpu_left_to_decode_is_refused_naming_the_keys(adult_cfg):
    """Decode tasks run only on CPUs Ray Train's workers leave: none left would wait forever."""
    from coursepipe.distributed.ray_train import decode_room

    t = config.evolve(adult_cfg.train, num_workers=2, cpus_per_worker=1, decode_cpus=1.0)
    with pytest.raises(config.ConfigError, match=r"train.decode_cpus is 1, .* 2 CPUs .* \(2 x 1\) "
                                                 r"leave 0 for"):
        decode_room(t, 2.0)
    decode_room(config.evolve(t, decode_cpus=0.0), 2.0)   # 0: tasks share the workers' CPUs
    decode_room(config.evolve(t, num_workers=1), 2.0)     # one CPU left, one decode task at a time
    decode_room(t, 3.0)


# ----------------------------------------------------------------------------- text rows

IMDB = recipes.get("imdb")


def text_table(train: int, valid: int, dup: int):
    """A prepared text-classification table: seeded texts of 3-60 words, `dup` of the validation
    rows repeating a training text (marked, as prepare marks them)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    words = "good bad film plot actor boring great the a and".split()
    texts = [" ".join(rng.choice(words, rng.integers(3, 60))) for _ in range(train + valid)]
    texts[train:train + dup] = texts[:dup]
    df = pd.DataFrame({"text": texts, "label": rng.choice(["negative", "positive"], train + valid),
                       "is_valid": [False] * train + [True] * valid})
    df["duplicate"] = [""] * train + ["train"] * dup + [""] * (valid - dup)
    return df


@pytest.mark.parametrize("world", [1, 2])
def test_streamed_text_rows_are_padded_per_batch_in_sortish_chunks(ray_session, monkeypatch, world):
    """Real Ray Data: the text kind's decode tasks emit ragged id rows; each rank pulls chunks of
    50 batches through a seeded local shuffle and makes padded batches of similar lengths: every
    training row of its shard at most once and a replayable order per epoch; rank 0 scores every
    usable validation row once (a duplicate of a training text not at all)."""
    import functools
    import threading
    import types

    import ray.data
    import ray.train
    import torch
    from coursepipe.text.classify import encode, pad_id

    m = types.SimpleNamespace(min_freq=1, max_vocab=100)   # what fit_processor reads
    df = text_table(train=240 * world, valid=60, dup=3)
    processor = IMDB.kind.fit_processor(IMDB, df[~df["is_valid"]], m)
    pad = pad_id(processor["itos"])

    def dataset(valid: bool):
        part = df[df["is_valid"] == valid]
        blocks = [part.iloc[i:i + 40] for i in range(0, len(part), 40)]   # blocks, as a table's
        return ray.data.from_pandas(blocks).map_batches(
            functools.partial(decode_rows, IMDB, processor, m), batch_format="pandas", batch_size=16)

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", False)
    monkeypatch.setattr(ctx.execution_options, "preserve_order", True)   # as fit()'s DataConfig
    splits = {"train": dataset(False).streaming_split(world, equal=True), "valid": dataset(True)}
    # each rank's own shard: rank 1 iterates in a thread named for it, as a second worker would
    shard = {"train": splits["train"], "valid": [splits["valid"].iterator()]}
    monkeypatch.setattr(ray.train, "get_dataset_shard",
                        lambda name: shard[name][threading.current_thread().name == "rank 1"])

    def rows(batches):  # (length, label) of every row, each batch's lengths
        got, spread = [], []
        for x, y in batches:
            n = (x != pad).sum(1)
            assert (x[torch.arange(len(x)), n - 1] != pad).all()      # right-padded, not left
            got += list(zip(n.tolist(), y.tolist()))
            spread.append(int(n.max() - n.min()))
        return sorted(got), spread

    def lengths(part):
        part = IMDB.kind.usable(part)
        return sorted(zip((len(s) for s in encode(processor["itos"], part["text"])),
                          (processor["classes"].index(v) for v in part["label"])))

    kw = {"chunk": IMDB.kind.stream_chunk(m),
          "regroup": functools.partial(IMDB.kind.stream_batches, processor, m)}
    bs = 8 * world                                              # the global batch
    train = ShardBatches("train", 240 * world, bs, 0, world, 5, True, 64, **kw)
    if world == 1:
        first = list(train(0))
        assert len(first) == len(train) == 30 and all(len(y) == 8 for _, y in first)
        got, spread = rows(first)
        assert got == lengths(df[~df["is_valid"]])                  # 240 rows: every one once
        assert np.mean(spread) < np.ptp([n for n, _ in got]) / 2    # sortish, not random
        again, other = (list(train(e)) for e in (0, 1))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
        assert not all(a[0].shape == b[0].shape and torch.equal(a[0], b[0])
                       for a, b in zip(first, other))
        valid = ShardBatches("valid", 57, 8, 0, 1, 5, False, 64, **kw)
        assert len(valid) == len(list(valid())) == 8
        assert rows(valid())[0] == lengths(df[df["is_valid"]])      # 57 usable rows, each once
    else:  # two ranks stream their halves side by side (Ray's equal split waits for both)
        other = ShardBatches("train", 240 * world, bs, 1, world, 5, True, 64, **kw)
        theirs: list = []
        peer = threading.Thread(target=lambda: theirs.extend(other(0)), name="rank 1")
        peer.start()
        mine = list(train(0))
        peer.join()
        assert len(mine) == len(theirs) == len(train) == len(other) == 30
        assert all(len(y) == 8 for _, y in mine + theirs)
        assert rows(mine + theirs)[0] == lengths(df[~df["is_valid"]])  # 480 rows, each once


# ----------------------------------------------------------------------------- language-model texts

def corpus_model(seq_len: int):
    from coursepipe.kinds.language_model import AWDLSTMModel
    return AWDLSTMModel(arch="awd_lstm", emb_sz=8, n_hid=8, n_layers=1, drop_mult=0.0, embed_p=0.0,
                        weight_p=0.0, input_p=0.0, hidden_p=0.0, output_p=0.0, embed_init=0.1,
                        seq_len=seq_len, min_freq=1, max_vocab=100)


def thread_agreement(world: int):
    """ShardBatches' `agree` for ranks that are threads: True when every rank has a batch."""
    import threading

    gate, votes, lock = threading.Barrier(world), [], threading.Lock()

    def agree(have: bool) -> bool:
        with lock:
            votes.append(have)
        gate.wait()
        out = all(votes[-world:])
        gate.wait()  # every rank has read this step's votes before any votes again
        return out
    return agree


@pytest.mark.parametrize("world", [1, 2])
def test_streamed_lm_texts_fill_each_ranks_rows_and_ranks_stop_together(ray_session, monkeypatch, world):
    """Real Ray Data: a language model's decode tasks emit each text's ids; a rank fills its
    bs / world rows with the whole texts its shard hands over (lm_data.lane_batches), and ranks
    whose texts give different numbers of batches stop at the same step, reading the rest of
    their shard (a second epoch streams again); rank 0 scores the validation texts in the memory
    path's layout."""
    import functools
    import threading

    import pandas as pd
    import ray.data
    import ray.train
    import torch
    from coursepipe.text.lm_data import lane_batches
    from coursepipe.text.tokenizer import encode

    lm, m = recipes.get("imdb_lm"), corpus_model(seq_len=6)
    rng = np.random.default_rng(1)
    words = "good bad film plot actor boring great the a and".split()
    # lengths from 2 to 80 words: the two halves of the rows rarely hold the same tokens
    texts = [" ".join(rng.choice(words, n)) for n in rng.integers(2, 80, 100 * world + 30)]
    df = pd.DataFrame({"text": texts, "is_valid": [False] * 100 * world + [True] * 30})
    train_df = df[~df["is_valid"]]
    processor = lm.kind.fit_processor(lm, train_df, m)

    def dataset(valid: bool):
        part = df[df["is_valid"] == valid]
        blocks = [part.iloc[i:i + 10] for i in range(0, len(part), 10)]
        return ray.data.from_pandas(blocks).map_batches(
            functools.partial(decode_rows, lm, processor, m), batch_format="pandas", batch_size=8)

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", False)
    monkeypatch.setattr(ctx.execution_options, "preserve_order", True)
    shard = {"train": dataset(False).streaming_split(world, equal=True),
             "valid": [dataset(True).iterator()]}
    rank_of = lambda: int(threading.current_thread().name == "rank 1")  # noqa: E731
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard[name][rank_of()])
    received: dict[int, list] = {0: [], 1: []}   # the texts each rank's pass was handed

    def regroup(chunks, bs, rng):
        def record(chunks):
            for rows in chunks:
                received[rank_of()].extend(rows["t0"])
                yield rows
        return lm.kind.stream_batches(processor, m, record(chunks), bs, rng)

    bs, rows = 4 * world, len(train_df)
    kw = {"chunk": lm.kind.stream_chunk(m), "regroup": regroup,
          "steps": lm.kind.stream_steps(processor, m, rows, bs, world),
          "agree": thread_agreement(world) if world > 1 else None}
    ranks = [ShardBatches("train", rows, bs, r, world, 5, True, 16, **kw) for r in range(world)]
    key = lambda ids: tuple(ids.tolist())  # noqa: E731
    firsts = []
    for epoch in (0, 1):
        for r in received:
            received[r].clear()
        got: dict[int, list] = {}
        peer = threading.Thread(target=lambda: got.update({1: list(ranks[1](epoch))}), name="rank 1") \
            if world > 1 else None
        if peer:
            peer.start()
        got[0] = list(ranks[0](epoch))
        if peer:
            peer.join()
        # every training text handed to one rank, once, whole (the rest of a pass read too)
        handed = sorted(key(ids) for r in range(world) for ids in received[r])
        assert handed == sorted(key(ids) for ids in encode(processor["itos"], train_df["text"]))
        # each rank's batches are its rows filled from what it was handed, cut where the rank
        # with the fewest batches ran dry; at most the even-share estimate the schedule uses
        alone = [list(lane_batches(received[r], bs // world, 6)) for r in range(world)]
        steps = min(len(a) for a in alone)
        assert [len(got[r]) for r in range(world)] == [steps] * world
        assert 0.8 * len(ranks[0]) <= steps <= len(ranks[0])
        for r in range(world):
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                       for a, b in zip(got[r], alone[r][:steps]))
        firsts.append(got[0][0][0])
    assert not torch.equal(*firsts)   # the local shuffle hands the texts over in another order
    # rank 0 scores the validation texts cut as the memory path cuts them (the same metrics)
    valid = ShardBatches("valid", 30, 8, 0, 1, 5, False, 16, **{**kw, "agree": None, "steps": None})
    memory = lm.kind.batches(lm, processor, df[df["is_valid"]], m, 8, 0, 1, 5, False)
    scored, expected = list(valid()), list(memory(0))
    assert len(scored) == len(expected) > 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(scored, expected))


def test_ranks_with_different_numbers_of_batches_stop_together_and_read_their_rest():
    """together(): one agreement per step; the rank with more batches stops where the other ran
    out and still reads its pass to the end (its Ray Data execution must finish)."""
    import threading

    from coursepipe.distributed.ray_train import together

    agree, read, got = thread_agreement(2), {0: [], 1: []}, {}

    def source(rank: int, n: int):
        for i in range(n):
            read[rank].append(i)
            yield i

    peer = threading.Thread(target=lambda: got.update({1: list(together(source(1, 7), agree))}))
    peer.start()
    got[0] = list(together(source(0, 4), agree))
    peer.join(timeout=30)
    assert not peer.is_alive() and got == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert read == {0: [0, 1, 2, 3], 1: list(range(7))}
