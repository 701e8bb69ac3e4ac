"""ULMFiT (lessons 3-4): the IMDB layouts, text validation, the AWD-LSTM, starts_from, gradual
unfreezing as a plan of the shared program, and one audited run of the three recipes chained
(imdb_pretrain -> imdb_lm -> imdb) through real Ray Train, then predict.py from the export alone."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch

from audit import run_pipeline
from conftest import fetch, load_cfg, small_params, write_params

from coursepipe import config, recipes
from coursepipe.learn import program
from coursepipe.models.awd_lstm import AWDLSTM, TextClassifier, match_embeds
from coursepipe.text import imdb
from coursepipe.text.classify import TextBatches

CHAIN = ("imdb_pretrain", "imdb_lm", "imdb")


def tiny_params(rows: int = 100) -> dict:
    raw = small_params(recipes=CHAIN)
    for name in CHAIN:
        sec = raw["recipes"][name]
        sec["sources"]["synthetic"]["rows"] = rows
        sec["model"].update({"emb_sz": 32, "n_hid": 48, "n_layers": 2, "max_vocab": 200})
        sec["train"].update({"epochs": 1, "bs": 8, "valid_bs": 8, "num_workers": 1})
        sec["evaluate"]["bs"] = 8
        sec["export"]["parity_rows"] = 8
    raw["recipes"]["imdb"]["model"]["unfreeze"] = [[1, 0.02], [1, 0.005]]
    return raw


def extract(blob: bytes, to):
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        tf.extractall(to, filter="data")
    return to


# ----------------------------------------------------------------------------- data

def test_corpus_never_holds_an_evaluation_text(tmp_path):
    df = imdb.read_any(extract(imdb.synthesize(20, 0), tmp_path))
    assert set(df["part"]) == {"train", "test", "unsup"} and (df["part"] == "test").sum() == 40
    # a test review copied into unsup/ and train/: the corpus drops both copies and says so
    test_text = df.loc[df["part"] == "test", "text"].iloc[0]
    extra = pd.DataFrame({"text": [test_text, test_text], "label": ["", "positive"],
                          "part": ["unsup", "train"], "file": ["u", "t"]})
    corpus, dropped = imdb.lm_corpus(pd.concat([df, extra]), ("train", "unsup"))
    assert dropped == 2 and test_text not in set(corpus["text"])
    assert len(corpus) == corpus["text"].nunique()


def test_csv_layout_and_bad_files_are_named(tmp_path):
    (tmp_path / "imdb_sample").mkdir()
    (tmp_path / "imdb_sample" / "texts.csv").write_text(
        "label,text,is_valid\npositive,Great fun,False\nnegative,Dull,True\n")
    df = imdb.read_any(tmp_path)
    assert df["part"].tolist() == ["train", "test"] and df["label"].tolist() == ["positive", "negative"]
    (tmp_path / "imdb_sample" / "texts.csv").write_text("sentiment,review\npositive,x\n")
    with pytest.raises(KeyError, match=r"texts\.csv: no column 'label'"):
        imdb.read_any(tmp_path)
    bad = tmp_path / "acl"
    (bad / "imdb" / "train" / "pos").mkdir(parents=True)
    (bad / "imdb" / "train" / "pos" / "1_9.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ValueError, match=r"imdb/train/pos/1_9\.txt: not valid UTF-8"):
        imdb.read_any(bad)


def test_valid_texts_also_in_train_are_dropped_or_refused():
    kind = recipes.get("imdb").kind
    cfg = config.parse(tiny_params(), recipes.Registry()).recipe("imdb")
    df = pd.DataFrame({"label": ["positive", "negative", "positive"], "text": ["a b", "c d", "a b"],
                       "part": ["train", "train", "test"], "file": ["1", "2", "3"]})
    out = kind.prepare(recipes.get("imdb"), df, cfg.prepare)
    assert dict(zip(out["file"], out["duplicate"])) == {"1": "", "2": "", "3": "train"}
    assert len(kind.usable(out)) == 2
    with pytest.raises(ValueError, match=r"1 validation texts are also training texts"):
        kind.prepare(recipes.get("imdb"), df, config.evolve(cfg.prepare, duplicates="fail"))
    some = kind.prepare(recipes.get("imdb"), df, config.evolve(cfg.prepare, max_train=1))
    assert (~some["is_valid"]).sum() == 1 and some["is_valid"].sum() == 1   # a stated subset


def test_prepared_texts_are_in_a_seeded_random_order_not_class_by_class():
    """IMDB's layout lists a class at a time; the streaming path reads the table through a local
    shuffle buffer, which would otherwise give it batches of one class."""
    kind, cfg = recipes.get("imdb").kind, config.parse(tiny_params(), recipes.Registry()).recipe("imdb")
    n = 200
    df = pd.DataFrame({"label": ["negative"] * (n // 2) + ["positive"] * (n // 2),
                       "text": [f"review {i}" for i in range(n)], "part": "train",
                       "file": [str(i) for i in range(n)]})
    out = kind.prepare(recipes.get("imdb"), df, cfg.prepare)
    first = out["label"].head(40)
    assert 10 < (first == "positive").sum() < 30                  # both classes from the start
    assert out["file"].tolist() == kind.prepare(recipes.get("imdb"), df, cfg.prepare)["file"].tolist()
    assert sorted(out["file"]) == sorted(df["file"])


# ----------------------------------------------------------------------------- model

def test_classifier_ignores_padding_and_chunks_equal_one_pass():
    torch.manual_seed(0)
    enc = AWDLSTM(50, 16, 24, 2, pad_id=1, embed_p=0.1, weight_p=0.2, input_p=0.1, hidden_p=0.1)
    model = TextClassifier(enc, 2, [8], [0.1, 0.1], pad_id=1, bptt=5, max_len=10).eval()
    x = torch.randint(2, 50, (1, 23))
    padded = torch.cat([x, torch.ones(1, 7, dtype=torch.long)], 1)
    assert torch.allclose(model(x), model(padded), atol=1e-6)  # right padding never changes it
    # training reads bptt chunks with the state carried: the same outputs as one pass
    enc.eval()
    one = enc(x)
    model.train()
    for m in model.modules():  # dropouts off, chunking on
        if hasattr(m, "p"):
            m.p = 0.0
    chunked = model.encode(x)
    assert torch.allclose(one, chunked, atol=1e-5)


def test_embedding_init_is_a_param():
    enc = AWDLSTM(500, 16, 24, 2, pad_id=1, embed_p=0.0, weight_p=0.0, input_p=0.0, hidden_p=0.0,
                  embed_init=1.0)
    w = enc.encoder.weight.detach()
    assert 0.9 < float(w.abs().max()) <= 1.0 and float(w.abs().mean()) > 0.4   # uniform(-1, 1)
    raw = tiny_params()
    raw["recipes"]["imdb_lm"]["model"]["embed_init"] = 0.0
    with pytest.raises(config.ConfigError, match="embed_init"):
        config.parse(raw, recipes.Registry())


def test_match_embeds_keeps_known_words_and_gives_new_ones_the_mean():
    w = torch.arange(6.0).reshape(3, 2)
    out = match_embeds(w, ["a", "b", "c"], ["c", "new", "a"])
    assert torch.equal(out[0], w[2]) and torch.equal(out[2], w[0]) and torch.equal(out[1], w.mean(0))


def test_sortish_batches_are_seeded_similar_in_length_and_split_over_ranks():
    ids = [np.arange(n) for n in np.random.default_rng(0).integers(3, 200, 64)]
    y = torch.zeros(64, dtype=torch.long)
    b = TextBatches(ids, y, 1, 8, 0, 1, seed=3, train=True, chunk=4)
    first, again, other = b.plan(0), b.plan(0), b.plan(1)
    assert all(np.array_equal(p, q) for p, q in zip(first, again))
    assert not all(np.array_equal(p, q) for p, q in zip(first, other))
    spread = np.mean([np.ptp(b.lengths[i]) for i in first])
    assert spread < np.ptp(b.lengths) / 2           # a batch holds texts of similar lengths
    r0, r1 = (TextBatches(ids, y, 1, 8, r, 2, seed=3, train=True, chunk=4).plan(0) for r in (0, 1))
    assert len(r0) == len(r1) and all(np.array_equal(np.concatenate([p, q]), f)
                                      for p, q, f in zip(r0, r1, first))


def test_a_streamed_chunk_makes_sortish_padded_batches_of_its_own_rows():
    """The streaming path's batches of one chunk of rows: each row once (id = its token), every
    training batch full and of similar lengths, seeded; validation keeps every row, longest first."""
    from coursepipe.text.classify import chunk_batches

    lengths = np.random.default_rng(0).integers(3, 200, 45)
    ids = np.empty(45, dtype=object)
    ids[:] = [np.full(n, i + 2) for i, n in enumerate(lengths)]   # row i's ids are all i + 2
    y = np.arange(45) % 2

    def rows(batches):
        out = []
        for x, yb in batches:
            r = x[:, 0] - 2
            assert all((row[:lengths[i]] == i + 2).all() and (row[lengths[i]:] == 1).all()
                       for i, row in zip(r.tolist(), x))             # right-padded with pad id 1
            assert yb.tolist() == (r % 2).tolist()
            out += r.tolist()
        return out

    train = chunk_batches(ids, y, 1, 8, np.random.default_rng([3, 0]))
    got = rows(train)
    assert [len(b[1]) for b in train] == [8] * 5 and len(set(got)) == 40  # 45 rows: 5 left out
    assert rows(chunk_batches(ids, y, 1, 8, np.random.default_rng([3, 0]))) == got
    assert rows(chunk_batches(ids, y, 1, 8, np.random.default_rng([3, 1]))) != got
    assert np.mean([np.ptp(lengths[b[0][:, 0] - 2]) for b in train]) < np.ptp(lengths) / 2
    valid = rows(chunk_batches(ids, y, 1, 8, None))
    assert sorted(valid) == list(range(45)) and list(lengths[valid]) == sorted(lengths, reverse=True)


def test_gradual_unfreezing_is_a_plan_of_the_shared_program():
    cfg = config.parse(tiny_params(), recipes.Registry()).recipe("imdb")
    recipe = recipes.get("imdb")
    plan = recipe.kind.plan(cfg.model, cfg.train)
    assert [p.freeze_to for p in plan] == [-1, 0] and [p.epochs for p in plan] == [1, 1]
    lo, hi = plan[1].lr
    assert hi == 0.005 and lo == pytest.approx(0.005 / 2.6 ** 3)   # 4 groups: emb, 2 LSTMs, head
    df = recipe.normalise(recipe.read_raw(extract(imdb.synthesize(12, 0), __import__("pathlib").Path(
        __import__("tempfile").mkdtemp())), None))
    frame = recipe.kind.prepare(recipe, df, cfg.prepare)
    seen = []

    class Trainable(program.Callback):
        def before_train(self):
            seen.append(sum(p.requires_grad for p in self.learn.model.encoder.parameters()))

    program.train(recipe, cfg.model, cfg.train, frame, program.Hooks(show=False, callbacks=(Trainable(),)))
    assert seen[0] == 0 and seen[1] > 0        # the head alone first, then the encoder too


def test_starts_from_must_name_a_recipe_model():
    raw = tiny_params()
    raw["recipes"]["imdb"]["starts_from"] = "models/nowhere"
    with pytest.raises(config.ConfigError, match=r"recipes\.imdb\.starts_from: 'models/nowhere' names no recipe"):
        config.parse(raw, recipes.Registry())
    raw["recipes"]["imdb"]["starts_from"] = "prepared/imdb"
    with pytest.raises(config.ConfigError, match=r"recipes\.imdb\.starts_from: ULMFiT's classifier"):
        recipes.get("imdb").check_config(config.parse(raw, recipes.Registry()).recipe("imdb"))


# ----------------------------------------------------------------------------- the three stages

def test_three_recipes_chain_through_ray_and_predict_from_the_export(project, ray_session, tmp_path):
    write_params(project.root, tiny_params())
    done = {}
    for name in CHAIN:
        cfg = load_cfg(project, name)
        fetch(cfg, project)
        done[name] = run_pipeline(cfg, recipes.get(name), project, storage=project.runs(".runs"))
    lm = done["imdb_lm"]["evaluate"].metrics
    assert 0 < lm["accuracy"] <= 1 and lm["perplexity"] == pytest.approx(np.exp(lm["valid_loss"]), rel=1e-4)
    clas = done["imdb"]
    assert clas["train"].epochs_run == 2
    assert 0 <= clas["evaluate"].metrics["accuracy"] <= 1
    assert (project.plots("imdb") / "most_confident_wrong.csv").is_file()
    ex = clas["export"]
    assert ex.parity_max_diff <= 1e-4
    proc = subprocess.run([sys.executable, "-I", str(ex.path / "predict.py"),
                           "A wonderful, moving film.", "Awful and boring. " * 40], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(l.split("\t")[0] in ("negative", "positive") for l in lines)
    (tmp_path / "reviews.txt").write_text("A wonderful, moving film.\n\nDull.\n")   # one text a line
    from_file = subprocess.run([sys.executable, "-I", str(ex.path / "predict.py"), "reviews.txt"],
                               cwd=tmp_path, capture_output=True, text=True)
    assert from_file.returncode == 0 and from_file.stdout.splitlines()[0] == lines[0]
    assert len(from_file.stdout.splitlines()) == 2
    # the web app serves it: the page, and the API's label agrees with predict.py's
    import httpx

    from coursepipe.recipes import load_params
    from coursepipe.serve.app import create_app
    from coursepipe.serve.run import Background
    limits = load_params(project.params).serve
    with Background(create_app(project.root / "export", limits)) as base:
        page = httpx.get(f"{base}/models/imdb")
        assert page.status_code == 200 and 'id="text"' in page.text and "Classify" in page.text
        r = httpx.post(f"{base}/api/models/imdb/predict",
                       json={"inputs": [{"text": "A wonderful, moving film."}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["label"] == lines[0].split("\t")[0]
        assert abs(out["probability"] - float(lines[0].split("\t")[1])) < 1e-3
        bad = httpx.post(f"{base}/api/models/imdb/predict", json={"inputs": [{"text": 3}]})
        assert bad.status_code == 422 and "inputs[0].text" in bad.text
    # fastai's text_classifier_learner: the classifier reads with its language model's vocabulary
    from coursepipe.stages import train
    itos = {n: train.read_bundle(project.model(n) / "model.pt")["processor"]["itos"] for n in CHAIN[1:]}
    assert itos["imdb"] == itos["imdb_lm"]
    # the streaming path (train.data_path: ray_data): Ray Data's tasks tokenise the texts, the
    # driver and the workers hold none, and the driver reads with imdb_lm's vocabulary too
    raw = tiny_params()
    raw["recipes"]["imdb"]["train"]["data_path"] = "ray_data"
    write_params(project.root, raw)
    cfg, kind = load_cfg(project, "imdb"), recipes.get("imdb").kind
    from coursepipe.stages import prepare
    reads = []
    real_load = prepare.load
    with pytest.MonkeyPatch.context() as mp:  # what the driver reads of the table
        mp.setattr(prepare, "load", lambda *a, **k: reads.append(k.get("without")) or real_load(*a, **k))
        frame, stream = train.load_frame(cfg, recipes.get("imdb"), project,
                                         train.upstream_model(project, cfg))
    assert reads == [("text",)]                    # once, without the texts
    assert "text" not in frame.columns and stream.processor["itos"] == itos["imdb_lm"]
    streamed = train.run(cfg, recipes.get("imdb"), project, storage=project.runs(".runs"), verbose=False)
    n_train, n_valid = (len(kind.usable(frame[frame["is_valid"] == v])) for v in (False, True))
    assert [w["batches"] for w in streamed.worker["data_waits"]] == \
        [n_train // cfg.train.bs, -(-n_valid // cfg.train.valid_bs)] * 2   # 2 unfreezing steps
    # the epochs are the kind's plan's (train.epochs is 1 here): epoch 1 is started ahead and
    # scored from the validation batches kept in epoch 0
    ahead = "stream, started ahead"
    assert [(w["epoch"], w["source"]) for w in streamed.worker["data_waits"]] == \
        [(0, "stream"), (0, ahead), (1, ahead), (1, "cache")]
    acc = streamed.history[-1]["accuracy"]
    assert streamed.epochs_run == 2 and acc * n_valid == pytest.approx(round(acc * n_valid))
    # a language model streams too: imdb_lm on two ranks (decode tasks share their CPUs). The
    # driver reads the training texts once, for the vocabulary and the stream's length; each rank
    # fills its rows with whole texts and the ranks stop together, at the same step
    raw["recipes"]["imdb_lm"]["train"].update({"data_path": "ray_data", "num_workers": 2,
                                                "decode_cpus": 0.0})
    write_params(project.root, raw)
    cfg, lm = load_cfg(project, "imdb_lm"), recipes.get("imdb_lm")
    reads.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "load", lambda *a, **k: reads.append((k.get("without"), k.get("valid")))
                   or real_load(*a, **k))
        frame, stream = train.load_frame(cfg, lm, project, train.upstream_model(project, cfg))
    assert reads == [(("text",), None), ((), False)] and "text" not in frame.columns
    lm_streamed = train.run(cfg, lm, project, storage=project.runs(".runs"), verbose=False)
    steps = lm.kind.stream_steps(stream.processor, cfg.model, 0, cfg.train.bs, 2)
    waits = lm_streamed.worker["data_waits"]
    assert [w["split"] for w in waits] == ["train", "valid"] and 0 < waits[0]["batches"] <= steps
    assert len(lm_streamed.rank_checksums) == 2 and len(set(lm_streamed.rank_checksums)) == 1
    assert 0 < lm_streamed.history[-1]["accuracy"] <= 1
    # the classifier's encoder started from imdb_lm's: a missing upstream model is a clear error
    import shutil
    shutil.rmtree(project.model("imdb_lm"))
    with pytest.raises(FileNotFoundError, match=r"recipes\.imdb\.starts_from: models/imdb_lm/model\.pt is missing"):
        train.upstream_model(project, load_cfg(project, "imdb"))


# ----------------------------------------------------------------------------- pretrained weights

def fastai_lm_archive(model, itos: list[str], itos_pickle: bytes | None = None) -> bytes:
    """An archive laid out as fastai's wt103-fwd.tgz, keys named as fastai's AWD-LSTM names them."""
    import pickle

    from coursepipe.data.archive import deterministic_tgz

    state = {}
    for k, v in model.state_dict().items():
        name = k.replace("encoder.encoder.", "0.encoder.").replace("head.decoder.", "1.decoder.")
        name = name.replace("encoder.rnns.", "0.rnns.")
        if name.endswith("lstm.weight_hh_l0"):
            state[name.replace("lstm.weight_hh_l0", "weight_hh_l0_raw")] = v
            name = name.replace(".lstm.", ".module.")   # fastai keeps the dropped copy too
        state[name.replace(".lstm.", ".module.")] = v
    state["0.encoder_dp.emb.weight"] = state["0.encoder.weight"]
    buf = io.BytesIO()
    torch.save(state, buf)
    return deterministic_tgz({"wt103-fwd/lstm_fwd.pth": buf.getvalue(),
                              "wt103-fwd/itos_wt103.pkl": itos_pickle or pickle.dumps(itos)})


def test_fastai_pretrained_lm_loads_from_a_url_matched_to_the_corpus_vocabulary(tmp_path, loopback):
    import hashlib
    import pickle

    from coursepipe.config import evolve
    from coursepipe.kinds.language_model import LanguageModel
    from coursepipe.models.transfer import WeightsError
    from coursepipe.text import pretrained

    www, base = loopback
    cfg = config.parse(tiny_params(), recipes.Registry()).recipe("imdb_pretrain")
    recipe, kind = recipes.get("imdb_pretrain"), LanguageModel()
    source_itos = ["xxunk", "xxpad", "xxbos", "xxeos", "xxfld", "xxrep", "xxwrep", "xxup", "xxmaj",
                   "film", "great", "old"]
    torch.manual_seed(1)
    source = kind.build_model(recipe, {"itos": source_itos}, cfg.model)
    blob = fastai_lm_archive(source, source_itos)
    (www / "wt103-fwd.tgz").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    m = evolve(cfg.model, weights=f"{base}/wt103-fwd.tgz", weights_sha256=digest,
               weights_cache=str(tmp_path / "cache"))
    kind.prefetch(m)                                       # the driver downloads and checks it once
    assert (tmp_path / "cache" / "wt103-fwd.tgz").is_file()

    corpus_itos = ["xxunk", "xxpad", "xxbos", "xxeos", "xxfld", "xxrep", "xxwrep", "xxup", "xxmaj",
                   "great", "new", "film"]
    model = kind.build_model(recipe, {"itos": corpus_itos}, m)
    cb = next(c for c in kind.callbacks(recipe, m, cfg.train) if isinstance(c, pretrained.LoadPretrainedLM))
    cb.learn = type("L", (), {"model": model, "step": 0, "epoch_offset": 0})()
    cb.before_fit()
    emb, src = model.encoder.encoder.weight, source.encoder.encoder.weight
    assert torch.equal(emb[9], src[10]) and torch.equal(emb[11], src[9])   # great, film: their rows
    assert torch.allclose(emb[10], src.mean(0))                             # new: the mean row
    for k in ("encoder.rnns.1.lstm.weight_hh_l0", "encoder.rnns.0.lstm.bias_ih_l0"):
        assert torch.equal(model.state_dict()[k], source.state_dict()[k])

    with pytest.raises(WeightsError, match="does not match the expected"):   # another file: refused
        kind.prefetch(evolve(m, weights_sha256="0" * 64, weights_cache=str(tmp_path / "c2")))
    with pytest.raises(WeightsError, match=r"cannot download .*Offline\?"):  # nothing listening
        kind.prefetch(evolve(m, weights="http://127.0.0.1:9/wt103-fwd.tgz", weights_cache=str(tmp_path / "c3")))

    class Boom:
        def __reduce__(self):
            return (len, ("pwned",))
    bad = fastai_lm_archive(source, source_itos, itos_pickle=pickle.dumps([Boom()]))
    (tmp_path / "bad.tgz").write_bytes(bad)
    with pytest.raises(WeightsError, match=r"refers to builtins\.len: refusing"):
        pretrained.read_fastai_lm(tmp_path / "bad.tgz")


def test_the_course_flow_fetches_the_recipes_a_recipe_starts_from():
    from flows.course import upstream_chain
    params = config.parse(tiny_params(), recipes.Registry())
    assert upstream_chain(params, "imdb") == ["imdb_pretrain", "imdb_lm", "imdb"]
    assert upstream_chain(params, "imdb_pretrain") == ["imdb_pretrain"]
