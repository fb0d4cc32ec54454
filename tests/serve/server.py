"""A real server on a free loopback port, with uvicorn in a thread of the test process and the engine in
a process of its own, as in production (tests look at the engine through the stats it reports)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from slimserve.config import EngineConfig
from slimserve.engine.engine import LLMEngine
from slimserve.serve.app import create_app
from slimserve.serve.engine_messages import EngineStats
from slimserve.serve.engine_process import EngineFactory
from slimserve.serve.serving import ServerContext

MODEL_NAME = "tiny"
# Starting the engine process imports torch and loads the model: slow on a busy machine.
STARTUP_TIMEOUT_S = 120


class ServerThread:
    def __init__(
        self,
        model_folder: str,
        api_key: str | None = None,
        engine_factory: EngineFactory = LLMEngine,
        **engine_kwargs,
    ) -> None:
        config = EngineConfig(model=model_folder, dtype="float32", device="cpu", **engine_kwargs)
        self.app = create_app(config, MODEL_NAME, api_key, engine_factory)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def ctx(self) -> ServerContext:
        return self.app.state.ctx

    @property
    def stats(self) -> EngineStats:
        return self.ctx.engine.stats

    def pool_is_whole(self) -> bool:
        return self.stats.num_free_blocks == self.stats.num_blocks

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine has taken every command and runs nothing (aborts reach it asynchronously)."""
        deadline = time.monotonic() + timeout
        while not self.ctx.engine.idle:
            if time.monotonic() > deadline:
                raise AssertionError("the engine did not go idle")
            time.sleep(0.01)
