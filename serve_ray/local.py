"""A local Ray head on 127.0.0.1 with peftserve deployed from a Serve config (YAML).

Used by ``make serve-ray`` (``python -m peftserve.ray``), the Ray tests and the proxy
benchmark, so all three run the shipped ``serve_config.yaml``. The head belongs to the calling
process: ``stop()`` (or the process ending) takes every Ray process it started with it.

Set ``LOCAL_ENV`` in the environment before ``ray`` is first imported (``configure_env``):
Ray reads it at import time.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG_PATH = Path(__file__).resolve().parent / "serve_config.yaml"

# Keep the node's address on loopback (Ray otherwise picks the host's routable address), send
# no usage statistics anywhere, and keep Ray's own process count low.
LOCAL_ENV: Mapping[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def configure_env() -> None:
    """Apply ``LOCAL_ENV`` (values already set by the caller win)."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def load_config(path: Path = CONFIG_PATH) -> dict[str, Any]:
    import yaml

    with path.open() as handle:
        config: dict[str, Any] = yaml.safe_load(handle)
    return config


def with_overrides(
    config: Mapping[str, Any],
    *,
    grpc_port: int | None = None,
    http_port: int | None = None,
    engine: Mapping[str, Any] | None = None,
    deployment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A copy of ``config`` with other ports, engine fields or deployment options (tests)."""
    result = copy.deepcopy(dict(config))
    if grpc_port is not None:
        result["grpc_options"]["port"] = grpc_port
    if http_port is not None:
        result["http_options"]["port"] = http_port
    app = result["applications"][0]
    if engine:
        app.setdefault("args", {}).setdefault("engine", {}).update(engine)
    if deployment:
        entry = app["deployments"][0]
        if "num_replicas" in deployment:
            # A fixed count replaces autoscaling (the code's default included).
            entry["autoscaling_config"] = None
        entry.update(deployment)
    return result


def start_head(num_cpus: int = 2, metrics_export_port: int | None = None) -> None:
    """Start a Ray head on 127.0.0.1 owned by this process (no dashboard).

    ``metrics_export_port``: where the node's metrics agent serves Prometheus text (every
    replica's ``ray_peftserve_*`` series); None lets Ray pick one.
    """
    configure_env()
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace="serve",
        logging_level=logging.WARNING,
        log_to_driver=True,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=metrics_export_port,
    )


def deploy(config: Mapping[str, Any], timeout_s: float = 180.0) -> str:
    """Deploy ``config`` on the running head, wait until it runs, return the gRPC address.

    This is what ``serve run CONFIG`` does (Ray 2.60's ``serve_start`` and ``deploy_apps``),
    minus the terminal it blocks.
    """
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(dict(config))
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema)
    names = [app.name for app in schema.applications]
    end = time.monotonic() + timeout_s
    while True:
        applications = serve.status().applications
        statuses = {
            name: applications[name].status if name in applications else None for name in names
        }
        if all(status == "RUNNING" for status in statuses.values()):
            break
        failed = {n: s for n, s in statuses.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"peftserve did not deploy: {failed}; see the replica logs")
        if time.monotonic() >= end:
            raise TimeoutError(f"peftserve not running after {timeout_s:.0f}s: {statuses}")
        time.sleep(0.5)
    return f"127.0.0.1:{schema.grpc_options.port}"


def stop() -> None:
    """Shut Serve down (replicas drain) and end the head with every process it started."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
