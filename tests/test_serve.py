"""`coursepipe serve`: the app over real exports (one per kind), through a real uvicorn server.

Each answer is checked against the export folder's own predict.py (run as a script, or its
functions), so a page or API that drifts from the exported model fails here. The bad-input tests
send what an attacker or a careless client would: a text file named .jpg, a decompression bomb,
a body too large (declared and streamed), unknown names, paths in names. The Ray Serve
deployment is tested on a `ray start --head` cluster (tests/test_ray_cluster.py).
"""
from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from coursepipe.config import evolve
from coursepipe.recipes import load_params
from coursepipe.serve import load as serve_load
from coursepipe.serve.app import create_app
from coursepipe.serve.models import load_script
from coursepipe.serve.run import Background

MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def limits(served_root):
    return evolve(load_params(served_root / "params.yaml").serve, max_upload_bytes=MAX_UPLOAD,
                  max_batch=8, max_text_chars=200)


@pytest.fixture(scope="module")
def url(served_root, limits):
    with Background(create_app(served_root / "export", limits)) as base:
        yield base


def png(arr: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def digit(seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8))


def png_header(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels over almost no data (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def adult_row(served_root) -> dict:
    state = json.loads((served_root / "export" / "adult" / "preprocessing.json").read_text())
    row = {c: state["categories"][c][1] for c in state["cat_names"]}
    return {**row, "age": 37, "fnlwgt": 120000, "education-num": 13}


# ----------------------------------------------------------------------------- what is served

def test_lists_every_export_with_its_course_metric(url, served_root):
    listed = httpx.get(f"{url}/api/models").json()
    assert [m["name"] for m in listed] == ["adult", "human_numbers", "mnist", "movielens"]
    for m in listed:
        card = json.loads((served_root / "export" / m["name"] / "card.json").read_text())
        assert m["kind"] == card["kind"]
        assert m["headline"]["value"] == card["metrics"][card["course"]["metric"]]
    index = httpx.get(url).text
    assert all(f'href="/models/{m["name"]}"' in index for m in listed)
    docs = httpx.get(f"{url}/openapi.json").json()
    assert "/api/models/{name}/predict" in docs["paths"] and "/api/models/{name}/images" in docs["paths"]


def test_app_runs_from_the_export_alone(served_root, tmp_path):
    """A fresh interpreter serving a copy of export/, one request per kind: no torch and no recipe
    code is imported, and nothing is unpickled (pickle's loaders are made to fail first)."""
    import shutil
    shutil.copytree(served_root / "export", tmp_path / "export")
    script = f"""
import pickle, sys, httpx
def refuse(*a, **k):
    raise AssertionError('something was unpickled')
pickle.load = pickle.loads = pickle.Unpickler = refuse
from coursepipe import config
from coursepipe.serve.app import create_app
from coursepipe.serve.load import models, sample_call
from coursepipe.serve.run import Background
limits = config.load_serve({str(served_root / 'params.yaml')!r})
with Background(create_app({str(tmp_path / 'export')!r}, limits)) as url:
    for d in models(url):
        call = sample_call(d)
        r = httpx.request(call.method, url + call.path, json=call.json)
        assert r.status_code == 200, (d['name'], r.text)
heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('coursepipe.kinds', 'coursepipe.learn', 'coursepipe.recipes')))
print(heavy)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_malformed_serve_params_are_one_line_naming_the_key(tmp_path):
    import yaml
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["serve"]["ray"]["min_replicas"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "coursepipe.cli", "--root", str(tmp_path), "serve"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"coursepipe serve: error: {tmp_path / 'params.yaml'}: serve.ray.min_replicas: "
                                  f"must be <= max_replicas (4), got 5")


# ----------------------------------------------------------------------------- each kind

def test_image_upload_matches_the_exports_predict_script(url, served_root, tmp_path):
    files = []
    for i in range(3):
        (tmp_path / f"d{i}.png").write_bytes(digit(i))
        files.append(("files", (f"d{i}.png", digit(i), "image/png")))
    r = httpx.post(f"{url}/api/models/mnist/images", files=files)
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    script = served_root / "export" / "mnist" / "predict.py"
    proc = subprocess.run([sys.executable, str(script), *[str(tmp_path / f"d{i}.png") for i in range(3)]],
                          capture_output=True, text=True, check=True)
    expected = pd.read_csv(io.StringIO(proc.stdout))
    assert [o["name"] for o in outs] == ["d0.png", "d1.png", "d2.png"]
    assert [o["label"] for o in outs] == [str(v) for v in expected["prediction"]]
    np.testing.assert_allclose([o["probability"] for o in outs], expected["probability"], atol=1e-6)
    for o in outs:
        assert o["top"][0] == {"label": o["label"], "probability": o["probability"]}
        assert [t["probability"] for t in o["top"]] == sorted((t["probability"] for t in o["top"]), reverse=True)
    # the JSON batch form gives the same answers, in order
    batch = {"inputs": [{"image_base64": base64.b64encode(digit(i)).decode()} for i in range(3)]}
    again = httpx.post(f"{url}/api/models/mnist/predict", json=batch).json()["outputs"]
    assert [o["label"] for o in again] == [o["label"] for o in outs]


def test_tabular_rows_match_the_portable_module(url, served_root):
    folder = served_root / "export" / "adult"
    module = load_script(folder)
    sess, state = module.load(folder)
    rows = [adult_row(served_root), {**adult_row(served_root), "age": "forty"}]
    r = httpx.post(f"{url}/api/models/adult/predict", json={"inputs": rows})
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    proba = module.predict_proba(sess, state, pd.DataFrame(rows))
    np.testing.assert_allclose([o["probability"] for o in outs], proba.max(1), atol=1e-6)
    assert [o["label"] for o in outs] == [state["classes"][i] for i in proba.argmax(1)]
    assert outs[0]["unparsed"] == "" and outs[1]["unparsed"] == "age='forty'"
    page = httpx.get(f"{url}/models/adult").text  # the form offers the export's own categories
    assert f'<select name="{state["cat_names"][0]}">' in page
    assert f"<option>{state['categories'][state['cat_names'][0]][1]}</option>" in page


def test_recommendations_and_ratings_match_the_portable_module(url, served_root):
    folder = served_root / "export" / "movielens"
    module = load_script(folder)
    sess, state = module.load(folder)
    user = state["users"][0]
    r = httpx.get(f"{url}/api/models/movielens/recommend", params={"user": user, "n": 5})
    assert r.status_code == 200, r.text
    expected = module.rank_items(sess, state, user, 5)
    assert [i["item"] for i in r.json()["items"]] == expected["item"].tolist()
    pair = {"user": user, "item": int(expected["item"][0])}
    rating = httpx.post(f"{url}/api/models/movielens/predict", json={"inputs": [pair]}).json()["outputs"][0]
    assert rating["rating"] == pytest.approx(float(expected["prediction"][0]), abs=1e-5)
    assert rating["known_user"] and rating["known_item"]


def test_text_continuation_matches_the_portable_module(url, served_root):
    folder = served_root / "export" / "human_numbers"
    module = load_script(folder)
    sess, state = module.load(folder)
    r = httpx.post(f"{url}/api/models/human_numbers/predict",
                   json={"inputs": [{"text": "eight thousand one , eight thousand two ,", "n": 3}]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    words, probs = module.predict_next(sess, state, "eight thousand one , eight thousand two ,", 3)
    assert out["continuation"] == " ".join(words)
    np.testing.assert_allclose([t["probability"] for t in out["tokens"]], probs, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, data, status, says", [
    ("notes.jpg", b"just some text, named like a photo", 415, "notes.jpg: not an image"),
    ("bomb.png", png_header(100_000, 100_000), 413, "bomb.png: too many pixels"),
    ("wide.png", png_header(6000, 5000), 413, "30,000,000 pixels"),
    ("cut.png", digit(0)[:60], 422, "could not be decoded"),
])
def test_bad_uploads_are_refused_naming_the_file(url, name, data, status, says):
    r = httpx.post(f"{url}/api/models/mnist/images", files=[("files", (name, data, "image/png"))])
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_body_limits_hold_declared_and_streamed(url):
    big = b"x" * (MAX_UPLOAD + 1)
    r = httpx.post(f"{url}/api/models/mnist/images", files=[("files", ("big.png", big, "image/png"))])
    assert r.status_code == 413 and "more than the limit of 300,000" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(40):
            yield b"y" * 10_000
    r = httpx.post(f"{url}/api/models/adult/predict", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_limits_on_text_batch_and_fields(url, served_root):
    long = {"inputs": [{"text": "one " * 100}]}
    r = httpx.post(f"{url}/api/models/human_numbers/predict", json=long)
    assert r.status_code == 413 and "inputs[0].text: 400 characters" in r.json()["detail"]
    many = {"inputs": [adult_row(served_root)] * 9}
    r = httpx.post(f"{url}/api/models/adult/predict", json=many)
    assert r.status_code == 413 and "9 items" in r.json()["detail"]
    r = httpx.post(f"{url}/api/models/adult/predict", json={"inputs": [{"age": 30}]})
    assert r.status_code == 422 and "missing field(s)" in r.json()["detail"] and "workclass" in r.json()["detail"]
    r = httpx.post(f"{url}/api/models/adult/predict", json={"inputs": [{**adult_row(served_root), "age": [1]}]})
    assert r.status_code == 422 and "inputs[0].age" in r.json()["detail"]
    r = httpx.post(f"{url}/api/models/movielens/predict", json={"inputs": [{"user": "1; drop", "item": 2}]})
    assert r.status_code == 422 and "inputs[0].user" in r.json()["detail"]
    r = httpx.post(f"{url}/api/models/mnist/predict", json={"inputs": [{"image_base64": "%%%"}]})
    assert r.status_code == 422 and "base64" in r.json()["detail"]
    r = httpx.post(f"{url}/api/models/human_numbers/predict", json={"inputs": [{"text": "one", "n": 999}]})
    assert r.status_code == 422 and "inputs[0].n" in r.json()["detail"]


@pytest.mark.parametrize("path", [
    "/api/models/nope", "/models/nope", "/api/models/nope/predict",
    "/api/models/..%2F..%2Fparams.yaml", "/api/models/%2E%2E/predict",
    "/api/models/mnist/recommend?user=1",  # a route of another kind
])
def test_unknown_models_are_404(url, path):
    r = httpx.post(f"{url}{path}", json={"inputs": [{}]}) if path.endswith("predict") else httpx.get(f"{url}{path}")
    assert r.status_code == 404, (path, r.status_code, r.text)


# ----------------------------------------------------------------------------- load

def test_bounded_load_has_no_errors(url):
    """A short run of the load bench's generator (bench/serve_load.py runs 2,000 per model)."""
    for d in serve_load.models(url):
        result = serve_load.hammer(url, serve_load.sample_call(d), n=64, concurrency=8)
        assert result.errors == 0, (d["name"], result.first_error)
        assert result.requests == 64 and result.p99_ms >= result.p50_ms > 0


def test_ray_serve_options_come_from_params(limits):
    from coursepipe.serve.run import deployment_options

    fixed = deployment_options(evolve(limits.ray, autoscale=False, replicas=3, cpus_per_replica=0.5))
    assert fixed == {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 3}
    auto = deployment_options(evolve(limits.ray, autoscale=True, min_replicas=1, max_replicas=4,
                                     target_ongoing_requests=8.0))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert "num_replicas" not in auto
