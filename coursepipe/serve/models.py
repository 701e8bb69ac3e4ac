"""What the web app serves: every export/<recipe>/ folder, run by the folder's own predict.py.

Nothing here imports the training code (torch, the recipes): a folder copied to a server with
this package, numpy, pandas, PIL and onnxruntime is enough, and a folder exported by an older
version keeps the preprocessing it was exported with. One class per kind of export turns JSON
inputs into the folder's predict functions and describes the page's form; a new kind of export
adds one class to PAGES (a kind without one is skipped with a warning, never half-served).

Every input is checked before it reaches a model and refused with a BadInput naming it: images
are sniffed by content (PIL), not by file name, and their pixel count is checked from the header
before anything is decoded; strings and batches have length limits; nothing from a request
becomes a file path.
"""
from __future__ import annotations

import base64
import binascii
import importlib.util
import io
import json
import logging
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

CARD_FILE = "card.json"
SCRIPT_FILE = "predict.py"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a served model's name is a folder name
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
log = logging.getLogger(__name__)


class BadInput(ValueError):
    """A request the app refuses: `status` is the HTTP code, the message names the culprit."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- input checks

def text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise BadInput(422, f"{field}: expected text, got {type(value).__name__}")
    if len(value) > limit:
        raise BadInput(413, f"{field}: {len(value)} characters, more than the limit of {limit}")
    return value


def batch(inputs: Any, limit: int) -> list[dict]:
    if not isinstance(inputs, list) or not inputs:
        raise BadInput(422, "inputs: expected a non-empty list")
    if len(inputs) > limit:
        raise BadInput(413, f"inputs: {len(inputs)} items, more than the limit of {limit} per call")
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise BadInput(422, f"inputs[{i}]: expected an object, got {type(item).__name__}")
    return inputs


def sniff_image(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse what is not an image of an accepted format, or has too many pixels, by content.

    PIL reads only the header here: a 1 kB PNG that claims 100k x 100k pixels is refused before
    a byte of it is decompressed."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadInput(415, f"{name}: not an image (content starts with {data[:12]!r}); "
                            f"accepted: {', '.join(IMAGE_FORMATS)}") from None
    except Image.DecompressionBombError:
        raise BadInput(413, f"{name}: too many pixels (refused as a decompression bomb)") from None
    if fmt not in IMAGE_FORMATS:
        raise BadInput(415, f"{name}: {fmt} images are not accepted; accepted: {', '.join(IMAGE_FORMATS)}")
    if w * h > max_pixels:
        raise BadInput(413, f"{name}: {w} x {h} = {w * h:,} pixels, more than the limit of {max_pixels:,}")


def decode_b64(value: Any, field: str, limit_bytes: int) -> bytes:
    raw = text(value, field, limit_bytes * 4 // 3 + 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(422, f"{field}: not valid base64") from None


# ----------------------------------------------------------------------------- one model

def load_script(folder: Path) -> ModuleType:
    """The folder's predict.py as a module (its own copy of the portable code, not the package's)."""
    spec = importlib.util.spec_from_file_location(f"coursepipe_export_{folder.name}", folder / SCRIPT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Served:
    """One exported model: the folder's predict module, its onnxruntime session and state."""
    kind = ""

    def __init__(self, name: str, folder: Path, card: dict, module: ModuleType, limits):
        self.name, self.folder, self.card, self.module, self.limits = name, folder, card, module, limits
        self.sess, self.state = module.load(folder)

    def headline(self) -> dict | None:
        """The course's metric and this model's value of it, for the index page."""
        course, metrics = self.card.get("course"), self.card.get("metrics") or {}
        if not course:
            return None
        return {"metric": course["metric"], "value": metrics.get(course["metric"]),
                "course": course["value"], "on": course.get("on")}

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.card.get("kind"), "page": self.kind,
                "headline": self.headline()}

    def form(self) -> dict:
        """What the page's form needs to know (fields, choices, limits)."""
        return {}

    def predict(self, inputs: list[dict]) -> list[dict]:
        raise NotImplementedError

    def labelled(self, proba: np.ndarray, classes: list[str]) -> list[dict]:
        """Per row: the label, its probability, and the top_k classes with theirs."""
        out = []
        for p in proba:
            order = np.argsort(-p, kind="stable")[: self.limits.top_k]
            out.append({"label": classes[order[0]], "probability": float(p[order[0]]),
                        "top": [{"label": classes[i], "probability": float(p[i])} for i in order]})
        return out


class ImageModel(Served):
    kind = "image"

    def form(self) -> dict:
        return {"mode": self.state["mode"], "size": self.state["size"], "classes": self.state["classes"],
                "formats": list(IMAGE_FORMATS), "max_upload_bytes": self.limits.max_upload_bytes,
                "max_pixels": self.limits.max_pixels}

    def predict(self, inputs: list[dict]) -> list[dict]:
        blobs = []
        for i, item in enumerate(batch(inputs, self.limits.max_batch)):
            if "image_base64" not in item:
                raise BadInput(422, f"inputs[{i}]: needs an 'image_base64' field")
            blobs.append((str(item.get("name") or f"inputs[{i}]"),
                          decode_b64(item["image_base64"], f"inputs[{i}].image_base64",
                                     self.limits.max_upload_bytes)))
        return self.predict_files(blobs)

    def checked(self, files: list[tuple[str, bytes]], predict):
        """The upload checks every image page shares (batch size; format and pixel count read from
        the header), then predict(session, state, blobs), a function of the export's own module."""
        if len(files) > self.limits.max_batch:
            raise BadInput(413, f"{len(files)} files, more than the limit of {self.limits.max_batch} per call")
        for name, data in files:
            sniff_image(data, name, self.limits.max_pixels)
        try:
            return predict(self.sess, self.state, [d for _, d in files])
        except OSError as e:  # a header that parses over a body that does not (truncated file)
            raise BadInput(422, f"an image could not be decoded: {e}") from None

    def predict_files(self, files: list[tuple[str, bytes]]) -> list[dict]:
        """[(display name, bytes)] -> one result per file, named as given."""
        proba = self.checked(files, self.module.predict_proba)
        return [{"name": name, **row} for (name, _), row in
                zip(files, self.labelled(proba, self.state["classes"]))]


class PointModel(ImageModel):
    """A point regressor (lesson 3's head pose): uploads as for images; per image the point
    (x, y) in pixels of that image as uploaded, and its width and height."""
    kind = "points"

    def form(self) -> dict:
        return {"mode": self.state["mode"], "size": self.state["size"], "formats": list(IMAGE_FORMATS),
                "max_upload_bytes": self.limits.max_upload_bytes, "max_pixels": self.limits.max_pixels}

    def predict_files(self, files: list[tuple[str, bytes]]) -> list[dict]:
        xy, sizes = self.checked(files, self.module.predict_points)
        return [{"name": name, "x": float(p[0]), "y": float(p[1]), "width": int(s[0]), "height": int(s[1])}
                for (name, _), p, s in zip(files, xy, sizes)]


class TagsModel(ImageModel):
    """A multi-label image model: every tag above the export's threshold, with its probability
    (an ImageModel, so the upload route serves it too)."""
    kind = "tags"

    def form(self) -> dict:
        return {**super().form(), "threshold": self.state["threshold"]}

    def predict_files(self, files: list[tuple[str, bytes]]) -> list[dict]:
        proba = self.checked(files, self.module.predict_proba)
        classes, threshold = list(self.state["classes"]), float(self.state["threshold"])
        out = []
        for (name, _), p, found in zip(files, proba, self.module.tags_above(proba, classes, threshold)):
            top = int(np.argmax(p))
            out.append({"name": name, "threshold": threshold,
                        "tags": [{"label": t, "probability": q} for t, q in found],
                        "label": " ".join(t for t, _ in found) or f"no tag above {threshold:g}",
                        "probability": float(p[top]),   # the most probable tag's, shown or not
                        "top": self.labelled(p[None], classes)[0]["top"]})
        return out


class SegmentationModel(ImageModel):
    """An image in, a colour mask out (the folder's palette) and each class's share of the frame.
    An ImageModel, so the upload route (`/images`) and its checks serve it as they serve classifiers."""
    kind = "segmentation"

    def form(self) -> dict:
        classes, palette = self.state["classes"], self.state["palette"]
        return {**super().form(), "legend": [{"label": c, "colour": "#%02x%02x%02x" % tuple(p)}
                                             for c, p in zip(classes, palette)]}

    def predict_files(self, files: list[tuple[str, bytes]]) -> list[dict]:
        """[(display name, bytes)] -> per file: its mask as base64 PNG (the image's own size) and
        the top_k classes by share of its pixels."""
        masks = self.checked(files, self.module.predict_masks)
        classes = self.state["classes"]
        out = []
        for (name, _), mask in zip(files, masks):
            shares = self.module.shares(mask, len(classes))
            order = np.argsort(-shares, kind="stable")[: self.limits.top_k]
            out.append({"name": name, "width": int(mask.shape[1]), "height": int(mask.shape[0]),
                        "mask_png_base64": base64.b64encode(self.module.mask_png(mask, self.state)).decode(),
                        "top": [{"label": classes[i], "share": float(shares[i])} for i in order]})
        return out


class TabularModel(Served):
    kind = "tabular"

    def form(self) -> dict:
        s = self.state
        fields = [{"name": c, "type": "category", "choices": [v for v in s["categories"][c] if v != "#na#"]}
                  for c in s["cat_names"]]
        fields += [{"name": c, "type": "number", "default": s["medians"][c]} for c in s["cont_names"]]
        return {"fields": fields, "target": s["target"], "classes": s["classes"]}

    def predict(self, inputs: list[dict]) -> list[dict]:
        rows = batch(inputs, self.limits.max_batch)
        for i, row in enumerate(rows):
            for key, value in row.items():
                if isinstance(value, str):
                    text(value, f"inputs[{i}].{key}", self.limits.max_text_chars)
                elif value is not None and not isinstance(value, (int, float)):
                    raise BadInput(422, f"inputs[{i}].{key}: expected text or a number, got {type(value).__name__}")
        df = pd.DataFrame(rows)
        needed = list(self.state["cat_names"]) + list(self.state["cont_names"])
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise BadInput(422, f"inputs are missing field(s) {missing}; expected {needed}")
        proba = self.module.predict_proba(self.sess, self.state, df)
        notes = self.module.unparsed(self.state, df)
        return [{**row, "unparsed": note} for row, note in
                zip(self.labelled(proba, list(self.state["classes"])), notes)]


class CollabModel(Served):
    kind = "collab"

    def form(self) -> dict:
        users = self.state["users"]
        return {"n_users": len(users), "n_items": len(self.state["items"]), "users": users[:200],
                "recommend_n": self.limits.recommend_n, "rating_range": self.state.get("rating_range")}

    def ids(self, item: dict, i: int, key: str) -> int:
        value = item.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInput(422, f"inputs[{i}].{key}: expected a whole number, got {value!r}")
        return value

    def predict(self, inputs: list[dict]) -> list[dict]:
        rows = batch(inputs, self.limits.max_batch)
        df = pd.DataFrame({"user": [self.ids(r, i, "user") for i, r in enumerate(rows)],
                           "item": [self.ids(r, i, "item") for i, r in enumerate(rows)]})
        users, items = self.module.encode(self.state, df)
        ratings = self.module.run_indices(self.sess, users, items)
        return [{"user": int(u), "item": int(it), "rating": float(r), "known_user": bool(ku > 0),
                 "known_item": bool(ki > 0)}
                for u, it, r, ku, ki in zip(df["user"], df["item"], ratings, users, items)]

    def recommend(self, user: int, n: int) -> list[dict]:
        n_items = len(self.state["items"])  # every item is scored anyway: any n up to all of them
        if not 1 <= n <= n_items:
            raise BadInput(422, f"n: expected 1..{n_items}, got {n}")
        top = self.module.rank_items(self.sess, self.state, user, n)
        return json.loads(top.to_json(orient="records"))


class LanguageModel(Served):
    kind = "text"

    def form(self) -> dict:
        return {"max_new_tokens": self.limits.max_new_tokens, "max_text_chars": self.limits.max_text_chars,
                "vocab_size": len(self.state["itos"])}

    def predict(self, inputs: list[dict]) -> list[dict]:
        out = []
        for i, item in enumerate(batch(inputs, self.limits.max_batch)):
            prompt = text(item.get("text"), f"inputs[{i}].text", self.limits.max_text_chars)
            n = item.get("n", 1)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.limits.max_new_tokens:
                raise BadInput(422, f"inputs[{i}].n: expected 1..{self.limits.max_new_tokens}, got {n!r}")
            words, probs = self.module.predict_next(self.sess, self.state, prompt, n)
            out.append({"text": prompt, "continuation": " ".join(words),
                        "tokens": [{"token": w, "probability": float(p)} for w, p in zip(words, probs)]})
        return out


class TextClassModel(Served):
    """A text classifier (ULMFiT): each input's `text` -> its label and the classes' probabilities."""
    kind = "review"

    def form(self) -> dict:
        return {"max_text_chars": self.limits.max_text_chars, "classes": list(self.state["classes"])}

    def predict(self, inputs: list[dict]) -> list[dict]:
        items = batch(inputs, self.limits.max_batch)
        texts = [text(item.get("text"), f"inputs[{i}].text", self.limits.max_text_chars)
                 for i, item in enumerate(items)]
        proba = self.module.classify(self.sess, self.state, texts)
        return [{"text": t, **row} for t, row in zip(texts, self.labelled(proba, self.state["classes"]))]


# the card's `kind` (coursepipe/kinds/*.py `name`) -> how it is served
PAGES: dict[str, type[Served]] = {"image_classification": ImageModel, "tabular_classification": TabularModel,
                                  "collab": CollabModel, "language_model": LanguageModel,
                                  "point_regression": PointModel,
                                  "multi_label": TagsModel,
                                  "segmentation": SegmentationModel,
                                  "text_classification": TextClassModel}


def discover(export_root: Path, limits) -> dict[str, Served]:
    """{name: Served} for every <export_root>/<name>/ holding card.json, model.onnx and predict.py."""
    found: dict[str, Served] = {}
    if not export_root.is_dir():
        raise FileNotFoundError(f"{export_root} is not a folder: run the export stage first "
                                f"(`dvc repro` or `coursepipe export <recipe>`)")
    for folder in sorted(p for p in export_root.iterdir() if p.is_dir()):
        if not (folder / CARD_FILE).is_file() or not (folder / SCRIPT_FILE).is_file():
            continue  # e.g. an atomic_path staging folder, or something else entirely
        if not NAME.match(folder.name):
            log.warning("serve: skipping %s (not a model name)", folder)
            continue
        card = json.loads((folder / CARD_FILE).read_text())
        page = PAGES.get(card.get("kind"))
        if page is None:
            log.warning("serve: skipping %s: no page for kind %r (known: %s)", folder.name,
                        card.get("kind"), sorted(PAGES))
            continue
        found[folder.name] = page(folder.name, folder, card, load_script(folder), limits)
    if not found:
        raise FileNotFoundError(f"{export_root} holds no exported model (export/<recipe>/card.json)")
    return found
