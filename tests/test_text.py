"""coursepipe/text: fastai's tokenizer rules, the vocabulary, LM batches, the state-reset callback."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coursepipe.learn.loop import Learner
from coursepipe.models.rnn import build, lm_accuracy, lm_loss
from coursepipe.text.callbacks import ResetState
from coursepipe.text.lm_data import Jitter, LMBatches, lane_batches, lane_steps, rows_of, seq_lengths
from coursepipe.text.tokenizer import (BOS, FAKE, MAJ, PAD, REP, SPECIALS, UNK, UP, WREP, document,
                                       make_vocab, numericalize, text_tokens, tokenize, windows)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core box: 2 torch threads stall on each other (seconds per test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenize_marks_case_and_starts_with_bos():
    assert tokenize("The CAT sat") == [BOS, MAJ, "the", UP, "cat", "sat"]
    assert tokenize("a I", add_bos=False) == ["a", MAJ, "i"]  # one capital letter is a capital, not caps


def test_tokenize_replaces_repeated_characters_and_words():
    assert tokenize("this is sooooo good", add_bos=False) == \
        ["this", "is", "s", REP, "5", "o", "good"]
    assert tokenize("it was very very very good", add_bos=False) == \
        ["it", "was", WREP, "3", "very", "good"]


def test_tokenize_splits_punctuation_and_cleans_html():
    assert tokenize("Good.<br />Bad, isn't it?", add_bos=False) == \
        [MAJ, "good", ".", MAJ, "bad", ",", "isn't", "it", "?"]
    assert tokenize("a/b #1", add_bos=False) == ["a", "/", "b", "#", "1"]


def test_document_joins_lines_as_the_lesson_does():
    assert document(["one ", "two ", " three"], ",") == "one , two , three"
    assert tokenize(document(["one", "twenty two"], ",")) == [BOS, "one", ",", "twenty", "two"]


# ----------------------------------------------------------------------------- vocabulary

def test_vocab_orders_specials_then_frequency_and_pads_to_8():
    tokens = ["b"] * 5 + ["a"] * 3 + ["c"] * 1 + [BOS] * 4
    itos = make_vocab(tokens, min_freq=2)
    assert itos[:len(SPECIALS)] == list(SPECIALS)
    assert itos[len(SPECIALS):len(SPECIALS) + 2] == ["b", "a"]   # c is rare; BOS not repeated
    assert len(itos) % 8 == 0 and set(itos[len(SPECIALS) + 2:]) == {FAKE}


def test_vocab_max_vocab_and_bad_arguments():
    itos = make_vocab(["x"] * 3 + ["y"] * 2 + ["z"], min_freq=1, max_vocab=2)
    assert "x" in itos and "y" in itos and "z" not in itos
    with pytest.raises(ValueError, match="min_freq"):
        make_vocab(["x"], min_freq=0)


def test_numericalize_maps_unknown_words_to_xxunk():
    itos = make_vocab(["a", "a", "b", "b"], min_freq=2)
    ids = numericalize(["a", "zzz", "b"], itos)
    assert ids.dtype == np.int64
    assert [itos[i] for i in ids] == ["a", UNK, "b"]


def test_windows_are_consecutive_and_shifted_by_one():
    x, y = windows(np.arange(11), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


# ----------------------------------------------------------------------------- LM batches

def test_lm_batches_rows_continue_across_batches():
    ids = torch.arange(101)
    batches = list(LMBatches(ids, bs=4, bptt=10)(0))
    x = torch.cat([b[0] for b in batches], 1)
    y = torch.cat([b[1] for b in batches], 1)
    assert x.shape == (4, 25)  # (101 - 1) // 4 tokens per row, all covered
    assert x[1].tolist() == list(range(25, 50))      # row 1 is one contiguous slice of the stream
    assert torch.equal(y, x + 1)                     # targets: the next token
    assert [b[0].shape[1] for b in batches] == [10, 10, 5]


def test_lm_batches_shard_contiguous_slices_per_rank():
    ids = torch.arange(801)
    whole = torch.cat([x for x, _ in LMBatches(ids, bs=8, bptt=7)(0)], 1)
    parts = [torch.cat([x for x, _ in LMBatches(ids, bs=8, bptt=7, rank=r, world=2)(0)], 1)
             for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    assert parts[0].flatten().tolist() == list(range(400))   # rank 0: the first half of the stream
    assert len(list(LMBatches(ids, 8, 7, 0, 2)(3))) == len(list(LMBatches(ids, 8, 7, 1, 2)(3)))
    with pytest.raises(ValueError, match="does not split"):
        LMBatches(ids, bs=5, bptt=7, rank=0, world=2)


def test_jittered_lengths_vary_are_seeded_and_cover_the_stream():
    j = Jitter(p_half=0.2, std=5.0, min_len=5)
    a, b = seq_lengths(1000, 20, j, seed=1, epoch=0), seq_lengths(1000, 20, j, seed=1, epoch=0)
    assert a == b and sum(a) == 1000
    assert len(set(a)) > 5 and min(a[:-1]) >= 5
    assert a != seq_lengths(1000, 20, j, seed=1, epoch=1)
    assert seq_lengths(50, 20, None, 0, 0) == [20, 20, 10]


def test_rows_of_rejects_a_too_short_stream():
    with pytest.raises(ValueError, match="too short"):
        rows_of(torch.arange(3), bs=4)


def numbered_texts(lengths) -> list[np.ndarray]:
    """Texts whose ids number every token of the corpus in order (text i holds a run of them)."""
    ends = np.cumsum(lengths)
    return [np.arange(e - n, e) for n, e in zip(lengths, ends)]


def test_streamed_lm_rows_are_whole_texts_in_arrival_order_and_stop_at_the_first_dry_row():
    texts = numbered_texts(np.random.default_rng(0).integers(1, 40, 60))   # 1-39 tokens each
    total = sum(len(t) for t in texts)
    train = list(lane_batches(texts, lanes=4, bptt=9))
    assert all(x.shape == (4, 9) and torch.equal(y[:, :-1], x[:, 1:]) for x, y in train)
    # a row read across its batches: x then its last target, one contiguous run of whole texts
    x = torch.cat([b[0] for b in train], 1)
    first = {int(t[0]): i for i, t in enumerate(texts)}
    for r in range(4):
        read = torch.cat([x[r], train[-1][1][r, -1:]]).tolist()
        starts = [i for i, v in enumerate(read) if v in first]
        assert starts[0] == 0                                     # a row begins with a whole text
        for a, b in zip(starts, starts[1:]):                      # ... and holds each one whole
            assert read[a:b] == texts[first[read[a]]].tolist()
    # every text goes to one row only, in order, and rows take turns as they run low
    owner = {first[v]: r for r in range(4) for v in torch.cat([x[r], train[-1][1][r]]).tolist() if v in first}
    assert sorted(owner) == list(range(len(owner))) and len(set(owner.values())) == 4
    # training stops at the first batch a row cannot fill, once the texts ran out: each row is left
    # with under one text (<= 39 tokens) and a batch, so the even-share estimate is near
    assert lane_steps(total, 4, 9) - (39 + 9) // 9 <= len(train) <= lane_steps(total, 4, 9)
    assert list(lane_batches(texts[:2], lanes=4, bptt=9)) == []  # too few texts: no batch


def test_lm_processor_counts_the_training_stream_text_by_text():
    import pandas as pd

    from coursepipe import recipes
    from coursepipe.text.tokenizer import stream
    from test_ray_data import corpus_model

    lm, m = recipes.get("imdb_lm"), corpus_model(seq_len=8)
    df = pd.DataFrame({"text": ["A fine film.", "Dull,  dull <br /> DULL!", "fine fine film"]})
    processor = lm.kind.fit_processor(lm, df, m)
    assert processor["train_tokens"] == len(stream(processor, df["text"])) > 3 * 3
    assert processor["itos"] == make_vocab(text_tokens(processor, df["text"]), 1, 100)  # one vocabulary


# ----------------------------------------------------------------------------- state reset

def test_reset_state_callback_carries_within_and_resets_between_epochs():
    torch.manual_seed(0)
    model = build("gru", vocab=16, nh=8, n_layers=2)
    seen = []
    orig = model.forward

    def forward(x):
        seen.append((model.training, model.h is None))
        return orig(x)
    model.forward = forward
    ids = torch.randint(0, 16, (401,))
    train, valid = LMBatches(ids, 4, 10), LMBatches(ids[:201], 4, 10)
    learn = Learner(model, train, lambda: valid(0), lm_loss, torch.optim.SGD(model.parameters(), lr=0.1),
                    {"accuracy": lm_accuracy}, cbs=[ResetState()])
    learn.fit(2)
    n_train, n_valid = len(list(train(0))), len(list(valid(0)))
    epoch = [True] * n_train + [False] * n_valid
    # a fresh (None) state exactly at the first batch of every training and validation phase
    fresh = [s for _, s in seen]
    assert [t for t, _ in seen] == epoch * 2
    assert fresh == ([True] + [False] * (n_train - 1) + [True] + [False] * (n_valid - 1)) * 2
    assert model.carry is False and model.h is None  # after fit: stateless, as exported


def test_stateless_forward_ignores_previous_batches():
    torch.manual_seed(0)
    model = build("gru", vocab=16, nh=8, n_layers=2).eval()
    x = torch.randint(0, 16, (2, 5))
    first = model(x)
    model(torch.randint(0, 16, (2, 5)))
    assert torch.equal(model(x), first)      # carry off: every call starts from zeros
    model.carry = True
    model(torch.randint(0, 16, (2, 5)))
    assert not torch.allclose(model(x), first)  # carry on: the state leaks in, as trained
