"""Client-side balancing over several canned replicas on 127.0.0.1: gRPC's own round_robin,
health-checked subchannels and retry policy, as configured by ``channel.service_config``.

Each replica answers with its own ``model_id``, so the response itself says who served it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from peftserve.client import (
    AsyncPeftServeClient,
    ChannelSettings,
    PeftServeClient,
    PeftServeClientError,
)
from peftserve.client.channel import SERVICE_NAME, channel_options, service_config
from peftserve.client.cli import main as cli_main
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Replica(pb_grpc.GenerationServiceServicer):
    """One canned replica: names itself in every response; can refuse calls as if draining."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.refuse = False  # answer UNAVAILABLE like a replica that just began draining
        self.calls = 0
        self.health = health.HealthServicer()
        self.set_health(SERVING)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_GenerationServiceServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.health.set(SERVICE_NAME, status)

    def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        self.calls += 1
        if self.refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return pb.GenerateResponse(
            sequences=[pb.Sequence(text=request.text, finish_reason=pb.FINISH_REASON_LENGTH)],
            provenance=pb.Provenance(model_id=self.name),
        )


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    started = [Replica(f"r{i}") for i in range(3)]
    yield started
    for replica in started:
        replica.server.stop(None)


def ipv4_target(replicas: list[Replica]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)


def served_by(client: PeftServeClient, calls: int) -> Counter[str]:
    return Counter(client.generate(f"p{i}").model_id for i in range(calls))


def wait_until_all_serve(client: PeftServeClient, names: set[str]) -> None:
    """round_robin adds each subchannel once connected and healthy: wait for all of them."""
    deadline = time.monotonic() + 10
    seen: set[str] = set()
    while seen != names:
        assert time.monotonic() < deadline, f"only {seen} of {names} answered"
        seen.add(client.generate("warm-up").model_id)


def test_the_service_config_is_what_the_docs_give() -> None:
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "peftserve.v1.GenerationService"}
    (method,) = config["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    options = dict(channel_options(ChannelSettings()))
    assert json.loads(options["grpc.service_config"]) == config
    # Without balancing or retries the channel gets no service config at all (gRPC defaults).
    assert "grpc.service_config" not in dict(
        channel_options(ChannelSettings(retries=False, balance=False))
    )
    with pytest.raises(ValueError, match="max_attempts"):
        service_config(max_attempts=6)


def test_round_robin_spreads_calls_evenly(replicas: list[Replica]) -> None:
    with PeftServeClient(ipv4_target(replicas), timeout_s=10) as client:
        wait_until_all_serve(client, {r.name for r in replicas})
        counts = served_by(client, 30)
    # round_robin cycles through the ready subchannels: 10 each, give or take the cycle start.
    assert set(counts) == {"r0", "r1", "r2"}
    assert all(9 <= n <= 11 for n in counts.values()), counts


def test_pick_first_pins_every_call_to_one_replica(replicas: list[Replica]) -> None:
    # The control: what a plain channel (no service config) does, and why balancing matters.
    settings = ChannelSettings(balance=False)
    with PeftServeClient(ipv4_target(replicas), timeout_s=10, settings=settings) as client:
        assert len(served_by(client, 12)) == 1


def test_a_not_serving_replica_gets_no_calls_until_serving_again(replicas: list[Replica]) -> None:
    with PeftServeClient(ipv4_target(replicas), timeout_s=10) as client:
        wait_until_all_serve(client, {"r0", "r1", "r2"})
        replicas[1].set_health(NOT_SERVING)
        # The health watch is a stream: the change arrives within moments, not per call.
        deadline = time.monotonic() + 10
        while "r1" in served_by(client, 6):
            assert time.monotonic() < deadline, "r1 still picked while NOT_SERVING"
        before = replicas[1].calls
        counts = served_by(client, 20)
        assert set(counts) == {"r0", "r2"} and replicas[1].calls == before
        replicas[1].set_health(SERVING)
        wait_until_all_serve(client, {"r0", "r1", "r2"})


def test_unavailable_is_retried_on_another_replica(replicas: list[Replica]) -> None:
    # r0 refuses while its health still says SERVING: the race at the start of a drain.
    replicas[0].refuse = True
    with PeftServeClient(ipv4_target(replicas), timeout_s=10) as client:
        wait_until_all_serve(client, {"r1", "r2"})
        refused_before = replicas[0].calls
        counts = served_by(client, 30)
    assert set(counts) <= {"r1", "r2"} and sum(counts.values()) == 30
    # r0 really was picked (and refused) along the way: the retries covered those calls.
    assert replicas[0].calls > refused_before


def test_without_retries_the_refusal_reaches_the_caller(replicas: list[Replica]) -> None:
    replicas[0].refuse = True
    target = f"127.0.0.1:{replicas[0].port}"
    settings = ChannelSettings(retries=False)
    with (
        PeftServeClient(target, timeout_s=10, settings=settings) as client,
        pytest.raises(PeftServeClientError, match="UNAVAILABLE"),
    ):
        client.generate("x")
    assert replicas[0].calls == 1


def test_async_twin_and_dns_target_balance_too(replicas: list[Replica]) -> None:
    async def scenario() -> Counter[str]:
        async with AsyncPeftServeClient(ipv4_target(replicas), timeout_s=10) as client:
            seen: set[str] = set()
            deadline = time.monotonic() + 10
            while len(seen) < 3 and time.monotonic() < deadline:
                seen.add((await client.generate("w")).model_id)
            outputs = await asyncio.gather(*(client.generate(f"p{i}") for i in range(30)))
            return Counter(o.model_id for o in outputs)

    counts = asyncio.run(scenario())
    assert set(counts) == {"r0", "r1", "r2"}, counts
    # The dns resolver scheme (a headless Service's name in a cluster) on one loopback replica.
    with PeftServeClient(f"dns:///localhost:{replicas[2].port}", timeout_s=10) as client:
        assert client.generate("x").model_id == "r2"


def test_cli_takes_the_address_after_the_command(
    replicas: list[Replica], capsys: pytest.CaptureFixture[str]
) -> None:
    target = ipv4_target(replicas)
    assert cli_main(["generate", "hello", "--address", target]) == 0
    assert capsys.readouterr().out == "hello\n"
    assert cli_main(["--address", target, "generate", "hi"]) == 0
    assert capsys.readouterr().out == "hi\n"
    assert cli_main(["generate", "hey", "--target", target]) == 0
    assert capsys.readouterr().out == "hey\n"
