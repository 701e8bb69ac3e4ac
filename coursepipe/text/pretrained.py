"""A pretrained AWD-LSTM language model in fastai's format (the WikiText-103 weights ULMFiT starts
from: `wt103-fwd.tgz` holding `lstm_fwd.pth` and `itos_wt103.pkl`), loaded into this project's
AWDLanguageModel with the embedding matched to the corpus' vocabulary (fastai's match_embeds).

The file comes from a URL (downloaded once into a cache, sha256-checked before it is kept; a
stalled or refused download is one clear error naming the URL), or a local path. Nothing in it
can run code: the weights load with `torch.load(weights_only=True)` and the vocabulary pickle with
an unpickler that refuses every global (a list of strings needs none).
"""
from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import torch

from coursepipe.learn.loop import Callback
from coursepipe.models.awd_lstm import lm_state
from coursepipe.models.transfer import WeightsError, resolve


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise WeightsError(f"vocabulary pickle refers to {module}.{name}: refusing to load it "
                           f"(a list of strings needs no code)")


def read_itos(path: Path) -> list[str]:
    with open(path, "rb") as f:
        itos = _NoGlobals(f).load()
    if not isinstance(itos, list) or not all(isinstance(w, str) for w in itos):
        raise WeightsError(f"{path.name}: expected a list of words, got {type(itos).__name__}")
    return itos


def fastai_keys(state: dict) -> dict:
    """fastai's AWD-LSTM LM keys (`0.encoder.weight`, `0.rnns.1.module.weight_ih_l0`,
    `0.rnns.1.weight_hh_l0_raw`, `1.decoder.bias`, ...) -> this project's names."""
    out = {}
    for k, v in state.items():
        if k.startswith("0.encoder_dp.") or k.endswith("weight_hh_l0") and ".module." in k:
            continue  # the dropout copies fastai keeps beside the raw weights
        name = k.replace("0.encoder.", "encoder.encoder.").replace("1.decoder.", "head.decoder.")
        name = name.replace(".module.", ".lstm.").replace("weight_hh_l0_raw", "lstm.weight_hh_l0")
        name = name.replace("0.rnns.", "encoder.rnns.")
        out[name] = v
    return out


def read_fastai_lm(archive: Path) -> tuple[dict, list[str]]:
    """(state_dict in this project's names, its vocabulary) from a fastai LM archive or folder."""
    from coursepipe.data.archive import extract

    with tempfile.TemporaryDirectory() as tmp:
        folder = archive if archive.is_dir() else extract(archive, tmp)
        pths, pkls = sorted(Path(folder).rglob("*.pth")), sorted(Path(folder).rglob("*.pkl"))
        if len(pths) != 1 or len(pkls) != 1:
            raise WeightsError(f"{archive.name}: expected one .pth (weights) and one .pkl "
                               f"(vocabulary), found {[p.name for p in pths + pkls]}")
        state = torch.load(pths[0], map_location="cpu", weights_only=True)
        itos = read_itos(pkls[0])
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # fastai's learn.save() format
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{archive.name}: the .pth is not a state_dict of tensors")
    return fastai_keys(state), itos


def load_into(model, state: dict, itos: list[str], new_itos: list[str], source: str) -> None:
    """Copy the pretrained weights into an AWDLanguageModel, rows matched to new_itos."""
    try:
        model.load_state_dict(lm_state(state, itos, new_itos))
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise WeightsError(f"weights {source}: does not fit this model section ({detail}; fastai's "
                           f"WikiText-103 LM is emb_sz 400, n_hid 1152, n_layers 3)") from None


class LoadPretrainedLM(Callback):
    """Before a fresh run's first epoch: the declared pretrained LM, on every rank (a resumed run
    keeps its checkpoint's weights). A callback, not build_model: evaluate and export rebuild the
    trained model and must not need the pretrained file."""
    order = -10

    def __init__(self, weights: str, cache_dir: str, sha256: str | None, timeout: float):
        self.weights, self.cache_dir, self.sha256, self.timeout = weights, cache_dir, sha256, timeout

    def before_fit(self):
        learn = self.learn
        if learn.step > 0 or learn.epoch_offset > 0:
            return
        path = resolve(self.weights, self.cache_dir, self.sha256, self.timeout)
        state, itos = read_fastai_lm(path)
        model = getattr(learn.model, "module", learn.model)
        load_into(model, state, itos, model.itos, self.weights)  # itos: set by the kind's build_model
