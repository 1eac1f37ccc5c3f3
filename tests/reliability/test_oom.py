"""Accelerator out-of-memory in a decode-loop step: retry while invisible, else a clear error.

A real OOM cannot be provoked on the CPU test machine, so the model forward of a step is made
to raise ``torch.OutOfMemoryError`` (fault injection at the model call); everything around it
is real.
"""

from __future__ import annotations

import weakref
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread
from ..server.status_details import details_of

PROMPTS = ["red fox", "lazy dog", "over the moon", "hello world"]


@pytest.fixture
def server() -> Any:
    server = ServerThread(max_wait_ms=100.0, engine_process=False)  # faults in the step
    server.wait_ready()
    yield server
    server.stop()


class _Activations:
    """Stands in for the tensors a failed attempt's frames hold."""


def _jobs(rows: Any) -> int:
    return len({id(row.job) for row in rows})


def test_oom_in_a_shared_step_is_retried_with_fewer_rows(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = server.server.engine()._batcher._step_model
    real_forward = step.forward
    sizes: list[int] = []
    failed_attempts: list[weakref.ref[_Activations]] = []
    alive_at_retry: list[bool] = []

    def forward_small_batches_only(key: Any, rows: Any, *args: Any) -> Any:
        sizes.append(_jobs(rows))
        # Memory of a failed attempt must be gone before a retry starts, or the retry would
        # run out of memory too (on CUDA, empty_cache cannot free what a traceback holds).
        alive_at_retry.extend(ref() is not None for ref in failed_attempts)
        if len(rows) > 1:
            activations = _Activations()
            failed_attempts.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(key, rows, *args)

    monkeypatch.setattr(step, "forward", forward_small_batches_only)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        futures = [
            stub.Generate.future(pb.GenerateRequest(text=p, adapter="upper"), timeout=60)
            for p in PROMPTS
        ]
        texts = [f.result().sequences[0].text for f in futures]
    assert max(sizes) > 1, "the requests should first have been batched together"
    assert texts == [p.upper() for p in PROMPTS]
    assert alive_at_retry and not any(alive_at_retry)


def test_oom_after_a_stream_started_fails_it_and_retries_its_unary_neighbour(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = server.server.engine()._batcher._step_model
    real_forward = step.forward
    sizes: list[int] = []

    def oom_at_third_shared_step(key: Any, rows: Any, *args: Any) -> Any:
        sizes.append(_jobs(rows))
        if sizes == [2, 2, 2]:  # the third shared step: tokens exist and have streamed
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(key, rows, *args)

    params = pb.GenerationParameters(max_new_tokens=20, min_new_tokens=20)
    request = pb.GenerateRequest(text="hello world", adapter="upper", parameters=params)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        expected = stub.Generate(request, timeout=60).sequences[0].text
        monkeypatch.setattr(step, "forward", oom_at_third_shared_step)
        stream = stub.StreamGenerate(request, timeout=60)
        unary = stub.Generate.future(request, timeout=60)
        deltas: list[str] = []
        with pytest.raises(grpc.RpcError) as caught:
            for message in stream:
                deltas.append(message.delta.text)
        details = details_of(caught.value)
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "OUT_OF_MEMORY"
        assert "".join(deltas), "the stream had started before the OOM"
        # Its unary neighbour saw nothing: it was retried alone and got the solo result.
        assert unary.result().sequences[0].text == expected
    # Both shared the steps until the OOM; after it only the unary request ran, alone.
    failed = sizes.index(2) + 2
    assert sizes[: failed + 1] == [2, 2, 2] and set(sizes[failed + 1 :]) == {1}


def test_oom_for_a_single_request_is_resource_exhausted(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = server.server.engine()._batcher._step_model

    def always_oom(*args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(step, "forward", always_oom)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb.GenerateRequest(text="hello"), timeout=30)
        details = details_of(caught.value)
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "OUT_OF_MEMORY"
        monkeypatch.undo()
        # The server keeps serving.
        assert (
            stub.Generate(pb.GenerateRequest(text="hello"), timeout=30).sequences[0].text == "hello"
        )
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
