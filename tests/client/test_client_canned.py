"""Both client twins and the CLI over real gRPC against a canned servicer on 127.0.0.1.

The servicer answers from fixed data (no model), so these tests pin what the client does with
the wire: deadlines, metadata, retries, stream assembly and cancellation, status details.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from peftserve.client import (
    AsyncPeftServeClient,
    PeftServeClient,
    PeftServeClientError,
    SequenceDelta,
    StreamSummary,
)
from peftserve.client.cli import main as cli_main
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc


def _abort_invalid(context: grpc.ServicerContext) -> None:
    bad_request = any_pb2.Any()
    bad_request.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="parameters.top_p", description="must be in (0, 1]"
                )
            ]
        )
    )
    status = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        message="invalid request",
        details=[bad_request],
    )
    context.abort_with_status(rpc_status.to_status(status))


class CannedServicer(pb_grpc.GenerationServiceServicer):
    """Echoes requests back; special adapters trigger errors, retries and endless streams."""

    def __init__(self) -> None:
        self.last_metadata: dict[str, str] = {}
        self.last_request: pb.GenerateRequest | None = None
        self.flaky_attempts = 0
        self.stream_cancelled = threading.Event()

    def _summary_parts(self, request: pb.GenerateRequest) -> dict[str, Any]:
        seed = request.parameters.seed if request.parameters.HasField("seed") else 42
        return {
            "usage": pb.Usage(prompt_tokens=len(request.text), completion_tokens=3),
            "provenance": pb.Provenance(model_id="canned", adapter=request.adapter, seed=seed),
            "timing": pb.Timing(queue_wait_ms=1.0, inference_ms=2.0),
        }

    def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        self.last_metadata = dict(context.invocation_metadata())  # type: ignore[arg-type]
        self.last_request = request
        if request.adapter == "bad":
            _abort_invalid(context)
        if request.adapter == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "adapter 'missing' is not loaded")
        if request.adapter == "flaky":
            self.flaky_attempts += 1
            if self.flaky_attempts == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "still loading")
        if request.adapter == "slow":
            time.sleep(2)
        sequence = pb.Sequence(
            index=0, text=f"echo:{request.text}", finish_reason=pb.FINISH_REASON_LENGTH
        )
        return pb.GenerateResponse(
            request_id=request.request_id or "server-made",
            sequences=[sequence],
            **self._summary_parts(request),
        )

    def StreamGenerate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamGenerateResponse]:
        rid = request.request_id or "server-made"
        if request.adapter == "endless":
            context.add_callback(self.stream_cancelled.set)
            while context.is_active():
                yield pb.StreamGenerateResponse(request_id=rid, delta=pb.SequenceDelta(text="x"))
                time.sleep(0.01)
            return
        for text in ("Hel", "", "lo"):
            yield pb.StreamGenerateResponse(
                request_id=rid, delta=pb.SequenceDelta(index=0, text=text)
            )
        if request.adapter == "bad":
            _abort_invalid(context)
        yield pb.StreamGenerateResponse(
            request_id=rid,
            summary=pb.StreamSummary(
                sequences=[pb.Sequence(index=0, finish_reason=pb.FINISH_REASON_EOS)],
                **self._summary_parts(request),
            ),
        )

    def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        tokens = list(request.text)
        ids = [ord(c) for c in tokens]
        if request.add_special_tokens:
            tokens, ids = ["<s>", *tokens], [1, *ids]
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

    def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model_id="canned",
            dtype="float32",
            device="cpu",
            context_length=256,
            vocab_size=300,
            limits=pb.ServerLimits(max_batch_size=4, default_max_new_tokens=16),
        )

    def ListAdapters(  # noqa: N802
        self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(
            adapters=[pb.Adapter(name="lora-a", peft_type="LORA", rank=8, sha256="ab" * 32)]
        )


@pytest.fixture(scope="module")
def canned() -> Iterator[tuple[str, CannedServicer]]:
    servicer = CannedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_sync_twin(canned: tuple[str, CannedServicer]) -> None:
    target, servicer = canned
    with PeftServeClient(target, timeout_s=10, token="s3cret") as client:
        output = client.generate("hi", seed=0, temperature=0.0, request_id="r1")
        assert output.text == "echo:hi" and output.request_id == "r1"
        assert output.seed == 0 and output.finish_reason == "length"
        assert servicer.last_request is not None
        assert servicer.last_request.parameters.HasField("temperature")
        assert servicer.last_metadata["authorization"] == "Bearer s3cret"

        assert list(client.stream("hi")) == ["Hel", "lo"]  # the empty delta is skipped
        events = list(client.stream_events("hi", request_id="r2"))
        assert isinstance(events[-1], StreamSummary)
        assert events[-1].output.text == "Hello" and events[-1].output.finish_reason == "eos"
        assert all(isinstance(e, SequenceDelta) and e.request_id == "r2" for e in events[:-1])

        assert client.tokenize("ab").token_ids == (1, 97, 98)
        assert client.tokenize("ab", add_special_tokens=False).tokens == ("a", "b")
        info = client.model_info()
        assert info.eos_token_id is None and info.limits.default_max_new_tokens == 16
        (adapter,) = client.list_adapters()
        assert (adapter.name, adapter.rank, adapter.mixed_batching) == ("lora-a", 8, False)


def test_sync_errors_deadline_and_retry(canned: tuple[str, CannedServicer]) -> None:
    target, servicer = canned
    with PeftServeClient(target, timeout_s=10) as client:
        with pytest.raises(PeftServeClientError) as caught:
            client.generate("hi", adapter="bad")
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.field_violations == [("parameters.top_p", "must be in (0, 1]")]
        # An error after some deltas still surfaces as the one exception type.
        with pytest.raises(PeftServeClientError, match="INVALID_ARGUMENT"):
            list(client.stream("hi", adapter="bad"))
        with pytest.raises(PeftServeClientError) as caught:
            client.generate("hi", adapter="slow", timeout_s=0.2)
        assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        # The service config retries UNAVAILABLE transparently.
        servicer.flaky_attempts = 0
        assert client.generate("hi", adapter="flaky").text == "echo:hi"
        assert servicer.flaky_attempts == 2


def test_breaking_out_of_a_stream_cancels_the_rpc(canned: tuple[str, CannedServicer]) -> None:
    target, servicer = canned
    servicer.stream_cancelled.clear()
    with PeftServeClient(target, timeout_s=10) as client:
        for count, _ in enumerate(client.stream("hi", adapter="endless")):
            if count == 3:
                break
    assert servicer.stream_cancelled.wait(5)


def test_async_twin(canned: tuple[str, CannedServicer]) -> None:
    target, servicer = canned

    async def scenario() -> None:
        async with AsyncPeftServeClient(target, timeout_s=10, token="t") as client:
            output = await client.generate([1, 2], seed=5)
            assert output.seed == 5 and output.model_id == "canned"
            assert servicer.last_metadata["authorization"] == "Bearer t"
            assert [d async for d in client.stream("hi")] == ["Hel", "lo"]
            events = [e async for e in client.stream_events("hi")]
            assert isinstance(events[-1], StreamSummary) and events[-1].output.text == "Hello"
            assert (await client.tokenize("a")).token_ids == (1, 97)
            assert (await client.model_info()).model_id == "canned"
            assert (await client.list_adapters())[0].peft_type == "LORA"
            with pytest.raises(PeftServeClientError) as caught:
                await client.generate("hi", adapter="missing")
            assert caught.value.code is grpc.StatusCode.NOT_FOUND
            with pytest.raises(PeftServeClientError) as caught:
                async for _ in client.stream("hi", adapter="bad"):
                    pass
            assert caught.value.field == "parameters.top_p"
            servicer.stream_cancelled.clear()
            count = 0
            async for _ in client.stream("hi", adapter="endless"):
                count += 1
                if count == 3:
                    break
        assert await asyncio.to_thread(servicer.stream_cancelled.wait, 5)

    asyncio.run(scenario())


def test_cli_against_canned_server(
    canned: tuple[str, CannedServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = canned
    base = ["--target", target, "--timeout", "10"]
    assert cli_main([*base, "generate", "hi", "--seed", "3", "--stop", "END"]) == 0
    assert capsys.readouterr().out == "echo:hi\n"
    assert cli_main([*base, "generate", "hi", "--stream"]) == 0
    assert capsys.readouterr().out == "Hello\n"
    assert cli_main([*base, "generate", "hi", "--json"]) == 0
    assert '"text": "echo:hi"' in capsys.readouterr().out
    assert cli_main([*base, "tokenize", "a", "--json"]) == 0
    assert '"token_ids"' in capsys.readouterr().out
    assert cli_main([*base, "adapters"]) == 0
    assert capsys.readouterr().out.startswith("lora-a\tLORA\trank=8")
    assert cli_main([*base, "info"]) == 0
    assert "model_id: canned" in capsys.readouterr().out

    assert cli_main([*base, "generate", "hi", "--adapter", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: invalid request\n")
    assert "parameters.top_p: must be in (0, 1]" in err
    assert cli_main([*base, "generate", "hi", "--adapter", "missing"]) == 2
    assert cli_main([*base, "generate", "hi", "--adapter", "slow", "--timeout", "0.2"]) == 1
    assert "error: DEADLINE_EXCEEDED" in capsys.readouterr().err
    assert cli_main([*base, "generate", "hi", "--seed", "-1"]) == 2
    assert "parameters.seed" in capsys.readouterr().err
