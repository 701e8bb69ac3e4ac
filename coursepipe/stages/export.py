"""export: trained model -> export/<recipe>/ with model.onnx, preprocessing.json, predict.py, card.json.

The folder is built beside the old one and renamed over it only after onnxruntime has matched
PyTorch on validation rows, so a failed export leaves the previous one untouched. predict.py is
a copy of the recipe kind's portable module (coursepipe/export/portable_<kind>.py): the folder
alone (numpy, pandas, onnxruntime) predicts. Reads params: export (the card quotes the sections
the model was trained and prepared with, from the model bundle and prepare's lineage file).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import json
import logging
import platform
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from coursepipe.config import RecipeConfig
from coursepipe.contract import Recipe
from coursepipe.export import portable_csv
from coursepipe.io import atomic_path, file_digest
from coursepipe.learn.infer import predict_logits
from coursepipe.paths import Paths
from coursepipe.stages import evaluate, prepare, train

CARD_FILE = "card.json"
SCRIPT_FILE = "predict.py"
CSV_HELPER = "portable_csv.py"
EXAMPLE_ROWS = 8  # rows traced by the exporter; >= 2 so torch.export keeps the batch dynamic
log = logging.getLogger(__name__)


class ParityError(ValueError):
    """onnxruntime and PyTorch disagree beyond parity_atol; the previous export was kept."""


@dataclass
class ExportResult:
    path: Path
    exporter: str             # "dynamo" (torch.export + onnxscript) or "torchscript" (fallback)
    opset: int
    parity_max_diff: float    # max |p_onnx - p_torch| over the checked rows and classes
    parity_rows: int


# ----------------------------------------------------------------------------- ONNX

def input_names(model: torch.nn.Module) -> list[str]:
    """The graph's input names: the model's forward arguments (x_cat, x_cont for tabular)."""
    return [p.name for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def example_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """EXAMPLE_ROWS rows (repeated if fewer): a batch of 0 or 1 would be specialised as constant."""
    idx = torch.arange(EXAMPLE_ROWS) % len(inputs[0])
    return tuple(x[idx] for x in inputs)


def dynamic_axes(recipe: Recipe, names: list[str]) -> dict[str, dict[int, str]]:
    """{input name: {axis: axis name}} as the recipe's kind declares them; `logits` shares the
    axes of the first input."""
    axes = recipe.kind.export_axes(names)
    return {**axes, "logits": axes[names[0]]}


def onnx_dynamo(model, args, names: list[str], opset: int, axes: dict) -> bytes:
    dims: dict[str, torch.export.Dim] = {}  # one Dim per axis name, shared across inputs
    shapes = {n: {ax: dims.setdefault(d, torch.export.Dim(d)) for ax, d in axes[n].items()}
              for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "axis name batch will not be used": names are shared
        program = torch.onnx.export(model, args, None, dynamo=True, input_names=names,
                                    output_names=["logits"], opset_version=opset,
                                    dynamic_shapes=shapes, verbose=False)
    return program.model_proto.SerializeToString()


def onnx_torchscript(model, args, names: list[str], opset: int, axes: dict) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, args, buf, dynamo=False, input_names=names, output_names=["logits"],
                          opset_version=opset, dynamic_axes=axes)
    return buf.getvalue()


def to_onnx(model: torch.nn.Module, args: tuple[torch.Tensor, ...], opset: int,
            recipe: Recipe) -> tuple[bytes, str]:
    """(serialised ONNX model, exporter used): the dynamo exporter, else the TorchScript one."""
    names = input_names(model)
    axes = dynamic_axes(recipe, names)
    if "dynamo" not in recipe.kind.exporters:
        return onnx_torchscript(model, args, names, opset, axes), "torchscript"
    try:
        return onnx_dynamo(model, args, names, opset, axes), "dynamo"
    except Exception as e:  # any exporter failure: the legacy path still gives a valid graph
        log.warning("dynamo ONNX export failed (%s: %s); falling back to dynamo=False",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return onnx_torchscript(model, args, names, opset, axes), "torchscript"


def with_metadata(model_bytes: bytes, props: dict[str, str]) -> bytes:
    """The ONNX model with `props` added to metadata_props, so model.onnx alone carries them."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    existing = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**existing, **props})
    return proto.SerializeToString()


# ----------------------------------------------------------------------------- parity

def portable_module(recipe: Recipe):
    """The kind's standalone predict module (numpy/pandas/onnxruntime only), copied as predict.py.

    It defines load(dir) -> (session, state), outputs(sess, state, rows) -> the user-facing numbers
    (e.g. probabilities) computed from raw rows, and finish(raw_model_output, state) -> the same
    numbers from the PyTorch model's output, so parity covers preprocessing and graph together."""
    return importlib.import_module(recipe.kind.portable)


def parity(model: torch.nn.Module, recipe: Recipe, processor: dict, export_dir: Path, rows) -> float:
    """Max |output difference| between the exported folder (as predict.py runs it) and torch."""
    port = portable_module(recipe)
    *inputs, _ = recipe.kind.tensors(recipe, processor, rows)
    torch_out = port.finish(predict_logits(model, tuple(inputs), len(rows)).numpy(), processor)
    sess, state = port.load(export_dir)
    onnx_out = port.outputs(sess, state, rows)
    if onnx_out.shape != torch_out.shape:
        raise ParityError(f"ONNX output shape {onnx_out.shape} != PyTorch {torch_out.shape}")
    return float(abs(onnx_out - torch_out).max())


# ----------------------------------------------------------------------------- model card

def dvc_outs(dvc_file: Path) -> dict[str, str]:
    """{tracked path: md5} from a .dvc file ({} if there is none)."""
    import yaml

    if not dvc_file.is_file():
        return {}
    raw = yaml.safe_load(dvc_file.read_text()) or {}
    return {o["path"]: o.get("md5") for o in raw.get("outs", []) if "path" in o}


def data_version(paths: Paths, name: str) -> dict:
    """What the model was trained on: the prepared table's sha256 and, from prepare's lineage
    file, the raw archive's identity (its md5 is the one data.dvc's manifest holds for it)."""
    table = paths.prepared(name) / prepare.TABLE
    lineage = prepare.lineage(paths, name)
    out = {"prepared_table": str(table.relative_to(paths.root)),
           "prepared_table_sha256": file_digest(table),
           "source": lineage.get("source"), "archive": lineage.get("archive"),
           "archive_md5": lineage.get("archive_md5")}
    outs = dvc_outs(paths.root / "data.dvc")
    if outs:
        out["data_dvc_md5"] = outs.get(paths.data.name)  # pins all of data/ for `dvc checkout`
    return out


def versions(exporter: str) -> dict[str, str]:
    import onnx
    import onnxruntime

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if exporter == "dynamo":
        import onnxscript
        out["onnxscript"] = onnxscript.__version__
    return out


def model_card(cfg: RecipeConfig, paths: Paths, recipe: Recipe, bundle: train.Bundle,
               names: list[str], exported: dict) -> dict:
    metrics_file = paths.metrics(cfg.name)
    return {
        "recipe": cfg.name,
        "kind": recipe.kind.name,
        **recipe.kind.card(recipe, bundle.processor),
        "onnx_inputs": names,
        "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
        # the course's result beside this model's (the serving pages and summary show both)
        "course": dict(zip(("metric", "value", "on"), recipe.course)) if recipe.course else None,
        "data": data_version(paths, cfg.name),
        "params": {"prepare": prepare.lineage(paths, cfg.name).get("prepare"),
                   "model": dataclasses.asdict(bundle.model_config), "train": bundle.train_config,
                   "export": dataclasses.asdict(cfg.export)},
        "run_name": bundle.run_name,
        "export": exported,
        "versions": versions(exported["exporter"]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- the stage

def run(cfg: RecipeConfig, recipe: Recipe, paths: Paths) -> ExportResult:
    bundle = train.load_model(paths, recipe)
    model, processor, port = bundle.model, bundle.processor, portable_module(recipe)
    rows = evaluate.valid_rows(paths, cfg.name).head(cfg.export.parity_rows)
    *inputs, _ = recipe.kind.tensors(recipe, processor, rows)
    state_json = json.dumps(processor, indent=2, sort_keys=True) + "\n"

    model_bytes, exporter = to_onnx(model, example_inputs(tuple(inputs)), cfg.export.opset, recipe)
    model_bytes = with_metadata(model_bytes, {port.METADATA_KEY: state_json, "recipe": cfg.name})

    with atomic_path(paths.export(cfg.name)) as out:
        out.mkdir()
        (out / port.MODEL_FILE).write_bytes(model_bytes)
        (out / port.STATE_FILE).write_text(state_json)
        shutil.copyfile(inspect.getfile(port), out / SCRIPT_FILE)
        shutil.copyfile(inspect.getfile(portable_csv), out / CSV_HELPER)  # predict.py imports it
        max_diff = parity(model, recipe, processor, out, rows)
        if not max_diff <= cfg.export.parity_atol:  # `not <=` also catches NaN
            raise ParityError(
                f"export@{cfg.name}: ONNX ({exporter}) and PyTorch outputs differ by "
                f"{max_diff:.3g} on {len(rows)} validation rows, more than "
                f"recipes.{cfg.name}.export.parity_atol={cfg.export.parity_atol:g}; "
                f"{paths.export(cfg.name)} was left as it was")
        exported = {"exporter": exporter, "opset": cfg.export.opset, "file": port.MODEL_FILE,
                    "parity_max_abs_diff": max_diff, "parity_rows": len(rows),
                    "parity_atol": cfg.export.parity_atol}
        card = model_card(cfg, paths, recipe, bundle, input_names(model), exported)
        (out / CARD_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")
    return ExportResult(path=paths.export(cfg.name), exporter=exporter, opset=cfg.export.opset,
                        parity_max_diff=max_diff, parity_rows=len(rows))
