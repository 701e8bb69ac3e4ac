"""Recipe registry: one module per course task, imported only when asked for."""
from __future__ import annotations

import importlib
from types import ModuleType

# name -> module. A recipe module declares ModelConfig, its data layout and its model parts.
RECIPES: dict[str, str] = {
    "adult": "coursepipe.recipes.adult",
}


def get_recipe(name: str) -> ModuleType:
    if name not in RECIPES:
        from coursepipe.config import ConfigError
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name])
