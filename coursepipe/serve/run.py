"""Running the app: uvicorn in this process, or a Ray Serve deployment on a (local or joined) cluster.

Ray Serve gets a *builder* (`serve.ingress(build)`): each replica builds its own app and loads
the export folders itself, so nothing large is pickled to replicas, and every replica process
holds its own onnxruntime sessions. The export root must be readable at the same path on every
node that runs a replica (shared storage on a cluster, as for ray_storage).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

APP_NAME = "coursepipe"


def serve_local(export_root: Path, limits, host: str, port: int) -> None:
    """Block serving on host:port with uvicorn until interrupted."""
    import uvicorn

    from coursepipe.serve.app import create_app

    uvicorn.run(create_app(export_root, limits), host=host, port=port, log_level="info")


class Background:
    """uvicorn in a thread (tests, benches): `with Background(app, port) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start (port in use?)")
            threading.Event().wait(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def build_app(export_root: str, limits):
    """The replica-side builder: the same app as `serve_local` runs."""
    from coursepipe.serve.app import create_app

    return create_app(export_root, limits)


def deployment_options(ray_cfg) -> dict:
    """serve.deployment(...) options from params.yaml's serve.ray section."""
    options = {"ray_actor_options": {"num_cpus": ray_cfg.cpus_per_replica}}
    if ray_cfg.autoscale:
        options["autoscaling_config"] = {"min_replicas": ray_cfg.min_replicas,
                                         "max_replicas": ray_cfg.max_replicas,
                                         "target_ongoing_requests": ray_cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = ray_cfg.replicas
    return options


def deploy(export_root: Path, limits, host: str, port: int, blocking: bool = False):
    """Start Ray Serve's HTTP proxy on host:port and run the app's deployment on it.

    Joins RAY_ADDRESS when set (a `ray start` cluster); otherwise starts a local Ray. Returns the
    deployment handle; `blocking` waits (Ctrl-C to stop) as `serve run` does."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    root = str(Path(export_root).resolve())

    def builder():  # a plain function: Ray Serve takes a partial for an ASGI app itself
        return build_app(root, limits)

    dep = serve.deployment(name=APP_NAME, **deployment_options(limits.ray))(serve.ingress(builder)())
    handle = serve.run(dep.bind(), name=APP_NAME, route_prefix="/", blocking=blocking)
    return handle
