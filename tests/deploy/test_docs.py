"""docs/deploy.md quotes configuration; the quotes must be what the code and files use."""

from __future__ import annotations

import json
import re

import yaml
from peftserve.client.channel import service_config

from ..conftest import REPO_ROOT

DOC = (REPO_ROOT / "docs" / "deploy.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, re.DOTALL)


def test_the_documented_service_config_is_the_clients() -> None:
    (documented,) = [json.loads(b) for b in blocks("json")]
    assert documented == service_config()


def test_the_documented_adapter_rule_is_the_shipped_one() -> None:
    shipped = yaml.safe_load(
        (REPO_ROOT / "deploy" / "kubernetes" / "prometheus-adapter" / "values.yaml").read_text()
    )
    documented = [yaml.safe_load(b) for b in blocks("yaml")]
    assert {"rules": shipped["rules"]} in documented


def test_the_documented_grace_arithmetic_is_the_manifests() -> None:
    deployment = yaml.safe_load(
        (REPO_ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml").read_text()
    )
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert f"terminationGracePeriodSeconds: {spec['terminationGracePeriodSeconds']}" in DOC
    assert f"`{' '.join(container['lifecycle']['preStop']['exec']['command'])}`" in DOC
    assert "--shutdown-grace-s=30" in container["args"] and "--shutdown-grace-s 30" in DOC
