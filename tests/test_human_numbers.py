"""human_numbers (lesson 7): the generated dataset, its validation, the lesson's models, a full run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from audit import run_pipeline
from conftest import fetch, load_cfg, small_params, write_params
from coursepipe import config, recipes
from coursepipe.data.archive import deterministic_tgz, extract
from coursepipe.learn.loop import Learner
from coursepipe.models.rnn import ARCHS, LAST_STEP, build, lm_loss
from coursepipe.recipes import human_numbers as hn
from coursepipe.stages import prepare, validate
from coursepipe.text.callbacks import ResetState
from coursepipe.text.lm_data import LMBatches

RECIPE = "human_numbers"
HN = recipes.get(RECIPE)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core box: 2 torch threads stall on each other (seconds per test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hn_params(**model) -> dict:
    """The real section, shrunk: a small GRU, one epoch."""
    raw = small_params(recipes=(RECIPE,))
    sec = raw["recipes"][RECIPE]
    sec["model"].update({"nh": 16, **model})
    sec["train"].update({"epochs": 1, "num_workers": 1})
    sec["export"]["parity_rows"] = 300
    return raw


@pytest.fixture
def hn_project(project):
    write_params(project.root, hn_params())
    return project


def hn_cfg(paths):
    return load_cfg(paths, RECIPE)


def lines_of(blob: bytes, tmp_path) -> dict[str, list[str]]:
    (tmp_path / "a.tgz").write_bytes(blob)
    root = extract(tmp_path / "a.tgz", tmp_path / "x")
    return {k: (root / m).read_text().split("\n") for k, m in hn.FILES.items()}


def tampered(train_lines: list[str], valid_lines: list[str]) -> bytes:
    return deterministic_tgz({hn.FILES["train"]: "".join(f"{s} \n" for s in train_lines).encode(),
                              hn.FILES["valid"]: "".join(f"{s} \n" for s in valid_lines).encode()})


# ----------------------------------------------------------------------------- the dataset

def test_number_words_spell_as_fastai_and_parse_back():
    assert hn.number_words(1) == "one"
    assert hn.number_words(20) == "twenty"
    assert hn.number_words(110) == "one hundred ten"
    assert hn.number_words(8001) == "eight thousand one"
    assert hn.number_words(9999) == "nine thousand nine hundred ninety nine"
    assert all(hn.parse_number(hn.number_words(n)) == n for n in range(1, 10_000))
    for bad in ("", "one hundred and one", "twenty ten", "ten thousand", "seven,"):
        assert np.isnan(hn.parse_number(bad)), bad


def test_generated_archive_has_fastais_layout(tmp_path):
    files = lines_of(hn.synthesize(), tmp_path)
    assert files["train"][:2] == ["one ", "two "] and files["train"][-1] == ""  # ends with a newline
    assert len(files["train"]) - 1 == 8000 and len(files["valid"]) - 1 == 1999
    assert files["valid"][0] == "eight thousand one "
    assert files["valid"][-2] == "nine thousand nine hundred ninety nine "
    assert hn.synthesize() == hn.synthesize()  # byte-identical: DVC sees one version
    with pytest.raises(ValueError, match="fixed set"):
        hn.synthesize(rows=100)


def test_prepare_splits_by_file_not_at_random(hn_project):
    cfg = hn_cfg(hn_project)
    fetch(cfg, hn_project)
    result = prepare.run(cfg, HN, hn_project)
    df = prepare.load(hn_project, RECIPE)
    assert (result.rows, result.valid_rows) == (9999, 1999)
    assert df["is_valid"].tolist() == (df["file"] == "valid").tolist()
    assert df.loc[df["is_valid"], "number"].min() == 8001
    assert df["text"].iloc[0] == "one"  # fastai's trailing space stripped


def test_bad_text_stops_at_validation_naming_each_rule(hn_project):
    """An empty line, a foreign word, a valid line moved into train.txt, a lost line: one run."""
    cfg = hn_cfg(hn_project)
    tr = [hn.number_words(n) for n in range(1, 8001)]
    va = [hn.number_words(n) for n in range(8001, 10_000)]
    tr[10], tr[20] = "", "twenty one apples"
    tr, va = tr + va[:1], va[1:-1]
    archive = hn_project.data / cfg.source_file
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(tampered(tr, va))
    prepare.run(cfg, HN, hn_project)
    with pytest.raises(validate.ValidationFailed) as e:
        validate.run(cfg, HN, hn_project)
    msg = str(e.value)
    for rule in ("expect_column_values_to_match_regex", "expect_column_values_to_be_between",
                 "expect_table_row_count_to_equal", "expect_column_values_to_not_be_null"):
        assert rule in msg, rule
    assert "twenty one apples" in msg and "number" in msg and "text" in msg


def test_model_config_rejects_unknown_arch_and_rnn3_window():
    with pytest.raises(config.ConfigError, match=r"recipes\.human_numbers\.model\.arch: 'lstm'"):
        config.parse(hn_params(arch="lstm"), recipes.Registry())
    with pytest.raises(config.ConfigError, match=r"model\.seq_len: must be 3 for arch rnn3"):
        config.parse(hn_params(arch="rnn3", seq_len=16), recipes.Registry())


# ----------------------------------------------------------------------------- the lesson's models

@pytest.mark.parametrize("arch", ARCHS)
def test_every_lesson_model_predicts_and_learns(arch):
    torch.manual_seed(0)
    model = build(arch, vocab=24, nh=16, n_layers=2)
    x = torch.randint(0, 24, (8, 3 if arch in LAST_STEP else 6))
    y = torch.roll(x, -1, 1)
    out = model(x)
    assert out.shape == ((8, 24) if arch in LAST_STEP else (8, x.shape[1], 24))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(lm_loss(model(x), y).detach())
    for _ in range(30):
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(lm_loss(model(x), y)) < first / 2  # it fits a batch: gradients reach every layer


class CarryNoReset(ResetState):
    """Carries the state but never forgets it: what a resume could not replay."""

    def before_train(self):
        model = self.learn.model
        if not model.carry:
            model.carry = True

    def before_validate(self):
        pass


def train_twice(cb_type) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(2 epochs straight, 1 epoch + resume from weights and optimiser for the 2nd)."""
    ids = torch.randint(0, 24, (801,), generator=torch.Generator().manual_seed(0))

    def learner(model):
        return Learner(model, LMBatches(ids, 8, 10), lambda: LMBatches(ids[:201], 8, 10)(0), lm_loss,
                       torch.optim.AdamW(model.parameters(), lr=1e-2), cbs=[cb_type()])

    torch.manual_seed(0)
    straight = build("gru", 24, 16, 2)
    learner(straight).fit(2)
    torch.manual_seed(0)
    first = build("gru", 24, 16, 2)
    l1 = learner(first)
    l1.fit(1)
    resumed = build("gru", 24, 16, 2)
    resumed.load_state_dict(first.state_dict())
    l2 = learner(resumed)
    l2.opt.load_state_dict(l1.opt.state_dict())
    l2.fit(2, start_epoch=1)
    return straight, resumed


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_at_an_epoch_boundary_is_exact():
    """The state is reset each epoch, so weights + optimiser after epoch 0 are all a resume needs;
    a state carried over the epoch boundary is lost on resume and the runs part."""
    assert same_weights(*train_twice(ResetState))
    assert not same_weights(*train_twice(CarryNoReset))


# ----------------------------------------------------------------------------- the whole pipeline

def test_full_stage_run_and_standalone_predict(hn_project, ray_session, tmp_path):
    cfg = hn_cfg(hn_project)
    fetch(cfg, hn_project)
    # every stage audited: it reads only the params and runs only the code dvc.yaml declares
    done = run_pipeline(cfg, HN, hn_project, storage=hn_project.runs(".runs"))
    assert done["validate"].success
    assert done["train"].epochs_run == 1
    ev = done["evaluate"]
    m = ev.metrics
    assert 0.3 < m["accuracy"] <= 1 and m["perplexity"] == pytest.approx(np.exp(m["valid_loss"]), rel=1e-4)
    assert ev.plot_path.read_bytes()[:4] == b"\x89PNG"
    ex = done["export"]
    assert ex.parity_max_diff <= cfg.export.parity_atol
    state = json.loads((ex.path / "preprocessing.json").read_text())
    assert state["itos"][:3] == ["xxunk", "xxpad", "xxbos"] and len(state["itos"]) == 40
    # the folder alone predicts: a fresh interpreter, no coursepipe on the path
    proc = subprocess.run([sys.executable, "-I", str(ex.path / "predict.py"), "-n", "2",
                           "one", ",", "two", ",", "three", ","], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split("(p=")[0].split()
    assert len(words) == 2 and all(w in state["itos"] for w in words)
    from coursepipe.export.portable_lm import predict_frame
    out = predict_frame(ex.path, pd.DataFrame({"text": ["eight thousand one ,", "nine"]}))
    assert list(out.columns) == ["text", "prediction", "probability"]
    assert out["probability"].between(0, 1).all()
