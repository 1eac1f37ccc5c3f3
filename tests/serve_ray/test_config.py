"""The shipped Serve config and the deployment's defaults, checked without a cluster."""

from __future__ import annotations

import ray
from peftserve.ray import local
from peftserve.ray.app import AUTOSCALING_DEFAULTS, PeftServe, build_app
from peftserve.ray.deployment import RAY_ENGINE_DEFAULTS, engine_config
from ray.serve._private.utils import import_attr
from ray.serve.schema import ServeDeploySchema


def test_the_shipped_config_is_a_valid_serve_config_naming_real_code() -> None:
    schema = ServeDeploySchema.model_validate(local.load_config())
    assert schema.http_options.host == "127.0.0.1"
    for function in schema.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(function))
    (app,) = schema.applications
    assert import_attr(app.import_path) is not None
    (deployment,) = app.deployments
    assert deployment.name == PeftServe.name


def test_llm_defaults() -> None:
    config = PeftServe._deployment_config  # what Serve deploys when the config sets nothing
    assert config.max_ongoing_requests == 48
    autoscaling = config.autoscaling_config
    assert autoscaling is not None
    assert autoscaling.target_ongoing_requests == AUTOSCALING_DEFAULTS["target_ongoing_requests"]
    assert autoscaling.min_replicas == 1 and autoscaling.downscale_delay_s == 300
    assert config.graceful_shutdown_timeout_s == 30
    assert build_app({}) is not None


def test_engine_options_from_yaml_values() -> None:
    config = engine_config({"pinned_adapters": ["upper"], "max_loaded_adapters": 3})
    assert config.pinned_adapters == ("upper",)
    assert config.max_loaded_adapters == 3
    assert config.lazy_load_adapters is RAY_ENGINE_DEFAULTS["lazy_load_adapters"]
    assert config.preload_adapters is False
    assert config.device == "cpu"  # no GPU assigned by Ray here
    assert not ray.is_initialized()  # and finding that out started no Ray instance
    assert engine_config({"pinned_adapters": "upper,title"}).pinned_adapters == ("upper", "title")


def test_overrides_replace_autoscaling_with_a_fixed_count() -> None:
    config = local.with_overrides(
        local.load_config(), grpc_port=1234, deployment={"num_replicas": 2}
    )
    (entry,) = config["applications"][0]["deployments"]
    assert entry["num_replicas"] == 2 and entry["autoscaling_config"] is None
    assert config["grpc_options"]["port"] == 1234
    assert local.load_config()["grpc_options"]["port"] == 9000  # the file is untouched
