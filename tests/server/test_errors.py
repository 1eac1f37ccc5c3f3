"""Every error path of the server: status code, message and google.rpc details."""

from __future__ import annotations

import math
import time
from typing import Any

import grpc
import pytest
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread
from .status_details import details_of

PROMPT = "the quick brown fox"


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, pb.GenerateResponse):
            list(result)
    return caught.value


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        (pb.GenerationParameters(temperature=-1.0, do_sample=True), "parameters.temperature"),
        (pb.GenerationParameters(temperature=math.nan, do_sample=True), "parameters.temperature"),
        (pb.GenerationParameters(top_p=0.0, do_sample=True), "parameters.top_p"),
        (pb.GenerationParameters(top_p=1.5, do_sample=True), "parameters.top_p"),
        (pb.GenerationParameters(repetition_penalty=0.0), "parameters.repetition_penalty"),
        (pb.GenerationParameters(max_new_tokens=0), "parameters.max_new_tokens"),
        (pb.GenerationParameters(max_new_tokens=10**6), "parameters.max_new_tokens"),
        (
            pb.GenerationParameters(num_beams=8, num_return_sequences=8),
            "parameters.num_beams",
        ),
        (pb.GenerationParameters(num_return_sequences=2), "parameters.num_return_sequences"),
        (pb.GenerationParameters(stop_sequences=["x" * 10_000]), "parameters.stop_sequences"),
        (pb.GenerationParameters(bad_words=[""]), "parameters.bad_words"),
        (pb.GenerationParameters(bad_words=["ab"] * 65), "parameters.bad_words"),
        (pb.GenerationParameters(bad_words=["a" * 129]), "parameters.bad_words"),
        (
            pb.GenerationParameters(sequence_bias=[pb.SequenceBias(text="a", bias=1.0)] * 65),
            "parameters.sequence_bias",
        ),
        (
            pb.GenerationParameters(sequence_bias=[pb.SequenceBias(text="a", bias=math.inf)]),
            "parameters.sequence_bias",
        ),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_parameter_names_the_field(
    stub: Any, parameters: pb.GenerationParameters, field: str, streaming: bool
) -> None:
    request = pb.GenerateRequest(text=PROMPT, parameters=parameters)
    call = stub.StreamGenerate if streaming else stub.Generate
    details = details_of(rpc_error(call, request, timeout=30))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any(name.startswith(field) for name in details.field_violations), details
    assert field.split(".")[-1] in details.message


def test_missing_input_is_invalid(stub: Any) -> None:
    details = details_of(rpc_error(stub.Generate, pb.GenerateRequest(), timeout=30))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in details.field_violations or "text" in details.field_violations


def test_out_of_vocabulary_token_id_is_invalid(stub: Any) -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6]))
    details = details_of(rpc_error(stub.Generate, request, timeout=30))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any(f.startswith("token_ids") for f in details.field_violations)


def test_prompt_beyond_context_is_invalid(stub: Any) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    request = pb.GenerateRequest(text="a" * (info.context_length + 10))
    details = details_of(rpc_error(stub.Generate, request, timeout=30))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.field_violations


def test_unknown_adapter_is_not_found_never_base(stub: Any) -> None:
    details = details_of(
        rpc_error(stub.Generate, pb.GenerateRequest(text=PROMPT, adapter="nope"), timeout=30)
    )
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.reason == "ADAPTER_NOT_FOUND"
    assert "adapter" in details.field_violations
    assert "upper" in details.message  # lists what is loaded


def test_empty_tokenize_text_is_invalid(stub: Any) -> None:
    details = details_of(rpc_error(stub.Tokenize, pb.TokenizeRequest(text=""), timeout=30))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "text" in details.field_violations


def test_deadline_too_short_is_deadline_exceeded(stub: Any) -> None:
    error = rpc_error(stub.Generate, pb.GenerateRequest(text=PROMPT), timeout=0.000_001)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def long_request(max_new_tokens: int = 480) -> pb.GenerateRequest:
    # min_new_tokens keeps the row busy even after the demo model would emit EOS.
    return pb.GenerateRequest(
        text=PROMPT,
        parameters=pb.GenerationParameters(
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens
        ),
    )


def blocking_request() -> pb.GenerateRequest:
    """A request that holds the only row of a ``max_batch_size=1`` server for seconds: a 4-beam
    search of 480 tokens (a plain 480-token row lasts ~0.6 s on the demo model now, which a
    test's checks can outlast)."""
    request = long_request()
    request.parameters.num_beams = 4
    return request


@pytest.fixture(scope="module")
def tight_server() -> Any:
    """One request at a time and a queue of one, so overload is easy to provoke."""
    server = ServerThread(max_batch_size=1, max_queue_size=1, max_wait_ms=0.0)
    server.wait_ready()
    yield server
    server.stop()


def wait_for_stats(server: ServerThread, *, queued: int, running: int) -> None:
    """Poll the engine until it holds exactly this many queued and running requests."""
    engine = server.server.engine()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = server.run_in_loop(engine.stats)
        if stats.queued == queued and stats.running == running:
            return
        time.sleep(0.01)
    raise AssertionError(f"engine never reached queued={queued} running={running}: {stats}")


def test_queue_full_is_resource_exhausted_with_retry_info(tight_server: ServerThread) -> None:
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        running = stub.Generate.future(long_request(), timeout=120)
        wait_for_stats(tight_server, queued=0, running=1)
        queued = stub.Generate.future(long_request(), timeout=120)
        wait_for_stats(tight_server, queued=1, running=1)
        started = time.perf_counter()
        details = details_of(rpc_error(stub.Generate, long_request(), timeout=30))
        rejection_ms = (time.perf_counter() - started) * 1000
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "QUEUE_FULL"
        assert details.retry_delay_s is not None and details.retry_delay_s > 0
        assert rejection_ms < 5000  # rejected up front, not after waiting for a slot
        assert running.result().sequences[0].finish_reason == pb.FINISH_REASON_LENGTH
        assert queued.result().sequences[0].finish_reason == pb.FINISH_REASON_LENGTH


def test_deadline_passing_while_queued_never_runs(tight_server: ServerThread) -> None:
    engine = tight_server.server.engine()
    batches_before = sum(tight_server.run_in_loop(engine.stats).batch_size_histogram.values())
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        running = stub.Generate.future(blocking_request(), timeout=120)
        wait_for_stats(tight_server, queued=0, running=1)
        error = rpc_error(stub.Generate, long_request(5), timeout=0.3)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        running.result()
    wait_for_stats(tight_server, queued=0, running=0)
    stats = tight_server.run_in_loop(engine.stats)
    # One batch of one ran (the long request); the expired one never reached the model.
    assert sum(stats.batch_size_histogram.values()) == batches_before + 1


def test_cancel_mid_stream_frees_the_row(tight_server: ServerThread) -> None:
    engine = tight_server.server.engine()
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stream = stub.StreamGenerate(long_request(400), timeout=60)
        first = next(stream)
        assert first.WhichOneof("event") == "delta"
        stream.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = tight_server.run_in_loop(engine.stats)
            if stats.running == 0 and stats.queued == 0:
                break
            time.sleep(0.05)
        assert stats.running == 0 and stats.queued == 0
        # The server keeps serving.
        assert stub.Generate(pb.GenerateRequest(text="ok"), timeout=30).sequences[0].text == "ok"


def test_unexpected_failure_is_internal_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ServerThread(engine_process=False)  # the fault is injected into the engine object
    server.wait_ready()
    try:
        engine = server.server.engine()

        def explode(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail")

        # Fault injection at the engine boundary: the servicer must not leak the exception.
        monkeypatch.setattr(engine, "submit_prepared", explode)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            details = details_of(
                rpc_error(
                    stub.Generate, pb.GenerateRequest(text=PROMPT, request_id="r-1"), timeout=30
                )
            )
        assert details.code == grpc.StatusCode.INTERNAL
        assert "secret" not in details.message and "Traceback" not in details.message
        assert "r-1" in details.message
    finally:
        server.stop()


def test_failed_load_is_unavailable(tmp_path: Any) -> None:
    server = ServerThread(model_path=tmp_path)  # an empty directory is no model
    try:
        with pytest.raises(RuntimeError):
            server.wait_ready()
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            details = details_of(
                rpc_error(stub.Generate, pb.GenerateRequest(text=PROMPT), timeout=30)
            )
        assert details.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_requests_while_loading_are_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from peftserve.server import app
    from peftserve.server.engine.engine import Engine

    release = threading.Event()

    def slow_engine(config: Any) -> Engine:
        # Hold the load (it runs in a worker thread) until the test has probed the server.
        release.wait(30)
        return Engine(config)

    monkeypatch.setattr(app, "Engine", slow_engine)
    server = ServerThread(engine_process=False)  # the in-process load is the one held
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            details = details_of(
                rpc_error(stub.Generate, pb.GenerateRequest(text=PROMPT), timeout=30)
            )
            assert details.code == grpc.StatusCode.UNAVAILABLE
            assert "loading" in details.message
            release.set()
            server.wait_ready()
            assert (
                stub.Generate(pb.GenerateRequest(text="ok"), timeout=30).sequences[0].text == "ok"
            )
    finally:
        release.set()
        server.stop()
