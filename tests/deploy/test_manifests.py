"""The Kubernetes manifests render, validate strictly, and a broken field fails the suite.

Everything runs offline: ``kubectl kustomize`` renders, ``kubernetes-validate``'s bundled
schemas and the CRD copies in deploy/kubernetes/crds/ validate (scripts/validate_manifests.py).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "validate_manifests", REPO_ROOT / "scripts" / "validate_manifests.py"
)
assert _spec is not None and _spec.loader is not None
vm = importlib.util.module_from_spec(_spec)
sys.modules["validate_manifests"] = vm
_spec.loader.exec_module(vm)

Manifest = dict[str, Any]


@pytest.fixture(scope="module", params=vm.OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[Manifest]:
    # A missing kubectl fails here with vm.kubectl()'s message (how to get it), never a skip.
    return vm.render(request.param)


def test_every_overlay_is_valid_for_the_oldest_and_newest_kubernetes(
    rendered: list[Manifest],
) -> None:
    for version in vm.KUBERNETES_VERSIONS:
        vm.validate_schemas(rendered, version)
    vm.check_consistency(rendered)
    kinds = {m["kind"] for m in rendered}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert kinds & {"PodMonitor", "ServiceMonitor"}


def test_the_command_line_validator_passes() -> None:
    # What `make check` runs.
    assert vm.main([]) == 0


def test_gpu_overlay_asks_for_a_gpu_and_the_demo_runs_on_cpu() -> None:
    def server(overlay: str) -> Manifest:
        deployment = next(m for m in vm.render(overlay) if m["kind"] == "Deployment")
        return vm._server_container(deployment)

    gpu = server("overlays/gpu")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "PEFTSERVE_DEVICE", "value": "cuda"} in gpu["env"]
    assert "nvidia.com/gpu" not in server("overlays/cpu-demo")["resources"].get("limits", {})


def test_kubectl_missing_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(vm.ManifestError, match="kubectl is not on PATH"):
        vm.render("overlays/cpu-demo")


def _deployment(manifests: list[Manifest]) -> Manifest:
    return next(m for m in manifests if m["kind"] == "Deployment")


def _container(manifests: list[Manifest]) -> Manifest:
    return vm._server_container(_deployment(manifests))


def _monitor(manifests: list[Manifest]) -> Manifest:
    return next(m for m in manifests if m["kind"] in ("PodMonitor", "ServiceMonitor"))


def _endpoint(manifests: list[Manifest]) -> Manifest:
    spec = _monitor(manifests)["spec"]
    return (spec.get("podMetricsEndpoints") or spec["endpoints"])[0]  # type: ignore[no-any-return]


def _hpa(manifests: list[Manifest]) -> Manifest:
    return next(m for m in manifests if m["kind"] == "HorizontalPodAutoscaler")


# Each breaks one field of a rendered overlay, with what the error must point at.
SCHEMA_BREAKS: dict[str, tuple[Callable[[list[Manifest]], Any], str]] = {
    "unknown container field": (
        lambda ms: _container(ms).update(imagePullPolice="Always"),
        "'imagePullPolice' was unexpected",
    ),
    "probe port of the wrong type": (
        # gRPC probes take a port number, unlike httpGet probes.
        lambda ms: _container(ms)["readinessProbe"]["grpc"].update(port="grpc"),
        "readinessProbe.grpc.port: 'grpc' is not of type 'integer'",
    ),
    "misspelt probe kind": (
        lambda ms: _container(ms).update(readinessProbe={"gprc": {"port": 50051}}),
        "'gprc' was unexpected",
    ),
    "grace period as text": (
        lambda ms: _deployment(ms)["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds="45s"
        ),
        "terminationGracePeriodSeconds: '45s' is not of type",
    ),
    "unknown monitor endpoint field": (
        lambda ms: _endpoint(ms).update(intervall="15s"),
        "'intervall' was unexpected",
    ),
    "monitor scheme outside its enum": (
        lambda ms: _endpoint(ms).update(scheme="grpc"),
        "scheme: 'grpc' is not one of",
    ),
    "unknown field in monitor metadata": (
        lambda ms: _monitor(ms)["metadata"].update(labelz={"a": "b"}),
        "at metadata: Additional properties are not allowed ('labelz'",
    ),
    "HPA target without a type": (
        lambda ms: _hpa(ms)["spec"]["metrics"][0]["pods"]["target"].pop("type"),
        "'type' is a required property",
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEMA_BREAKS))
def test_a_broken_field_fails_schema_validation(rendered: list[Manifest], name: str) -> None:
    breaker, expected = SCHEMA_BREAKS[name]
    broken = copy.deepcopy(rendered)
    breaker(broken)
    for version in vm.KUBERNETES_VERSIONS:
        with pytest.raises(vm.ManifestError) as caught:
            vm.validate_schemas(broken, version)
        assert f"invalid for Kubernetes {version}" in str(caught.value)
        assert expected in str(caught.value)


def _set_arg(manifests: list[Manifest], flag: str, value: str) -> None:
    container = _container(manifests)
    container["args"] = [a for a in container["args"] if not a.startswith(f"{flag}=")]
    container["args"].append(f"{flag}={value}")


CONSISTENCY_BREAKS: dict[str, tuple[Callable[[list[Manifest]], Any], str]] = {
    "drain longer than the pod's grace": (
        lambda ms: _set_arg(ms, "--shutdown-grace-s", "60"),
        "terminationGracePeriodSeconds",
    ),
    "readiness on a health name the server never sets": (
        lambda ms: _container(ms)["readinessProbe"]["grpc"].update(service="peftserve"),
        "readinessProbe must ask for the health of peftserve.v1.GenerationService",
    ),
    "a flag the server does not have": (
        lambda ms: _container(ms)["args"].append("--max-batch=4"),
        "refused by the server",
    ),
    "model volume writable": (
        lambda ms: _container(ms)["volumeMounts"][0].update(readOnly=False),
        "read-only volume",
    ),
    "no preStop": (
        lambda ms: _container(ms).pop("lifecycle"),
        "no preStop",
    ),
    "metrics port renamed": (
        lambda ms: [
            p.update(name="prom") for p in _container(ms)["ports"] if p["name"] == "metrics"
        ],
        "no port named 'metrics'",
    ),
    "headless Service made a ClusterIP one": (
        lambda ms: [
            m["spec"].pop("clusterIP")
            for m in ms
            if m["kind"] == "Service" and m["spec"].get("clusterIP") == "None"
        ],
        "headless Service",
    ),
    "HPA on a metric nobody exports": (
        lambda ms: _hpa(ms)["spec"]["metrics"][0]["pods"]["metric"].update(name="queue_depth"),
        "not exposed by the Prometheus Adapter rule",
    ),
}


@pytest.mark.parametrize("name", sorted(CONSISTENCY_BREAKS))
def test_a_broken_rule_fails_the_consistency_checks(rendered: list[Manifest], name: str) -> None:
    breaker, message = CONSISTENCY_BREAKS[name]
    broken = copy.deepcopy(rendered)
    breaker(broken)
    with pytest.raises(vm.ManifestError, match=re.escape(message)):
        vm.check_consistency(broken)


def test_a_broken_overlay_fails_to_render(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = Path(vm.DEPLOY_DIR / "base").resolve()
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\npatches:\n  - path: missing.yaml\n"
    )
    with pytest.raises(vm.ManifestError, match=r"kubectl kustomize .* failed"):
        vm.render(overlay)


def test_the_crd_copies_are_the_operators_and_strict() -> None:
    schemas = vm.crd_schemas()
    assert set(schemas) == {
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
    }
    spec = schemas[("monitoring.coreos.com/v1", "ServiceMonitor")]["properties"]["spec"]
    assert spec["required"] == ["endpoints", "selector"]
    assert spec["additionalProperties"] is False


def test_the_hpa_metric_is_what_the_server_exports_and_the_adapter_serves() -> None:
    assert vm.adapter_metric_names() == {"peftserve_engine_queued_requests"}
    assert "peftserve_engine_queued_requests" in vm.server_metric_names()


def test_the_containerfile_installs_with_the_makefiles_commands() -> None:
    """No image is built here, so the image must install exactly as `make install` does: both
    run scripts/install.sh, which CI runs through `make test`."""
    containerfile = (vm.DEPLOY_DIR / "Containerfile").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    installs = re.findall(r"^RUN .*scripts/install\.sh.*$", containerfile, re.MULTILINE)
    assert len(installs) == 1, installs
    assert re.search(r"^\tPYTHON=.* scripts/install\.sh \$\(VENV\) ", makefile, re.MULTILINE)
    # The image copies everything the editable install and the demo overlay need.
    for path in ("pyproject.toml", "README.md", "client", "server", "scripts/install.sh"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", containerfile, re.MULTILINE), path
    assert "models/demo" in containerfile
    # The user the pod's securityContext runs as.
    assert re.search(r"^USER 10001", containerfile, re.MULTILINE)
