"""Render every kustomize overlay of deploy/kubernetes and validate it offline.

Three layers, each able to fail on its own:

1. ``kubectl kustomize`` renders the overlay (a broken patch or reference fails here);
2. every built-in object is validated strictly (unknown fields are errors) against the
   Kubernetes JSON schemas that ``kubernetes-validate`` bundles, for the oldest and the newest
   Kubernetes version we claim; PodMonitor/ServiceMonitor objects against the openAPIV3Schema
   of the Prometheus Operator CRDs kept in deploy/kubernetes/crds/;
3. consistency checks no schema can express: probes ask the health service the server really
   registers, the drain fits in the termination grace period, selectors and named ports meet,
   the server's flags and PEFTSERVE_* variables exist, the HPA's metric is one the server
   exports and the Prometheus Adapter rule exposes.

Run by ``make check`` (``python scripts/validate_manifests.py``) and by tests/deploy/.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions, schema_contents
from referencing import Registry, Resource

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("overlays/cpu-demo", "overlays/gpu")
CRD_DIR = DEPLOY_DIR / "crds"
ADAPTER_RULES = DEPLOY_DIR / "prometheus-adapter" / "values.yaml"
# Native gRPC probes are GA from 1.27; the newest is the newest schema kubernetes-validate has.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
HEALTH_SERVICE = "peftserve.v1.GenerationService"
DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = f"{DEFINITIONS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

Manifest = dict[str, Any]


class ManifestError(Exception):
    """One object of a rendered overlay is invalid; the message names the object and field."""


# ---- 1. rendering ----
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise ManifestError(
            "kubectl is not on PATH: it renders the kustomize overlays (`kubectl kustomize`). "
            "This project's machines have it preinstalled (Debian package kubectl); install it "
            "from your distribution or the Kubernetes release for your platform, then rerun."
        )
    return path


def render(overlay: str | Path) -> list[Manifest]:
    """``kubectl kustomize`` of one overlay directory (relative to deploy/kubernetes)."""
    directory = DEPLOY_DIR / overlay
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise ManifestError(f"kubectl kustomize {overlay} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def name_of(manifest: Manifest) -> str:
    return f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"


# ---- 2. schemas ----
def _crd_to_json_schema(schema: Any) -> Any:
    """An openAPIV3Schema as a JSON Schema, with the API server's strict field validation:
    objects with listed properties reject any other (unless marked to preserve them)."""
    if isinstance(schema, list):
        return [_crd_to_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _crd_to_json_schema(value) for key, value in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    for key in [k for k in out if k.startswith("x-kubernetes-")]:
        del out[key]
    if "properties" in schema and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> JSON Schema, for every CRD version in ``crd_dir``."""
    schemas: dict[tuple[str, str], Any] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = _crd_to_json_schema(version["schema"]["openAPIV3Schema"])
                # ObjectMeta is the API server's own, whatever the CRD says about metadata.
                schema["properties"]["metadata"] = {"$ref": OBJECT_META}
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return schemas


@functools.cache
def _definitions(version: str) -> Registry:
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    definitions = schema_contents(f"{schema_dir}/_definitions.json", version)
    return Resource.from_contents(definitions) @ Registry()


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """The strict validator of one kind, built once: the CRD copy's schema for our custom
    resources, else the one ``kubernetes_validate.validate`` would load for it (the same file,
    found the same way; that function re-reads the definitions at every call)."""
    crds = crd_schemas()
    if (api_version, kind) in crds:
        schema = crds[(api_version, kind)]
    else:
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        path = f"kubernetes-json-schema/v{version}-local-strict/{kind.lower()}-{group_version}.json"
        try:
            schema = schema_contents(path, version)
        except FileNotFoundError:
            raise kubernetes_validate.SchemaNotFoundError(
                version=version, kind=kind, api_version=api_version
            ) from None
    return jsonschema.Draft202012Validator(schema, registry=_definitions(version))


def validate_schemas(manifests: Iterable[Manifest], version: str) -> None:
    """Strict schema validation of every object for Kubernetes ``version``."""
    if version not in all_versions():
        raise ManifestError(f"kubernetes-validate has no schemas for Kubernetes {version}")
    for manifest in manifests:
        try:
            api_version, kind = manifest.get("apiVersion", ""), manifest.get("kind", "")
            validator = _validator(version, api_version, kind)
            error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
            if error is not None:
                raise error
        except jsonschema.ValidationError as error:
            path = ".".join(str(p) for p in error.absolute_path) or "(root)"
            raise ManifestError(
                f"{name_of(manifest)} is invalid for Kubernetes {version} at {path}: "
                f"{error.message}"
            ) from error
        except kubernetes_validate.SchemaNotFoundError as error:
            raise ManifestError(f"{name_of(manifest)}: {error.message}") from error


# ---- 3. consistency ----
def _one(manifests: list[Manifest], kind: str) -> Manifest:
    found = [m for m in manifests if m.get("kind") == kind]
    if len(found) != 1:
        raise ManifestError(f"expected exactly one {kind}, found {len(found)}")
    return found[0]


def _server_container(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    matches = [c for c in containers if c["name"] == "peftserve"]
    if not matches:
        raise ManifestError(f"{name_of(deployment)} has no container named peftserve")
    return matches[0]


def _server_settings(container: Manifest) -> argparse.Namespace:
    """The container's args and PEFTSERVE_* env parsed by the server's own flag parser."""
    from peftserve.server.config import build_arg_parser

    env = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
    parser = build_arg_parser({k: v for k, v in env.items() if k.startswith("PEFTSERVE_")})
    try:
        return parser.parse_args([*container.get("command", [])[1:], *container.get("args", [])])
    except SystemExit as error:
        raise ManifestError(
            f"the peftserve container's args/env are refused by the server: {container.get('args')}"
        ) from error


def _port(value: Any, container: Manifest, where: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    if isinstance(value, int):
        if value not in ports.values():
            raise ManifestError(f"{where}: port {value} is not a port of the container")
        return value
    if value not in ports:
        raise ManifestError(f"{where}: the container has no port named {value!r}")
    return int(ports[value])


def _address_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _prestop_seconds(container: Manifest) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        raise ManifestError("the peftserve container has no preStop hook")
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return float(command[1])
    raise ManifestError(f"preStop must be a sleep (endpoints update during it): {pre_stop}")


def check_consistency(manifests: list[Manifest]) -> None:
    """What the schemas cannot say; each failure names the rule broken."""
    deployment = _one(manifests, "Deployment")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = _server_container(deployment)
    settings = _server_settings(container)
    grpc_port = _address_port(settings.address)
    metrics_port = _address_port(settings.metrics_address) if settings.metrics_address else None
    if metrics_port is None:
        raise ManifestError("the server must be started with --metrics-address")

    # Probes: native gRPC on the server's port, readiness/startup on GenerationService (the
    # name the server flips to NOT_SERVING while loading and draining).
    for probe_name, service in (
        ("startupProbe", HEALTH_SERVICE),
        ("readinessProbe", HEALTH_SERVICE),
        ("livenessProbe", None),
    ):
        probe = container.get(probe_name)
        if probe is None or "grpc" not in probe:
            raise ManifestError(f"{probe_name} must be a native grpc probe")
        if _port(probe["grpc"]["port"], container, probe_name) != grpc_port:
            raise ManifestError(f"{probe_name} must probe the gRPC port {grpc_port}")
        if service is not None and probe["grpc"].get("service") != service:
            raise ManifestError(f"{probe_name} must ask for the health of {service}")
    if _port("grpc", container, "ports") != grpc_port:
        raise ManifestError("the container port named grpc must be the server's --address port")
    if _port("metrics", container, "ports") != metrics_port:
        raise ManifestError("the port named metrics must be the server's --metrics-address port")

    # Drain timing: preStop, then SIGTERM and the server's grace, inside the pod's grace.
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    needed = _prestop_seconds(container) + settings.shutdown_grace_s
    if grace <= needed:
        raise ManifestError(
            f"terminationGracePeriodSeconds ({grace}) must exceed the preStop sleep plus "
            f"--shutdown-grace-s ({needed:g}), or in-flight requests are killed mid-drain"
        )

    # The model volume is mounted read-only.
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    model_dir = Path(str(settings.model_path))
    model_mounts = [m for m in mounts.values() if model_dir.is_relative_to(m["mountPath"])]
    if not model_mounts or not all(m.get("readOnly") for m in model_mounts):
        raise ManifestError(f"the model ({model_dir}) must come from a read-only volume mount")

    # Services, PDB, monitors and HPA find the pods and their named ports.
    services = [m for m in manifests if m["kind"] == "Service"]
    if not any(s["spec"].get("clusterIP") == "None" for s in services):
        raise ManifestError("a headless Service (clusterIP: None) is needed for client balancing")
    for service in services:
        if not _selects(service["spec"]["selector"], pod_labels):
            raise ManifestError(f"{name_of(service)} does not select the peftserve pods")
        for port in service["spec"]["ports"]:
            _port(port["targetPort"], container, name_of(service))
    pdb = _one(manifests, "PodDisruptionBudget")
    if not _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        raise ManifestError("the PodDisruptionBudget does not select the peftserve pods")
    monitors = [m for m in manifests if m["kind"] in ("PodMonitor", "ServiceMonitor")]
    if len(monitors) != 1:
        raise ManifestError(f"expected one PodMonitor or ServiceMonitor, found {len(monitors)}")
    monitor = monitors[0]
    if monitor["kind"] == "PodMonitor":
        if not _selects(monitor["spec"]["selector"]["matchLabels"], pod_labels):
            raise ManifestError("the PodMonitor does not select the peftserve pods")
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            if _port(endpoint["port"], container, "PodMonitor") != metrics_port:
                raise ManifestError("the PodMonitor must scrape the metrics port")
    else:
        selector = monitor["spec"]["selector"]["matchLabels"]
        ports = {
            p.get("name"): p
            for s in services
            if _selects(selector, s["metadata"].get("labels", {}))
            for p in s["spec"]["ports"]
        }
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] not in ports:
                raise ManifestError(f"no selected Service has a port named {endpoint['port']}")
            target = ports[endpoint["port"]]["targetPort"]
            if _port(target, container, "ServiceMonitor") != metrics_port:
                raise ManifestError("the ServiceMonitor must scrape the metrics port")
    hpa = _one(manifests, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
        raise ManifestError("the HorizontalPodAutoscaler must scale the peftserve Deployment")
    exposed = adapter_metric_names()
    for metric in hpa["spec"]["metrics"]:
        name = metric["pods"]["metric"]["name"]
        if name not in exposed:
            raise ManifestError(f"HPA metric {name} is not exposed by the Prometheus Adapter rule")
        if name not in server_metric_names():
            raise ManifestError(f"HPA metric {name} is not a metric the server exports")

    # Every container image is pinned to a tag (kustomize's images: reached them all).
    for c in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
        if ":" not in c["image"].rsplit("/", 1)[-1] and "@" not in c["image"]:
            raise ManifestError(f"container {c['name']}: image {c['image']!r} has no tag")


def adapter_metric_names(path: Path = ADAPTER_RULES) -> set[str]:
    """The custom metric names the Prometheus Adapter rules expose (``name.as``)."""
    rules = yaml.safe_load(path.read_text())["rules"]["custom"]
    names = set()
    for rule in rules:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
        if series is None:
            raise ManifestError(f"cannot read the series of {rule['seriesQuery']!r}")
        names.add(rule.get("name", {}).get("as") or series.group(1))
    return names


def server_metric_names() -> set[str]:
    """Metric names in server/metrics.py (string literals that look like our metrics)."""
    source = (REPO_ROOT / "server" / "metrics.py").read_text()
    return set(re.findall(r'"(peftserve_[a-z0-9_]+)"', source))


# ---- all together ----
def validate_overlay(overlay: str | Path) -> list[Manifest]:
    manifests = render(overlay)
    for version in KUBERNETES_VERSIONS:
        validate_schemas(manifests, version)
    check_consistency(manifests)
    return manifests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlays", nargs="*", default=list(OVERLAYS))
    args = parser.parse_args(argv)
    failed = False
    for overlay in args.overlays:
        try:
            manifests = validate_overlay(overlay)
        except ManifestError as error:
            print(f"{overlay}: FAILED: {error}", file=sys.stderr)
            failed = True
            continue
        kinds = ", ".join(sorted(name_of(m) for m in manifests))
        versions = " and ".join(KUBERNETES_VERSIONS)
        print(f"{overlay}: valid for Kubernetes {versions} ({kinds})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
