"""One local Ray cluster on 127.0.0.1 for every Ray test: peftserve deployed with two replicas.

The cluster belongs to the test process (``ray.init(address="local")``), so its teardown, or
the process ending, stops every Ray process it started. It runs the shipped
``serve_config.yaml`` with test ports and two fixed replicas.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI"):
        raise RuntimeError("ray is not installed: `make install` installs the [ray] extra")
    pytest.skip(
        "ray is not installed (`make install` installs the [ray] extra)", allow_module_level=True
    )

REPLICAS = 2
# Per replica: a small adapter budget (the demo has three adapters), so eviction is reachable.
MAX_LOADED_ADAPTERS = 2
# Copies of the demo's "upper" adapter, each named by one test only: a test that needs an
# adapter held by exactly one replica uses its own (earlier tests may have loaded the demo's
# adapters on both replicas).
SOLO_ADAPTERS = ("solo-affinity", "solo-cancel", "solo-kill")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayServe:
    """The deployed application: its gRPC address and a handle for replica-side checks."""

    def __init__(self, address: str, metrics_port: int) -> None:
        self.address = address
        self.metrics_port = metrics_port

    def engine_stats(self, adapter: str = "") -> dict[str, Any]:
        """Load and adapters of a replica (one holding ``adapter`` when given)."""
        from ray import serve

        handle = serve.get_app_handle("peftserve").options(
            method_name="engine_stats", multiplexed_model_id=adapter
        )
        return handle.remote().result(timeout_s=30)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    from peftserve.ray import local

    from ..conftest import DEMO_ADAPTERS

    adapters = tmp_path_factory.mktemp("ray") / "adapters"
    shutil.copytree(DEMO_ADAPTERS, adapters)
    for name in SOLO_ADAPTERS:
        shutil.copytree(adapters / "upper", adapters / name)
    metrics_port = _free_port()
    local.start_head(num_cpus=REPLICAS + 2, metrics_export_port=metrics_port)
    try:
        config = local.with_overrides(
            local.load_config(),
            grpc_port=_free_port(),
            http_port=_free_port(),
            engine={"adapters_dir": str(adapters), "max_loaded_adapters": MAX_LOADED_ADAPTERS},
            deployment={"num_replicas": REPLICAS},
        )
        yield RayServe(local.deploy(config), metrics_port)
    finally:
        local.stop()


@pytest.fixture(scope="session")
def ray_channel(ray_serve: RayServe) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(ray_serve.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel


@pytest.fixture(scope="session")
def ray_stub(ray_channel: grpc.Channel) -> Any:
    from peftserve.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationServiceStub(ray_channel)
