"""Running the HTTP server: a checkpoint loaded into an engine, the app on uvicorn, loopback by default."""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from llavamed_fast.serve.api import ServerLimits, create_app
from llavamed_fast.serve.engine import Engine
from llavamed_fast.serve.images import ImagePolicy


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_engine(
    model: str | Path,
    *,
    template: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_batch: int = 8,
) -> Engine:
    """The engine for a checkpoint directory; its chat template comes from the checkpoint (``template``
    only for plain transformers checkpoints, which do not name one)."""
    from llavamed_fast.model.checkpoint import load_for_inference

    model_, processor = load_for_inference(model, template=template, device=device, dtype=dtype)
    return Engine(model_, processor, max_batch=max_batch)


@dataclass
class RunningServer:
    """A server on its own thread (tests, benchmarks, notebooks); ``url`` is its base address."""

    server: uvicorn.Server
    thread: threading.Thread
    engine: Engine
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(
    engine: Engine,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    images: ImagePolicy | None = None,
) -> RunningServer:
    """Start the engine and the server (``port=0``: any free port) and return once it accepts connections."""
    app = create_app(engine, model_name=model_name, api_key=api_key, limits=limits, images=images)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    engine.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        thread.join(0.02)
    bound = sock.getsockname()
    address = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return RunningServer(server, thread, engine, f"http://{address}:{bound[1]}")


def serve_forever(
    engine: Engine,
    *,
    model_name: str,
    host: str,
    port: int,
    api_key: str | None,
    limits: ServerLimits,
    images: ImagePolicy,
) -> None:
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"binding to {host} (not loopback) needs an API key (--api-key or $LLAVAMED_API_KEY)"
        )
    app = create_app(engine, model_name=model_name, api_key=api_key, limits=limits, images=images)
    with engine:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
