"""The contract audits: what a stage reads of params.yaml, and which project modules it runs,
checked against that stage's entry in dvc.yaml.

`run_stage(stage, cfg, recipe, paths)` runs a real stage while
  - config.recording() collects the params.yaml key of every config value the stage reads
    (a value taken from `defaults:` is recorded under its defaults key), and
  - an import trace collects every project module an import statement reaches during the stage
    (cached imports included: the hook sees each executed `import`), closed over the module-level
    imports of each (read from the source), plus, for train, the modules the Ray worker held;
then fails naming every read not covered by the stage's `params:`, every declared section of the
recipe that the stage never reads, and every module file not covered by its `deps:`.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "coursepipe"


# ----------------------------------------------------------------------------- dvc.yaml

def declared(stage: str, recipe: str, dvc_yaml: Path = REPO / "dvc.yaml") -> tuple[list[str], list[str]]:
    """(params, deps) of `<stage>@<recipe>`, with ${key} filled in."""
    do = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]["do"]

    def fill(items):
        return [(i if isinstance(i, str) else next(iter(i))).replace("${key}", recipe) for i in items]
    return fill(do.get("params", [])), fill(do.get("deps", []))


def under(key: str, prefix: str, sep: str = ".") -> bool:
    return key == prefix or key.startswith(prefix + sep)


# ----------------------------------------------------------------------------- imports

def is_ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def module_file(name: str) -> Path | None:
    """The source file of a project module or package (None if there is none)."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _top_level_imports(body: list[ast.stmt]) -> list[ast.stmt]:
    """Import statements that run when the module is imported (not those inside functions)."""
    out = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                out += _top_level_imports(node.body) + _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level_imports(node.body)
            for h in node.handlers:
                out += _top_level_imports(h.body)
            out += _top_level_imports(node.orelse) + _top_level_imports(node.finalbody)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            out += _top_level_imports(node.body)
    return out


def module_level_imports(name: str) -> set[str]:
    """The project modules `name` imports at module level."""
    path = module_file(name)
    if path is None:
        return set()
    found: set[str] = set()
    for node in _top_level_imports(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        else:
            base = node.module or ""
            if node.level:  # relative: from the module's package
                pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
                parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    return {m for m in found if is_ours(m)}


def with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def closure(roots: set[str]) -> set[str]:
    """Every project module importing `roots` executes: parents first, then module-level imports."""
    seen: set[str] = set()
    todo = [m for r in roots if is_ours(r) for m in with_parents(r)]
    while todo:
        m = todo.pop()
        if m in seen or module_file(m) is None:
            continue
        seen.add(m)
        for dep in module_level_imports(m):
            todo += sorted(with_parents(dep))
    return seen


@contextmanager
def import_trace():
    """Record the project modules every executed import statement (or import_module) names."""
    seen: set[str] = set()
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def note(name: str, fromlist) -> None:
        if is_ours(name):
            seen.add(name)
            for item in fromlist or ():
                if f"{name}.{item}" in sys.modules:
                    seen.add(f"{name}.{item}")

    def traced_import(name, globals=None, locals=None, fromlist=(), level=0):
        module = real_import(name, globals, locals, fromlist, level)
        if level:  # resolve a relative import by the importing module's package
            pkg = (globals or {}).get("__package__") or ""
            base = pkg.rsplit(".", level - 1)[0] if level > 1 else pkg
            name = f"{base}.{name}" if name else base
        note(name, fromlist)
        return module

    def traced_import_module(name, package=None):
        module = real_import_module(name, package)
        note(module.__name__, ())
        return module

    builtins.__import__, importlib.import_module = traced_import, traced_import_module
    try:
        yield seen
    finally:
        builtins.__import__, importlib.import_module = real_import, real_import_module


# ----------------------------------------------------------------------------- params

def possible_keys(obj) -> set[str]:
    """Every params key a config tree could record (the _keys of each section in it)."""
    from coursepipe.config import Section

    from coursepipe.config import _holds_sections

    out: set[str] = set()
    if isinstance(obj, Section):
        keys = object.__getattribute__(obj, "_keys") or {}
        for f in type(obj).__dataclass_fields__:
            value = object.__getattribute__(obj, f)
            if _holds_sections(value):  # a path to values: its own sections have the keys
                out |= possible_keys(value)
            elif f in keys:
                out.add(keys[f])
    elif isinstance(obj, dict):
        for v in obj.values():
            out |= possible_keys(v)
    return out


def shipped_keys(section) -> set[str]:
    """Every key of a section handed whole to another process (train's Ray workers): the worker
    may read any of them, so the audit counts them as read."""
    return possible_keys(section)


# ----------------------------------------------------------------------------- the audited stage

def problems(stage: str, recipe_name: str, cfg, reads: set[str], modules: set[str]) -> list[str]:
    params, deps = declared(stage, recipe_name)
    out = [f"reads {k}, which dvc.yaml's {stage}@{recipe_name} does not declare"
           for k in sorted(reads) if not any(under(k, p) for p in params)]
    possible = possible_keys(cfg)
    for p in params:  # a declared section of this recipe with values must be read
        if any(under(k, p) for k in possible) and not any(under(k, p) for k in reads):
            out.append(f"declares {p} but never reads it")
    for m in sorted(modules):
        path = module_file(m)
        rel = path.relative_to(REPO).as_posix()
        if not any(under(rel, d, "/") for d in deps):
            out.append(f"runs {rel} ({m}), which is not among its dvc.yaml deps")
    return out


def run_stage(stage: str, cfg, recipe, paths, **kwargs):
    """Run `stage` for real under both audits; fail naming every uncovered read or module."""
    from coursepipe.config import recording

    module = importlib.import_module(f"{PACKAGE}.stages.{stage}")
    with recording() as reads, import_trace() as imported:
        result = module.run(cfg, recipe, paths, **kwargs)
    worker = set(getattr(result, "worker", {}).get("modules", []))
    if stage == "train":
        reads = reads | shipped_keys(cfg.model) | shipped_keys(cfg.train)
    recipe_module = f"{PACKAGE}.recipes.{recipe.name}"
    modules = closure({module.__name__, recipe_module, *imported, *worker})
    found = problems(stage, recipe.name, cfg, reads, modules)
    assert not found, f"{stage}@{recipe.name}:\n  " + "\n  ".join(found)
    return result


def run_pipeline(cfg, recipe, paths, storage: str, stages=None):
    """Every stage (or the given ones) in order, each audited; returns {stage: result}."""
    from coursepipe.stages import STAGES

    out = {}
    for stage in stages or STAGES:
        kwargs = {"storage": storage, "verbose": False} if stage == "train" else {}
        out[stage] = run_stage(stage, cfg, recipe, paths, **kwargs)
    return out
