"""peftserve through Ray Serve's gRPC proxy, on a real local cluster with two replicas.

The tests run in file order: the last two take a replica away and then the application.
"""

from __future__ import annotations

import concurrent.futures
import time
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from peftserve.client import PeftServeClient
from peftserve.client.errors import PeftServeClientError
from peftserve.client.types import SequenceDelta, StreamSummary
from peftserve.v1 import generation_pb2 as pb

from ..conftest import ServerThread
from ..examples.test_node_client import _node_client_ready, run_client
from ..server.status_details import details_of
from .conftest import RayServe

PROMPT = "the quick brown fox"
ROUTE = "multiplexed_model_id"


def long_request(tokens: int, adapter: str = "") -> pb.GenerateRequest:
    # min_new_tokens keeps the row busy after the demo model would emit EOS.
    return pb.GenerateRequest(
        text=PROMPT,
        adapter=adapter,
        parameters=pb.GenerationParameters(max_new_tokens=tokens, min_new_tokens=tokens),
    )


def routed(adapter: str) -> tuple[tuple[str, str], ...]:
    return ((ROUTE, adapter),) if adapter else ()


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if not isinstance(result, pb.GenerateResponse | pb.LoadAdapterResponse):
            list(result)  # a stream fails when read
    return caught.value


def wait_until_idle(ray_serve: RayServe, adapter: str, replica: str) -> dict[str, Any]:
    """The stats of ``replica`` (reached through ``adapter``'s affinity) once it runs nothing."""
    end = time.monotonic() + 20
    stats: dict[str, Any] = {}
    while time.monotonic() < end:
        stats = ray_serve.engine_stats(adapter)
        if stats["replica"] == replica and stats["running"] == 0 and stats["queued"] == 0:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"replica {replica} still busy or unreachable: {stats}")


def affine_replica(client: PeftServeClient, adapter: str) -> str:
    """The replica that serves ``adapter`` once Ray's router knows who holds it.

    The first call loads the adapter on some replica; that replica reports it to the router
    asynchronously, so later calls converge on it. Five consecutive calls on one replica
    count as affinity; 40 calls without it fail the test.
    """
    seen: list[str] = []
    for _ in range(40):
        seen.append(client.generate(PROMPT, adapter=adapter, max_new_tokens=4).replica)
        if len(seen) >= 5 and len(set(seen[-5:])) == 1:
            return seen[-1]
        time.sleep(0.1)
    raise AssertionError(f"no affinity for {adapter}: replicas in order {seen}")


def test_unary_and_stream_agree_through_the_proxy(ray_serve: RayServe) -> None:
    with PeftServeClient(ray_serve.address, timeout_s=60) as client:
        for adapter, expected in (("", PROMPT), ("upper", PROMPT.upper())):
            unary = client.generate(PROMPT, adapter=adapter)
            assert unary.text == expected
            assert unary.adapter == adapter
            assert unary.replica  # Provenance.replica names the Ray replica
            events = list(client.stream_events(PROMPT, adapter=adapter))
            deltas = [e for e in events if isinstance(e, SequenceDelta)]
            assert len(deltas) > 1  # it really streamed
            assert "".join(e.text for e in deltas) == unary.text
            summary = events[-1]
            assert isinstance(summary, StreamSummary)
            assert summary.output.text == unary.text
            assert summary.output.replica
        info = client.model_info()
        assert info.context_length == 512
        assert client.tokenize("ab").token_ids


def test_replica_metrics_reach_rays_metrics_endpoint(ray_serve: RayServe) -> None:
    """One endpoint per node (no port per replica), each series tagged with its replica."""
    with PeftServeClient(ray_serve.address, timeout_s=60) as client:
        client.generate(PROMPT, max_new_tokens=4)
    url = f"http://127.0.0.1:{ray_serve.metrics_port}/metrics"
    end = time.monotonic() + 60  # Ray exports recorded values every few seconds
    while True:
        with urllib.request.urlopen(url, timeout=10) as reply:
            lines = reply.read().decode().splitlines()
        requests = [
            line
            for line in lines
            if line.startswith("ray_peftserve_requests") and 'method="Generate"' in line
        ]
        if requests or time.monotonic() > end:
            break
        time.sleep(1)
    assert requests, "no ray_peftserve_requests series for Generate"
    assert all('replica="' in line and 'status="OK"' in line for line in requests), requests
    assert any(line.startswith("ray_peftserve_engine_running_rows{") for line in lines)


def test_tokens_equal_the_plain_servers(ray_serve: RayServe, demo_server: ServerThread) -> None:
    requests: list[dict[str, Any]] = [
        {"adapter": "", "max_new_tokens": 24},
        {"adapter": "reverse", "max_new_tokens": 24},
        {"adapter": "title", "max_new_tokens": 24},
        {"adapter": "upper", "do_sample": True, "temperature": 1.3, "seed": 11},
    ]
    with (
        PeftServeClient(ray_serve.address, timeout_s=60) as through_ray,
        PeftServeClient(demo_server.address, timeout_s=60) as plain,
    ):
        for options in requests:
            ray_output = through_ray.generate(PROMPT, return_token_ids=True, **options)
            plain_output = plain.generate(PROMPT, return_token_ids=True, **options)
            assert ray_output.sequences[0].token_ids == plain_output.sequences[0].token_ids
            assert ray_output.text == plain_output.text
            assert ray_output.adapter_sha256 == plain_output.adapter_sha256
            assert plain_output.replica == ""  # a plain server does not report one


def test_error_statuses_keep_their_details_through_the_proxy(ray_stub: Any) -> None:
    for call in (ray_stub.Generate, ray_stub.StreamGenerate):
        missing = details_of(
            rpc_error(
                call,
                pb.GenerateRequest(text=PROMPT, adapter="no-such"),
                metadata=routed("no-such"),
                timeout=30,
            )
        )
        assert missing.code == grpc.StatusCode.NOT_FOUND
        assert missing.reason == "ADAPTER_NOT_FOUND"
        assert "adapter" in missing.field_violations

        invalid = details_of(
            rpc_error(
                call,
                pb.GenerateRequest(text=PROMPT, parameters=pb.GenerationParameters(top_p=3.0)),
                timeout=30,
            )
        )
        assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameters.top_p" in invalid.field_violations


def test_routing_metadata_must_match_the_adapter(ray_stub: Any) -> None:
    for call in (ray_stub.Generate, ray_stub.StreamGenerate):
        for adapter, route in (("upper", "title"), ("", "upper")):
            details = details_of(
                rpc_error(
                    call,
                    pb.GenerateRequest(text=PROMPT, adapter=adapter),
                    metadata=routed(route),
                    timeout=30,
                )
            )
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "adapter" in details.field_violations
    # No routing metadata at all is allowed: the call works, without affinity.
    response = ray_stub.Generate(pb.GenerateRequest(text=PROMPT, adapter="upper"), timeout=30)
    assert response.sequences[0].text == PROMPT.upper()


def test_health_reflection_and_the_per_replica_admin_rpcs(
    ray_channel: grpc.Channel, ray_stub: Any
) -> None:
    health = health_pb2_grpc.HealthStub(ray_channel)
    for service in ("", "peftserve.v1.GenerationService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # Watch is the proxy's own (no replica holds the stream): SERVING, then held open.
    for service, expected in (("", "SERVING"), ("nope", "SERVICE_UNKNOWN")):
        watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        status = next(watch).status
        assert health_pb2.HealthCheckResponse.ServingStatus.Name(status) == expected
        watch.cancel()

    reflection = reflection_pb2_grpc.ServerReflectionStub(ray_channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
    )
    services = {s.name for answer in answers for s in answer.list_services_response.service}
    assert "peftserve.v1.GenerationService" in services

    for call, request in (
        (ray_stub.UnloadAdapter, pb.UnloadAdapterRequest(name="upper")),
        (ray_stub.WatchAdapters, pb.WatchAdaptersRequest()),
    ):
        details = details_of(rpc_error(call, request, timeout=30))
        assert details.code == grpc.StatusCode.UNIMPLEMENTED
        assert details.reason == "NOT_AVAILABLE_ON_RAY_SERVE"
    for request, field in (
        (pb.LoadAdapterRequest(name="upper", path="title"), "path"),
        (pb.LoadAdapterRequest(name="upper", pinned=True), "pinned"),
    ):
        details = details_of(rpc_error(ray_stub.LoadAdapter, request, timeout=30))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in details.field_violations


def test_adapter_affinity_and_the_per_replica_budget(ray_serve: RayServe) -> None:
    adapter = "solo-affinity"  # named by no other test: one replica will hold it
    with PeftServeClient(ray_serve.address, timeout_s=60) as client:
        holder = affine_replica(client, adapter)
        output = client.generate(PROMPT, adapter=adapter)
        assert output.replica == holder and output.text == PROMPT.upper()
        # Ray's router asks the replica that holds the adapter; it has it loaded.
        stats = ray_serve.engine_stats(adapter)
        assert stats["replica"] == holder and adapter in stats["adapters"]
        # LoadAdapter goes through the same routing: idempotent on the holder.
        assert client.load_adapter(adapter).name == adapter
        for name in ("reverse", "title", "upper"):
            client.generate(PROMPT, adapter=name, max_new_tokens=4)
        # Four adapters used, two per replica at most: replicas evicted to stay in budget, and
        # an evicted adapter is withdrawn from what the replica reports to Ray's router.
        for name in ("reverse", "title", "upper", adapter):
            stats = ray_serve.engine_stats(name)
            assert len(stats["adapters"]) <= 2, stats
            assert set(stats["routed_adapters"]) <= set(stats["adapters"]), stats


def test_cancel_and_deadline_free_the_replicas_rows(ray_serve: RayServe, ray_stub: Any) -> None:
    adapter = "solo-cancel"
    with PeftServeClient(ray_serve.address, timeout_s=60) as client:
        replica = affine_replica(client, adapter)
    stream = ray_stub.StreamGenerate(long_request(480, adapter), metadata=routed(adapter))
    first = next(stream)
    assert first.WhichOneof("event") == "delta"
    busy = ray_serve.engine_stats(adapter)
    assert busy["replica"] == replica and busy["running"] == 1
    stream.cancel()
    wait_until_idle(ray_serve, adapter, replica)

    # The deadline the engine sees arrives as metadata (the proxy does not forward the real
    # one; proxy.py adds it): a shorter one sent by the caller ends the engine's request
    # while the call itself stays open.
    cut = ray_stub.Generate(
        long_request(480, adapter),
        metadata=(*routed(adapter), ("peftserve-timeout-ms", "300")),
        timeout=60,
    )
    assert cut.sequences[0].finish_reason == pb.FINISH_REASON_DEADLINE_EXCEEDED
    assert 0 < len(cut.sequences[0].text) < 480
    wait_until_idle(ray_serve, adapter, replica)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as expired:
        ray_stub.Generate(long_request(480, adapter), metadata=routed(adapter), timeout=0.5)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 30
    wait_until_idle(ray_serve, adapter, replica)


def test_node_client_through_the_proxy(ray_serve: RayServe) -> None:
    reason = _node_client_ready()
    if reason is not None:
        pytest.skip(reason)
    code, output = run_client(ray_serve.address, PROMPT, "upper")
    assert code == 0, output
    assert output["generate"]["sequences"][0]["text"] == PROMPT.upper()
    assert output["generate"]["provenance"]["replica"]
    assert output["stream"]["text"] == PROMPT.upper()
    code, failure = run_client(ray_serve.address, PROMPT, "no-such-adapter")
    assert code == 1 and failure["error"]["name"] == "NOT_FOUND"


def test_a_replica_killed_under_load_fails_calls_cleanly(ray_serve: RayServe) -> None:
    import ray

    with PeftServeClient(ray_serve.address, timeout_s=60) as client:
        victim = affine_replica(client, "solo-kill")

        def call(index: int) -> str:
            # Half of the calls name the victim's adapter, so some are in flight on it.
            adapter = "solo-kill" if index % 2 == 0 else ""
            try:
                if index % 4 < 2:
                    client.generate(PROMPT, adapter=adapter, max_new_tokens=400, min_new_tokens=400)
                else:
                    list(client.stream(PROMPT, adapter=adapter, max_new_tokens=400))
                return "OK"
            except PeftServeClientError as error:
                return error.code.name

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call, i) for i in range(8)]
            time.sleep(1.0)
            actor = ray.get_actor(f"SERVE_REPLICA::peftserve#PeftServe#{victim}", namespace="serve")
            ray.kill(actor, no_restart=True)
            # Nothing hangs: every call ends well inside its deadline.
            outcomes = [f.result(timeout=90) for f in futures]
        print("outcomes after the kill:", sorted(outcomes))
        # The client's retry policy resends a unary call that met the dead replica
        # (UNAVAILABLE); a stream that had started cannot be resent and fails UNAVAILABLE.
        assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
        # The survivor (and then the replacement Ray starts) keeps serving.
        end = time.monotonic() + 60
        while True:
            try:
                output = client.generate(PROMPT, adapter="solo-kill", max_new_tokens=8)
                break
            except PeftServeClientError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)
        assert output.replica != victim


def test_draining_finishes_in_flight_streams(ray_serve: RayServe, ray_stub: Any) -> None:
    from ray import serve

    stream = ray_stub.StreamGenerate(long_request(300), timeout=90)
    assert next(stream).WhichOneof("event") == "delta"
    serve.delete("peftserve", _blocking=False)
    messages = list(stream)
    assert messages[-1].WhichOneof("event") == "summary"
    assert messages[-1].summary.sequences[0].finish_reason == pb.FINISH_REASON_LENGTH
