"""Pure conversions: kwargs to GenerateRequest, responses to dataclasses, statuses to errors."""

from __future__ import annotations

import inspect
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from peftserve.client import GenerateOptions, PeftServeClientError, build_generate_request
from peftserve.client.requests import GENERATION_PARAMETER_NAMES
from peftserve.client.responses import (
    StreamAssembler,
    finish_reason_name,
    generation_output_from_pb,
)
from peftserve.client.types import SequenceDelta, StreamSummary
from peftserve.v1 import generation_pb2 as pb

# --- build_generate_request ------------------------------------------------------------------


def test_nothing_given_leaves_parameters_and_options_unset() -> None:
    request = build_generate_request("hello")
    assert request.WhichOneof("input") == "text"
    assert request.text == "hello"
    assert not request.HasField("parameters")
    assert not request.HasField("options")
    assert request.adapter == "" and request.request_id == ""


@pytest.mark.parametrize("name", GENERATION_PARAMETER_NAMES)
def test_each_parameter_set_to_zero_stays_set_and_alone(name: str) -> None:
    field = pb.GenerationParameters.DESCRIPTOR.fields_by_name[name]
    zero: Any = False if field.type == field.TYPE_BOOL else 0
    request = build_generate_request("x", **{name: zero})
    assert request.HasField("parameters")
    present = [f.name for f, _ in request.parameters.ListFields()]
    assert present == [name]


def test_none_means_unset_and_values_arrive_verbatim() -> None:
    request = build_generate_request(
        "x", temperature=None, top_p=0.5, seed=2**64 - 1, do_sample=True, top_k=None
    )
    parameters = request.parameters
    assert not parameters.HasField("temperature")
    assert not parameters.HasField("top_k")
    assert parameters.top_p == 0.5
    assert parameters.seed == 2**64 - 1
    assert parameters.do_sample is True


def test_every_contract_field_has_a_keyword_and_the_typed_dict_matches() -> None:
    keywords = {
        p.name
        for p in inspect.signature(build_generate_request).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    contract = (
        {f.name for f in pb.GenerationParameters.DESCRIPTOR.fields}
        | {f.name for f in pb.ResponseOptions.DESCRIPTOR.fields}
        | {f.name for f in pb.Constraint.DESCRIPTOR.fields}
        | {f.name for f in pb.ChatInput.DESCRIPTOR.fields}
        | {"adapter", "request_id"}
    )
    assert keywords == contract
    # The twins take **GenerateOptions; it must list exactly the same keywords.
    assert set(GenerateOptions.__annotations__) == keywords


def test_token_ids_input() -> None:
    request = build_generate_request([5, 0, 7], adapter="lora-a", request_id="r1")
    assert request.WhichOneof("input") == "token_ids"
    assert list(request.token_ids.ids) == [5, 0, 7]
    assert (request.adapter, request.request_id) == ("lora-a", "r1")
    # An empty list is still a token input (the server rejects it by field), not "no input".
    assert build_generate_request([]).WhichOneof("input") == "token_ids"


def test_sequence_bias_mapping_and_pairs_keep_order() -> None:
    from_mapping = build_generate_request("x", sequence_bias={"foo": -2.5, "bar": 1.0})
    from_pairs = build_generate_request("x", sequence_bias=[("foo", -2.5), ("bar", 1.0)])
    assert [(b.text, b.bias) for b in from_mapping.parameters.sequence_bias] == [
        ("foo", -2.5),
        ("bar", 1.0),
    ]
    assert from_mapping == from_pairs


def test_lists_and_response_options() -> None:
    request = build_generate_request(
        "x",
        stop_sequences=["\n\n", "END"],
        bad_words=("bad",),
        return_token_ids=True,
        return_logprobs=True,
        top_logprobs=3,
        include_special_tokens=True,
    )
    assert list(request.parameters.stop_sequences) == ["\n\n", "END"]
    assert list(request.parameters.bad_words) == ["bad"]
    assert request.options == pb.ResponseOptions(
        return_token_ids=True, return_logprobs=True, top_logprobs=3, include_special_tokens=True
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": -1}, ValueError, "parameters.seed"),
        ({"max_new_tokens": 2**32}, ValueError, "parameters.max_new_tokens"),
        ({"temperature": "hot"}, TypeError, "parameters.temperature"),
        ({"top_logprobs": -1}, ValueError, "options.top_logprobs"),
        ({"stop_sequences": "END"}, TypeError, "list of strings"),
    ],
)
def test_values_protobuf_cannot_hold_name_the_field(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build_generate_request("x", **kwargs)


def test_bytes_prompt_is_rejected() -> None:
    with pytest.raises(TypeError, match="bytes"):
        build_generate_request(b"hello")  # type: ignore[arg-type]


# --- responses -------------------------------------------------------------------------------


def test_finish_reason_names() -> None:
    assert finish_reason_name(pb.FINISH_REASON_LENGTH) == "length"
    assert finish_reason_name(pb.FINISH_REASON_EOS) == "eos"
    assert finish_reason_name(pb.FINISH_REASON_STOP_SEQUENCE) == "stop_sequence"
    assert finish_reason_name(pb.FINISH_REASON_DEADLINE_EXCEEDED) == "deadline_exceeded"
    assert finish_reason_name(99) == "unknown_99"


def _provenance() -> pb.Provenance:
    return pb.Provenance(
        model_id="demo",
        adapter="lora-a",
        adapter_sha256="ab" * 32,
        seed=2**63,
        effective_parameters=pb.EffectiveParameters(
            max_new_tokens=8,
            temperature=0.7,
            top_p=0.9,
            stop_sequences=["END"],
            sequence_bias=[pb.SequenceBias(text="foo", bias=-1.5)],
        ),
    )


def test_generation_output_from_pb() -> None:
    message = pb.GenerateResponse(
        request_id="r1",
        sequences=[
            pb.Sequence(index=1, text="b", finish_reason=pb.FINISH_REASON_EOS, beam_score=-0.5),
            pb.Sequence(
                index=0,
                text="a",
                token_ids=[3, 4],
                finish_reason=pb.FINISH_REASON_LENGTH,
                logprobs=[
                    pb.TokenLogprob(
                        token_id=3,
                        text="a",
                        logprob=-0.25,
                        top_logprobs=[pb.TopLogprob(token_id=9, text="z", logprob=-2.0)],
                    )
                ],
            ),
        ],
        usage=pb.Usage(prompt_tokens=5, completion_tokens=3),
        provenance=_provenance(),
        timing=pb.Timing(queue_wait_ms=1.5, inference_ms=20.0),
    )
    output = generation_output_from_pb(message)
    assert [s.index for s in output.sequences] == [0, 1]
    assert output.text == "a" and output.finish_reason == "length"
    first, second = output.sequences
    assert first.token_ids == (3, 4) and first.beam_score is None
    assert first.logprobs[0].top_logprobs[0].token_id == 9
    assert second.beam_score == -0.5
    assert (output.prompt_tokens, output.completion_tokens) == (5, 3)
    assert (output.model_id, output.adapter, output.seed) == ("demo", "lora-a", 2**63)
    assert (output.queue_wait_ms, output.inference_ms) == (1.5, 20.0)
    parameters = output.effective_parameters
    # float32 on the wire, but the caller sees the decimal they know.
    assert parameters["temperature"] == 0.7 and parameters["top_p"] == 0.9
    assert parameters["stop_sequences"] == ["END"]
    assert parameters["sequence_bias"] == {"foo": -1.5}
    assert set(parameters) == {f.name for f in pb.EffectiveParameters.DESCRIPTOR.fields}


def test_stream_assembler_rebuilds_the_unary_result() -> None:
    def delta(index: int, text: str, ids: list[int]) -> pb.StreamGenerateResponse:
        return pb.StreamGenerateResponse(
            request_id="r", delta=pb.SequenceDelta(index=index, text=text, token_ids=ids)
        )

    assembler = StreamAssembler()
    messages = [
        delta(0, "Hel", [1]),
        delta(1, "Bye", [7]),
        delta(0, "", [2]),  # bytes held back: an empty delta still carries its token
        delta(0, "lo", [3]),
        pb.StreamGenerateResponse(
            request_id="r",
            summary=pb.StreamSummary(
                sequences=[
                    pb.Sequence(index=0, finish_reason=pb.FINISH_REASON_STOP_SEQUENCE),
                    pb.Sequence(index=1, finish_reason=pb.FINISH_REASON_LENGTH),
                ],
                usage=pb.Usage(prompt_tokens=2, completion_tokens=4),
                provenance=_provenance(),
            ),
        ),
    ]
    events = [assembler.feed(m) for m in messages]
    assert all(isinstance(e, SequenceDelta) for e in events[:-1])
    summary = events[-1]
    assert isinstance(summary, StreamSummary) and assembler.finished
    output = summary.output
    assert [s.text for s in output.sequences] == ["Hello", "Bye"]
    assert output.sequences[0].token_ids == (1, 2, 3)
    assert output.sequences[0].finish_reason == "stop_sequence"
    assert output.request_id == "r" and output.completion_tokens == 4


# --- error conversion ------------------------------------------------------------------------


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _rich_status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    retry_delay = duration_pb2.Duration()
    retry_delay.FromMilliseconds(1500)
    return status_pb2.Status(
        code=code.value[0],
        message=message,
        details=[
            _pack(
                error_details_pb2.ErrorInfo(
                    reason="INVALID_PARAMETER",
                    domain="peftserve.v1",
                    metadata={"request_id": "req-7"},
                )
            ),
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="parameters.top_p", description="must be in (0, 1]"
                        ),
                        error_details_pb2.BadRequest.FieldViolation(
                            field="parameters.top_k", description="too large"
                        ),
                    ]
                )
            ),
            _pack(error_details_pb2.RetryInfo(retry_delay=retry_delay)),
            # A detail type the client does not know is ignored, not an error.
            _pack(error_details_pb2.DebugInfo(detail="ignored")),
        ],
    )


class FakeSyncCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a failed sync RPC raises: an RpcError that is also a finished Call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers

    def initial_metadata(self) -> Any:
        return ()

    # grpc.Call's remaining abstract methods; never used by the conversion.
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def _assert_rich(error: PeftServeClientError) -> None:
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "2 invalid fields"
    assert error.reason == "INVALID_PARAMETER"
    assert error.field_violations == [
        ("parameters.top_p", "must be in (0, 1]"),
        ("parameters.top_k", "too large"),
    ]
    assert error.field == "parameters.top_p"
    assert error.retry_after_s == pytest.approx(1.5)
    assert error.request_id == "req-7"
    assert str(error) == "INVALID_ARGUMENT: 2 invalid fields"


def test_error_from_sync_call_with_rich_status() -> None:
    status = _rich_status(grpc.StatusCode.INVALID_ARGUMENT, "2 invalid fields")
    trailers = (("grpc-status-details-bin", status.SerializeToString()),)
    call = FakeSyncCall(grpc.StatusCode.INVALID_ARGUMENT, "2 invalid fields", trailers)
    _assert_rich(PeftServeClientError.from_rpc_error(call))


def test_error_from_aio_error_with_rich_status() -> None:
    # AioRpcError is the real class grpc.aio raises; its accessors are synchronous.
    status = _rich_status(grpc.StatusCode.INVALID_ARGUMENT, "2 invalid fields")
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), trailers, "2 invalid fields"
    )
    _assert_rich(PeftServeClientError.from_rpc_error(error))


def test_error_without_details_and_with_a_mismatched_trailer() -> None:
    plain = FakeSyncCall(grpc.StatusCode.UNAVAILABLE, "connection refused", ())
    error = PeftServeClientError.from_rpc_error(plain)
    assert (error.code, error.message, error.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "connection refused",
        "",
    )
    assert error.field_violations == [] and error.retry_after_s is None
    # A trailer that contradicts the status line (a rewriting proxy) is dropped, not raised.
    stale = status_pb2.Status(code=code_pb2.NOT_FOUND, message="other")
    mismatched = FakeSyncCall(
        grpc.StatusCode.INTERNAL,
        "boom",
        (("grpc-status-details-bin", stale.SerializeToString()),),
    )
    error = PeftServeClientError.from_rpc_error(mismatched)
    assert (error.code, error.message) == (grpc.StatusCode.INTERNAL, "boom")


def test_bare_rpc_error_is_unknown() -> None:
    error = PeftServeClientError.from_rpc_error(grpc.RpcError("no call attached"))
    assert error.code is grpc.StatusCode.UNKNOWN
