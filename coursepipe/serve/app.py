"""The ASGI app: a page per exported model and a JSON API (OpenAPI docs at /docs).

    GET  /                               every model, its course metric
    GET  /models/{name}                  the model's page: its form, results as bars, its card
    GET  /api/models                     [{name, kind, headline}]
    GET  /api/models/{name}              card + what the form needs
    POST /api/models/{name}/predict      {"inputs": [...]}: a batch, kind-specific items
    POST /api/models/{name}/images       multipart `files`: image models
    GET  /api/models/{name}/recommend    ?user=&n=: collaborative filtering

`create_app` is all uvicorn (`coursepipe serve`) and Ray Serve (`coursepipe serve --ray`) need.
The body limit is enforced while the request streams in, so a client that lies about (or
leaves out) Content-Length still cannot make the server hold more than max_upload_bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from coursepipe.serve.models import BadInput, CollabModel, ImageModel, Served, discover

TEMPLATES = Path(__file__).parent / "templates"


class PredictRequest(BaseModel):
    """A batch of inputs; each item's fields depend on the model's kind (see GET /api/models/{name}):
    image {"image_base64", "name"?}, tabular {column: value, ...}, collab {"user", "item"},
    text {"text", "n"?}."""
    inputs: list[dict[str, Any]] = Field(..., examples=[[{"text": "one , two , three"}]])


class BodyLimit:
    """Pure ASGI middleware: refuse a body over `limit` bytes, by header or while it streams."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": self.message(int(declared))}, 413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            event = await receive()
            if event["type"] == "http.request":
                seen += len(event.get("body", b""))
                if seen > self.limit:  # raised inside the route: FastAPI answers it as a 413
                    raise HTTPException(413, self.message(seen))
            return event

        return await self.app(scope, counted, send)

    def message(self, size: int) -> str:
        return f"request body of {size:,}+ bytes, more than the limit of {self.limit:,}"


def create_app(export_root: str | Path, limits) -> FastAPI:
    """The app over every model in `export_root`; `limits` is params.yaml's `serve:` section."""
    models = discover(Path(export_root), limits)
    app = FastAPI(title="coursepipe models", description="Every exported course model: pages and a JSON API.")
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes)
    templates = Jinja2Templates(directory=str(TEMPLATES))  # autoescaped: nothing from a request is HTML

    def model(name: str) -> Served:
        if name not in models:  # the name is only ever a key: it never reaches a path
            raise HTTPException(404, f"no model {name!r}; served: {sorted(models)}")
        return models[name]

    def of_kind(name: str, cls: type) -> Any:
        m = model(name)
        if not isinstance(m, cls):
            raise HTTPException(404, f"{name!r} is a {m.kind} model; this route serves {cls.kind} models")
        return m

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request):
        return templates.TemplateResponse(request, "index.html", {
            "models": [m.summary() for m in models.values()], "models_nav": sorted(models)})

    @app.get("/models/{name}", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request, name: str):
        m = model(name)
        return templates.TemplateResponse(request, "model.html", {
            "m": m.summary(), "form": m.form(), "card": m.card, "models_nav": sorted(models)})

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"models": len(models)}

    @app.get("/api/models", summary="Every served model")
    def list_models() -> list[dict]:
        return [m.summary() for m in models.values()]

    @app.get("/api/models/{name}", summary="A model's card and inputs")
    def describe(name: str) -> dict:
        m = model(name)
        return {**m.summary(), "form": m.form(), "card": m.card}

    @app.post("/api/models/{name}/predict", summary="Predict a batch of inputs")
    def predict(name: str, body: PredictRequest) -> dict:
        m = model(name)
        return {"model": name, "outputs": m.predict(body.inputs)}

    @app.post("/api/models/{name}/images", summary="Label uploaded image files")
    def images(name: str, files: list[UploadFile] = File(...)) -> dict:
        m = of_kind(name, ImageModel)  # predict_files holds the batch limit, for both image routes
        # the uploaded name is shown back, never opened: the bytes come from the request body
        blobs = [(f.filename or f"file {i}", f.file.read()) for i, f in enumerate(files)]
        return {"model": name, "outputs": m.predict_files(blobs)}

    @app.get("/api/models/{name}/recommend", summary="Top-N items for a user")
    def recommend(name: str, user: int, n: int = Query(limits.recommend_n)) -> dict:
        m = of_kind(name, CollabModel)
        return {"model": name, "user": user, "items": m.recommend(user, n)}

    return app
