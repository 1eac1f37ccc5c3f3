"""The service config of docs/deploy.md in Node (@grpc/grpc-js), over canned replicas.

grpc-js balances round_robin and runs the retry policy, but has no client-side health
checking (it ignores ``healthCheckConfig``): these tests pin what docs/deploy.md says a Node
client gets.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from peftserve.client.channel import service_config

from ..client.test_balancing import Replica, ipv4_target
from ..conftest import REPO_ROOT
from ..examples.test_node_client import _node_client_ready

SCRIPT = REPO_ROOT / "tests" / "deploy" / "node_balancing.js"


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    why_not = _node_client_ready()
    if why_not is not None:
        pytest.skip(why_not)
    started = [Replica(f"r{i}") for i in range(3)]
    yield started
    for replica in started:
        replica.server.stop(None)


def run_node(target: str, calls: int) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, str(SCRIPT), target, str(calls), json.dumps(service_config())],
        capture_output=True,
        text=True,
        timeout=120,
        env={"NODE_PATH": str(REPO_ROOT / "examples" / "node" / "node_modules")},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_node_balances_round_robin(replicas: list[Replica]) -> None:
    outcome = run_node(ipv4_target(replicas), 30)
    assert outcome["failures"] == []
    # The first calls may go out while some subchannels still connect: a third each, roughly.
    assert set(outcome["served"]) == {"r0", "r1", "r2"}, outcome
    assert all(6 <= n <= 14 for n in outcome["served"].values()), outcome


def test_node_retries_a_refusing_replica(replicas: list[Replica]) -> None:
    replicas[0].refuse = True  # as a replica that began draining answers
    outcome = run_node(ipv4_target(replicas), 30)
    assert outcome["failures"] == []
    assert sum(outcome["served"].values()) == 30 and "r0" not in outcome["served"]
    assert replicas[0].calls > 0  # it was picked, refused, and the retry went elsewhere


def test_node_ignores_health_checking(replicas: list[Replica]) -> None:
    from ..client.test_balancing import NOT_SERVING

    replicas[1].set_health(NOT_SERVING)
    outcome = run_node(ipv4_target(replicas), 30)
    # What docs/deploy.md tells Node users; if this fails, grpc-js has learnt healthCheckConfig
    # and the Node row of docs/deploy.md's table should say so.
    assert outcome["served"].get("r1", 0) > 0, outcome
