"""Shared fixtures: the demo model's paths and real servers on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from peftserve.ray.local import configure_env as configure_ray_env

# Ray reads its environment when it is first imported, which for the Ray tests is at
# collection time, before any fixture runs: set it here, in the first conftest loaded, so a Ray
# node's address is 127.0.0.1 and never the host's interface address (tests talk only to
# loopback). Importing peftserve.ray.local does not import Ray.
configure_ray_env()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "models" / "demo" / "base"
DEMO_ADAPTERS = REPO_ROOT / "models" / "demo" / "adapters"

# Two cores are shared by the test process and its servers; more threads only thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")

T = TypeVar("T")


class ServerThread:
    """A real peftserve server running on its own event loop in a background thread."""

    # The engine mode of servers that do not choose one. In-process by default here, unlike
    # the CLI (each engine process costs seconds of start-up, and most tests are about the
    # servicer): tests/server/test_process_mode.py switches it and runs the server's tests
    # again with the engine in its own process, and PEFTSERVE_TEST_ENGINE_PROCESS=1 runs the
    # whole suite so; tests that inject faults into the engine object pin False.
    engine_process_default = os.environ.get("PEFTSERVE_TEST_ENGINE_PROCESS", "") == "1"

    def __init__(self, **overrides: Any) -> None:
        from peftserve.server.config import ServerConfig
        from peftserve.server.engine.config import EngineConfig

        engine_overrides = {
            k: v
            for k, v in overrides.items()
            if k in {f.name for f in dataclasses.fields(EngineConfig)}
        }
        server_overrides = {k: v for k, v in overrides.items() if k not in engine_overrides}
        server_overrides.setdefault("engine_process", ServerThread.engine_process_default)
        engine = EngineConfig(model_path=DEMO_MODEL, adapters_dir=DEMO_ADAPTERS)
        engine = dataclasses.replace(engine, **engine_overrides)
        self.config = ServerConfig(
            engine=engine, address="127.0.0.1:0", log_level="WARNING", **server_overrides
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        from peftserve.server.app import create_server

        self.server, self.port = self.call(create_server(self.config))
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coroutine: Any, timeout_s: float = 120.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout_s)

    def run_in_loop(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.call(wrapper())  # type: ignore[no-any-return]

    def wait_ready(self) -> None:
        self.call(self.server.wait_ready(120.0))

    def stop(self, grace_s: float = 5.0) -> None:
        if self._loop.is_closed():
            return
        self.call(self.server.stop(grace_s))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="session")
def demo_server() -> Iterator[ServerThread]:
    """One shared server with the demo model and its adapters, default settings."""
    server = ServerThread()
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def channel(demo_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(demo_server.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> Any:
    from peftserve.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationServiceStub(channel)
