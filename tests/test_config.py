"""params.yaml checking: every malformed value is a ConfigError naming its key path, and the CLI
turns it into one clean line on stderr."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO, small_params, write_params
from coursepipe import config
from coursepipe.config import ConfigError
from coursepipe.recipes import RECIPES

SHA = "0" * 64


def adult(raw: dict) -> dict:
    return raw["recipes"]["adult"]


def load_error(tmp_path, raw) -> str:
    """Write `raw` as params.yaml, load it, return the ConfigError's message."""
    path = tmp_path / "params.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        config.load(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- good files

def test_every_recipe_builds_from_repo_params():
    params = config.load(REPO / "params.yaml")
    assert set(RECIPES) <= set(params.recipes), "every registered recipe needs a params.yaml section"
    for name in RECIPES:
        cfg = params.recipe(name)
        assert cfg.name == name and cfg.source in cfg.sources
        assert cfg.train.epochs >= 1 and 0 < cfg.prepare.valid_pct < 1


def test_small_params_load(tmp_path):
    cfg = config.load(write_params(tmp_path, small_params(rows=123))).recipe("adult")
    assert cfg.active_source.rows == 123 and cfg.train.num_workers == 1
    assert cfg.train.moms == (0.95, 0.85, 0.95) and isinstance(cfg.model.layers, tuple)


# ----------------------------------------------------------------------------- malformed files

def test_invalid_yaml(tmp_path):
    msg = load_error(tmp_path, "recipes:\n  adult:\n    train: {epochs: 1\n")
    assert "not valid YAML" in msg and "line" in msg


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "recipes: 3\n"])
def test_not_a_params_mapping(tmp_path, text):
    assert "recipes" in load_error(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        config.load(tmp_path / "nope.yaml")


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
    params = config.load(write_params(tmp_path, small_params()))
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
