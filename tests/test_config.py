"""params.yaml checking: every malformed value is a ConfigError naming its key path, and the CLI
turns it into one clean line on stderr."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO, small_params, write_params
from coursepipe import config, recipes
from coursepipe.config import ConfigError

SHA = "0" * 64


def adult(raw: dict) -> dict:
    return raw["recipes"]["adult"]


def load_error(tmp_path, raw) -> str:
    """Write `raw` as params.yaml, load it, return the ConfigError's message."""
    path = tmp_path / "params.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        recipes.load_params(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- good files

def test_every_recipe_builds_from_repo_params():
    params = recipes.load_params(REPO / "params.yaml")
    assert set(recipes.names()) == set(params.recipes), "every recipe module needs a params.yaml section"
    for name in recipes.names():
        cfg, recipe = params.recipe(name), recipes.get(name)
        assert cfg.name == name and cfg.source in cfg.sources
        assert cfg.train.epochs >= 1 and 0 < cfg.prepare.valid_pct < 1
        assert isinstance(cfg.model, recipe.model_config)
        assert isinstance(cfg.prepare, recipe.prepare_config) and isinstance(cfg.evaluate, recipe.evaluate_config)


def test_small_params_load(tmp_path):
    cfg = recipes.load_params(write_params(tmp_path, small_params(rows=123))).recipe("adult")
    assert cfg.active_source.rows == 123 and cfg.train.num_workers == 1
    assert cfg.train.moms == (0.95, 0.85, 0.95) and isinstance(cfg.model.layers, tuple)


# ----------------------------------------------------------------------------- defaults

def test_defaults_fill_a_section_and_the_recipe_wins(tmp_path):
    raw = small_params()
    raw["defaults"]["train"]["wd"] = 0.05
    adult(raw)["train"] = {"lr": 0.03}
    cfg = recipes.load_params(write_params(tmp_path, raw)).recipe("adult")
    assert cfg.train.wd == 0.05 and cfg.train.lr == 0.03
    with config.recording() as reads:
        _ = cfg.train.wd, cfg.train.lr, cfg.model.layers, cfg.active_source.rows
    # each value is recorded under the key it came from: what dvc.yaml must declare
    assert reads == {"defaults.train.wd", "recipes.adult.train.lr", "recipes.adult.model.layers",
                     "recipes.adult.source", "recipes.adult.sources.synthetic.rows"}


def test_a_value_missing_from_both_is_named(tmp_path):
    raw = small_params()
    del raw["defaults"]["train"]["sqr_mom"]
    assert "recipes.adult.train: missing required key 'sqr_mom'" in load_error(tmp_path, raw)


def test_a_missing_section_says_to_write_it_empty(tmp_path):
    raw = small_params()
    del adult(raw)["evaluate"]
    msg = load_error(tmp_path, raw)
    assert "recipes.adult: missing required key 'evaluate'" in msg and "evaluate: {}" in msg


@pytest.mark.parametrize("section,key,path", [
    ("train", "epoch", "defaults.train.epoch"),        # a typo
    ("prepare", "bad_images", "defaults.prepare.bad_images"),  # a kind's own key: per recipe
    ("model", "layers", "defaults.model"),            # the model section is the recipe's own
])
def test_defaults_take_only_base_section_keys(tmp_path, section, key, path):
    raw = small_params()
    raw["defaults"].setdefault(section, {})[key] = 1
    assert path in load_error(tmp_path, raw)


def test_a_bad_default_is_named_by_its_defaults_key(tmp_path):
    raw = small_params()
    raw["defaults"]["train"]["lr_mult"] = 0.5
    assert "defaults.train.lr_mult: must be >= 1" in load_error(tmp_path, raw)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_rejected(tmp_path, value):
    raw = edit(["recipes", "adult", "train"], "lr", value)(small_params())
    msg = load_error(tmp_path, raw)
    assert "recipes.adult.train.lr: expected a finite number" in msg


def test_negative_weight_decay_is_rejected(tmp_path):
    msg = load_error(tmp_path, edit(["recipes", "adult", "train"], "wd", -0.1)(small_params()))
    assert "recipes.adult.train.wd: must be >= 0" in msg


# ----------------------------------------------------------------------------- malformed files

def test_invalid_yaml(tmp_path):
    msg = load_error(tmp_path, "recipes:\n  adult:\n    train: {epochs: 1\n")
    assert "not valid YAML" in msg and "line" in msg


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "recipes: 3\n"])
def test_not_a_params_mapping(tmp_path, text):
    assert "recipes" in load_error(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        recipes.load_params(tmp_path / "nope.yaml")


def edit(section: list[str], key, value):
    """A function that sets raw[section...][key] = value on small_params()."""
    def apply(raw):
        node = raw
        for part in section:
            node = node[part]
        node[key] = value
        return raw
    return apply


@pytest.mark.parametrize("change,path", [
    # unknown keys, at every level
    (edit([], "ray_storag", ".runs"), "ray_storag"),
    (edit(["recipes", "adult"], "epochs", 3), "recipes.adult.epochs"),
    (edit(["recipes", "adult"], "name", "other"), "recipes.adult.name"),
    (edit(["recipes", "adult", "train"], "epoch", 3), "recipes.adult.train.epoch"),
    (edit(["recipes", "adult", "model"], "layer", [10]), "recipes.adult.model.layer"),
    (edit(["recipes", "adult", "sources", "synthetic"], "sha265", SHA), "recipes.adult.sources.synthetic.sha265"),
    # wrong types
    (edit(["recipes", "adult", "train"], "epochs", "ten"), "recipes.adult.train.epochs"),
    (edit(["recipes", "adult", "train"], "epochs", 2.5), "recipes.adult.train.epochs"),
    (edit(["recipes", "adult", "train"], "lr", True), "recipes.adult.train.lr"),
    (edit(["recipes", "adult", "train"], "moms", [0.9, 0.8]), "recipes.adult.train.moms"),
    (edit(["recipes", "adult", "train"], "use_gpu", "yes"), "recipes.adult.train.use_gpu"),
    (edit(["recipes", "adult", "train"], "bs", None), "recipes.adult.train.bs"),
    (edit(["recipes", "adult", "model"], "use_bn", None), "recipes.adult.model.use_bn"),
    (edit(["recipes", "adult", "model"], "layers", [200, "x"]), "recipes.adult.model.layers[1]"),
    (edit(["recipes", "adult"], "train", [1, 2]), "recipes.adult.train"),
    (edit(["recipes", "adult", "validate"], "result_format", "BRIEF"), "recipes.adult.validate.result_format"),
    # out of range
    (edit(["recipes", "adult", "prepare"], "valid_pct", 1.5), "recipes.adult.prepare.valid_pct"),
    (edit(["recipes", "adult", "train"], "epochs", 0), "recipes.adult.train.epochs"),
    (edit(["recipes", "adult", "train"], "lr", -0.1), "recipes.adult.train.lr"),
    (edit(["recipes", "adult", "sources", "synthetic"], "rows", 0), "recipes.adult.sources.synthetic.rows"),
    (edit(["recipes", "adult", "model"], "cat_names", ["salary"]), "recipes.adult.model.cat_names"),
    # sources
    (edit(["recipes", "adult"], "source", "kaggle"), "recipes.adult.source"),
    (edit(["recipes", "adult", "sources", "uci"], "url", "https://example.org/a.tgz"), "recipes.adult.sources.uci"),
    (edit(["recipes", "adult", "sources"], "web", {"url": "https://example.org/a.tgz"}), "recipes.adult.sources.web"),
    (edit(["recipes", "adult", "sources"], "web", {}), "recipes.adult.sources.web"),
    (edit(["recipes", "adult", "sources", "uci"], "sha256", "abc123"), "recipes.adult.sources.uci.sha256"),
    (edit(["recipes", "adult", "sources", "fastai"], "md5", "z" * 32), "recipes.adult.sources.fastai.md5"),
    (edit(["recipes", "adult", "sources", "fastai"], "url", "ftp://example.org/a.tgz"), "recipes.adult.sources.fastai.url"),
    (edit(["recipes", "adult", "sources", "synthetic"], "generate", "nope"), "recipes.adult.sources.synthetic.generate"),
    # an unknown recipe section
    (edit(["recipes"], "adlut", {}), "recipes.adlut"),
])
def test_bad_value_names_key_path(tmp_path, change, path):
    msg = load_error(tmp_path, change(small_params()))
    assert f"{path}:" in msg or f"{path} " in msg, msg


def test_messages_say_what_was_expected(tmp_path):
    assert "'ten'" in load_error(tmp_path, edit(["recipes", "adult", "train"], "epochs", "ten")(small_params()))
    msg = load_error(tmp_path, edit(["recipes", "adult", "train"], "epoch", 3)(small_params()))
    assert "epochs" in msg  # the list of valid keys points at the typo
    msg = load_error(tmp_path, edit(["recipes", "adult"], "source", "kaggle")(small_params()))
    assert "synthetic" in msg and "uci" in msg


def test_url_source_without_checksum(tmp_path):
    raw = small_params()
    adult(raw)["sources"]["fastai"].pop("md5")
    msg = load_error(tmp_path, raw)
    assert "recipes.adult.sources.fastai" in msg and "checksum" in msg


def test_two_locations_in_one_source(tmp_path):
    raw = small_params()
    adult(raw)["sources"]["uci"]["generate"] = "adult"
    msg = load_error(tmp_path, raw)
    assert "recipes.adult.sources.uci" in msg and "path" in msg and "generate" in msg


def test_unknown_recipe_name_on_lookup(tmp_path):
    params = recipes.load_params(write_params(tmp_path, small_params()))
    with pytest.raises(ConfigError, match="'pets'.*adult"):
        params.recipe("pets")


# ----------------------------------------------------------------------------- the CLI door

def cli(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coursepipe.cli", "--root", str(root), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_bad_params_is_one_clean_line(tmp_path):
    write_params(tmp_path, edit(["recipes", "adult", "train"], "epochs", "ten")(small_params()))
    out = cli(tmp_path, "prepare", "adult")
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "recipes.adult.train.epochs" in lines[0] and "'ten'" in lines[0]
    assert not (tmp_path / "prepared").exists()


def test_cli_invalid_yaml_and_unknown_recipe(tmp_path):
    (tmp_path / "params.yaml").write_text("recipes: [\n")
    out = cli(tmp_path, "prepare", "adult")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not valid YAML" in out.stderr

    write_params(tmp_path, small_params())
    out = cli(tmp_path, "prepare", "pets")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "'pets'" in out.stderr
