"""Protobuf responses to the client's dataclasses; shared by both twins, pure, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any, cast

from google.protobuf.descriptor import FieldDescriptor
from peftserve.v1 import generation_pb2 as pb

from .types import (
    AdapterEvent,
    AdapterInfo,
    GenerationOutput,
    ModelInfo,
    SequenceDelta,
    SequenceOutput,
    ServerLimits,
    StreamEvent,
    StreamSummary,
    TokenizeOutput,
    TokenLogprob,
    TopLogprob,
)

__all__ = [
    "StreamAssembler",
    "adapter_event_from_pb",
    "adapter_from_pb",
    "adapters_from_pb",
    "effective_parameters_to_dict",
    "finish_reason_name",
    "generation_output_from_pb",
    "model_info_from_pb",
    "tokenize_output_from_pb",
]

_FINISH_REASON_PREFIX = "FINISH_REASON_"


def finish_reason_name(value: int) -> str:
    """``FINISH_REASON_STOP_SEQUENCE`` -> ``"stop_sequence"``; unknown numbers stay readable."""
    try:
        name = pb.FinishReason.Name(cast(pb.FinishReason.ValueType, value))
    except ValueError:
        # A newer server may send a reason this client's stubs do not know yet.
        return f"unknown_{value}"
    return name.removeprefix(_FINISH_REASON_PREFIX).lower()


def _float32(value: float) -> float:
    # Proto floats are 32-bit: 0.7 arrives as 0.699999988. Seven significant digits are what a
    # float32 really holds, and they give back the decimal the caller (or config) wrote.
    return float(f"{value:.7g}")


def _logprobs(messages: Iterable[pb.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            token_id=m.token_id,
            text=m.text,
            logprob=m.logprob,
            top_logprobs=tuple(
                TopLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob)
                for t in m.top_logprobs
            ),
        )
        for m in messages
    )


def _sequence(message: pb.Sequence) -> SequenceOutput:
    return SequenceOutput(
        index=message.index,
        text=message.text,
        token_ids=tuple(message.token_ids),
        finish_reason=finish_reason_name(message.finish_reason),
        logprobs=_logprobs(message.logprobs),
        beam_score=message.beam_score if message.HasField("beam_score") else None,
        incomplete=message.incomplete,
    )


def effective_parameters_to_dict(message: pb.EffectiveParameters) -> dict[str, Any]:
    """Every field by its proto name; sequence_bias becomes ``{text: bias}``."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.name == "sequence_bias":
            result[field.name] = {entry.text: _float32(entry.bias) for entry in value}
        elif field.is_repeated:
            result[field.name] = list(value)
        elif field.type == FieldDescriptor.TYPE_FLOAT:
            result[field.name] = _float32(value)
        else:
            result[field.name] = value
    return result


def _output(
    request_id: str,
    sequences: tuple[SequenceOutput, ...],
    usage: pb.Usage,
    provenance: pb.Provenance,
    timing: pb.Timing,
) -> GenerationOutput:
    return GenerationOutput(
        request_id=request_id,
        sequences=sequences,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        model_id=provenance.model_id,
        adapter=provenance.adapter,
        adapter_sha256=provenance.adapter_sha256,
        seed=provenance.seed,
        queue_wait_ms=timing.queue_wait_ms,
        inference_ms=timing.inference_ms,
        effective_parameters=effective_parameters_to_dict(provenance.effective_parameters),
        replica=provenance.replica,
    )


def generation_output_from_pb(message: pb.GenerateResponse) -> GenerationOutput:
    """Convert a Generate response."""
    sequences = tuple(sorted((_sequence(s) for s in message.sequences), key=lambda s: s.index))
    return _output(message.request_id, sequences, message.usage, message.provenance, message.timing)


class StreamAssembler:
    """Turns StreamGenerate messages into events, accumulating each sequence's deltas.

    The summary deliberately omits text, token ids and logprobs (the deltas carried them), so
    the final ``StreamSummary`` event gets them from here: a streamed result then equals what
    Generate would have returned.
    """

    def __init__(self) -> None:
        self._texts: dict[int, list[str]] = {}
        self._token_ids: dict[int, list[int]] = {}
        self._logprobs: dict[int, list[TokenLogprob]] = {}
        self.finished = False

    def feed(self, message: pb.StreamGenerateResponse) -> StreamEvent | None:
        """The event for one message; None for a message with no event set."""
        kind = message.WhichOneof("event")
        if kind == "delta":
            delta = message.delta
            logprobs = _logprobs(delta.logprobs)
            self._texts.setdefault(delta.index, []).append(delta.text)
            self._token_ids.setdefault(delta.index, []).extend(delta.token_ids)
            self._logprobs.setdefault(delta.index, []).extend(logprobs)
            return SequenceDelta(
                request_id=message.request_id,
                index=delta.index,
                text=delta.text,
                token_ids=tuple(delta.token_ids),
                logprobs=logprobs,
            )
        if kind == "summary":
            summary = message.summary
            sequences = tuple(
                sorted(
                    (
                        SequenceOutput(
                            index=s.index,
                            text="".join(self._texts.get(s.index, ())),
                            token_ids=tuple(self._token_ids.get(s.index, ())),
                            finish_reason=finish_reason_name(s.finish_reason),
                            logprobs=tuple(self._logprobs.get(s.index, ())),
                            beam_score=s.beam_score if s.HasField("beam_score") else None,
                            incomplete=s.incomplete,
                        )
                        for s in summary.sequences
                    ),
                    key=lambda s: s.index,
                )
            )
            self.finished = True
            return StreamSummary(
                _output(
                    message.request_id,
                    sequences,
                    summary.usage,
                    summary.provenance,
                    summary.timing,
                )
            )
        return None


def tokenize_output_from_pb(message: pb.TokenizeResponse) -> TokenizeOutput:
    """Convert a Tokenize response."""
    return TokenizeOutput(token_ids=tuple(message.token_ids), tokens=tuple(message.tokens))


def model_info_from_pb(message: pb.GetModelInfoResponse) -> ModelInfo:
    """Convert a GetModelInfo response."""
    limits = message.limits
    return ModelInfo(
        model_id=message.model_id,
        dtype=message.dtype,
        device=message.device,
        context_length=message.context_length,
        vocab_size=message.vocab_size,
        eos_token_id=message.eos_token_id if message.HasField("eos_token_id") else None,
        # Named from the dataclass, not the message: a limit added by a newer server is ignored
        # instead of breaking this client.
        limits=ServerLimits(**{f.name: getattr(limits, f.name) for f in fields(ServerLimits)}),
        chat_template=message.chat_template,
    )


def _enum_name(value: int, enum: Any, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return f"unknown({value})"


def adapter_from_pb(a: pb.Adapter) -> AdapterInfo:
    """Convert one Adapter message; an unset state (older server) reads as "ready"."""
    state = (
        "ready"
        if a.state == pb.ADAPTER_STATE_UNSPECIFIED
        else _enum_name(a.state, pb.AdapterState, "ADAPTER_STATE_")
    )
    return AdapterInfo(
        name=a.name,
        peft_type=a.peft_type,
        sha256=a.sha256,
        rank=a.rank if a.HasField("rank") else None,
        target_modules=tuple(a.target_modules),
        mixed_batching=a.mixed_batching,
        state=state,
        in_flight_requests=a.in_flight_requests,
        last_used=a.last_used_time.ToNanoseconds() / 1e9 if a.HasField("last_used_time") else None,
        pinned=a.pinned,
        path=a.path,
        error=a.error,
    )


def adapters_from_pb(message: pb.ListAdaptersResponse) -> tuple[AdapterInfo, ...]:
    """Convert a ListAdapters response."""
    return tuple(adapter_from_pb(a) for a in message.adapters)


def adapter_event_from_pb(message: pb.WatchAdaptersResponse) -> AdapterEvent:
    """Convert one WatchAdapters message."""
    return AdapterEvent(
        kind=_enum_name(message.kind, pb.AdapterEventKind, "ADAPTER_EVENT_KIND_"),
        adapter=adapter_from_pb(message.adapter) if message.HasField("adapter") else None,
    )
