"""The Serve application: the deployment with its defaults for an LLM replica, and its builder.

Defaults (each can be overridden in the Serve config's ``deployments:`` entry):

- ``max_ongoing_requests: 48`` -- Ray's default (5) would cap a replica's batch at 5 requests;
  48 is the engine's default batch (32) plus a short queue, so requests beyond it wait in Ray's
  router, where another replica may take them, instead of in one replica's queue.
- autoscaling on ongoing requests (streams count while they stream): ``target_ongoing_requests:
  24`` (three quarters of a full batch: batching stays efficient and there is room for bursts),
  ``min_replicas: 1``, ``max_replicas: 4``, ``upscale_delay_s: 30`` (a replica loads a model:
  do not react to a blip), ``downscale_delay_s: 300`` (loading one back is slow), metrics
  looked back over 30 s.
- ``graceful_shutdown_timeout_s: 30`` -- the plain server's ``shutdown_grace_s``: ongoing
  requests get that long to finish when a replica is stopped.
- ``ray_actor_options: {num_cpus: 1}``; give ``num_gpus: 1`` for a GPU replica (the engine then
  runs on that GPU, see ``engine_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from .deployment import DEPLOYMENT_NAME, PeftServeReplica

APP_NAME = "peftserve"

AUTOSCALING_DEFAULTS: Mapping[str, Any] = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 24,
    "upscale_delay_s": 30,
    "downscale_delay_s": 300,
    "look_back_period_s": 30,
}

PeftServe = serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=48,
    autoscaling_config=dict(AUTOSCALING_DEFAULTS),
    graceful_shutdown_timeout_s=30,
    graceful_shutdown_wait_loop_s=0.5,
    health_check_period_s=10,
    health_check_timeout_s=30,
    ray_actor_options={"num_cpus": 1},
)(PeftServeReplica)


def build_app(args: Mapping[str, Any]) -> Application:
    """Serve's application builder (``import_path: peftserve.ray:build_app``).

    ``args.engine``: ``EngineConfig`` fields (``model_path``, ``adapters_dir``,
    ``max_loaded_adapters``, ``pinned_adapters``, ...); unset ones take the defaults of
    ``deployment.engine_config``.
    """
    return PeftServe.bind(engine=dict(args.get("engine") or {}))
