"""Recipes: one module per course task, coursepipe/recipes/<name>.py, each declaring `RECIPE`
(a coursepipe.contract.Recipe). A recipe's name is its module's name and its key under `recipes:`
in params.yaml, so adding a recipe edits no list. Modules are imported only when asked for.

Only the doors (cli.py, flows/, tests) call this; stages receive the recipe object.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from coursepipe.contract import ContractError, Recipe

NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def names() -> list[str]:
    """Every recipe module in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if NAME.match(m.name))


def exists(name: str) -> bool:
    return bool(isinstance(name, str) and NAME.match(name)) and \
        importlib.util.find_spec(f"{__name__}.{name}") is not None


def get(name: str) -> Recipe:
    """The recipe object of coursepipe/recipes/<name>.py."""
    from coursepipe.config import ConfigError

    if not exists(name):
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {names()}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except (ContractError, TypeError) as e:  # RECIPE = Recipe(...) missing a field, a bad kind
        raise ContractError(f"coursepipe/recipes/{name}.py: {e}") from e
    try:
        recipe = module.RECIPE  # the one name a recipe module must declare
    except AttributeError:
        raise ContractError(f"{module.__name__}: declares no RECIPE (a coursepipe.contract.Recipe)") from None
    if not isinstance(recipe, Recipe):
        raise ContractError(f"{module.__name__}: RECIPE must be a coursepipe.contract.Recipe, got {recipe!r}")
    if recipe.name != name:
        raise ContractError(f"{module.__name__}: RECIPE.name is {recipe.name!r}, expected {name!r}")
    return recipe


class Registry(Mapping):
    """name -> Recipe, importing a recipe's module on first use (what config.parse needs)."""

    def __getitem__(self, name: str) -> Recipe:
        if not exists(name):
            raise KeyError(name)
        return get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and exists(name)

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __len__(self) -> int:
        return len(names())


def load_params(path: str | Path):
    """params.yaml typed by every recipe it names, with each recipe's cross-section checks."""
    from coursepipe import config

    params = config.load(path, Registry())
    for name, cfg in params.recipes.items():
        try:
            get(name).check_config(cfg)
        except config.ConfigError as e:
            raise config.ConfigError(f"{path}: {e}") from None
    return params
