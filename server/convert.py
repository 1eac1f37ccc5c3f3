"""Pure translations between protobuf messages and engine types, in both directions.

Only shape is handled here (presence, oneofs, enums); value checks live in the engine's
validation so that direct engine users get them too, with the same field paths.
"""

from __future__ import annotations

import math
import struct
import uuid
from typing import Any

from peftserve.v1 import generation_pb2 as pb

from .engine.errors import InvalidRequestError
from .engine.types import (
    AdapterEvent,
    AdapterEventKind,
    AdapterState,
    AdapterStatus,
    ChatInput,
    ChatMessage,
    Constraint,
    ConstraintKind,
    EffectiveParams,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    ResponseOptions,
    SequenceResult,
    TokenEvent,
    TokenizeResult,
    TokenLogprob,
)

_FINISH_REASONS: dict[FinishReason, pb.FinishReason.ValueType] = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE_EXCEEDED: pb.FINISH_REASON_DEADLINE_EXCEEDED,
    FinishReason.CONTEXT_LENGTH: pb.FINISH_REASON_CONTEXT_LENGTH,
    FinishReason.CONSTRAINT_INCOMPLETE: pb.FINISH_REASON_CONSTRAINT_INCOMPLETE,
    FinishReason.CONSTRAINT_DEAD_END: pb.FINISH_REASON_CONSTRAINT_DEAD_END,
}

_PARAMETER_FIELDS = pb.GenerationParameters.DESCRIPTOR.fields
# proto3 `optional` scalars, read from the descriptor so a new field cannot be forgotten here:
# copied only when present, so "unset" reaches the engine as None.
_OPTIONAL_PARAMS: tuple[Any, ...] = tuple(
    f.name for f in _PARAMETER_FIELDS if f.has_presence and f.message_type is None
)
# float32 on the wire; converted back to the decimal the client meant (0.9, not 0.8999999761).
_FLOAT_PARAMS = frozenset(f.name for f in _PARAMETER_FIELDS if f.type == f.TYPE_FLOAT)


def new_request_id() -> str:
    return uuid.uuid4().hex


def generation_request(message: pb.GenerateRequest, deadline: float | None) -> GenerationRequest:
    """GenerateRequest -> engine request. ``deadline`` is a ``time.monotonic()`` instant."""
    input_kind = message.WhichOneof("input")
    if input_kind is None:
        raise InvalidRequestError.single("input", "set exactly one of text, token_ids or chat")
    params = message.parameters
    values: dict[str, object] = {
        name: getattr(params, name) for name in _OPTIONAL_PARAMS if params.HasField(name)
    }
    for name in _FLOAT_PARAMS & values.keys():
        values[name] = _float32_to_python(float(values[name]))  # type: ignore[arg-type]
    bias_items = tuple((item.text, _float32_to_python(item.bias)) for item in params.sequence_bias)
    parameters = GenerationParams(
        **values,  # type: ignore[arg-type]
        stop_sequences=tuple(params.stop_sequences),
        bad_words=tuple(params.bad_words),
        sequence_bias=bias_items,
    )
    options = ResponseOptions(
        return_token_ids=message.options.return_token_ids,
        return_logprobs=message.options.return_logprobs,
        top_logprobs=message.options.top_logprobs,
        skip_special_tokens=not message.options.include_special_tokens,
    )
    return GenerationRequest(
        request_id=message.request_id or new_request_id(),
        text=message.text if input_kind == "text" else None,
        token_ids=tuple(message.token_ids.ids) if input_kind == "token_ids" else None,
        chat=_chat(message.chat) if input_kind == "chat" else None,
        adapter=message.adapter,
        parameters=parameters,
        options=options,
        deadline=deadline,
        constraint=_constraint(message.constraint) if message.HasField("constraint") else None,
    )


def _chat(chat: pb.ChatInput) -> ChatInput:
    return ChatInput(
        messages=tuple(ChatMessage(m.role, m.content) for m in chat.messages),
        add_generation_prompt=(
            chat.add_generation_prompt if chat.HasField("add_generation_prompt") else None
        ),
        continue_final_message=chat.continue_final_message,
    )


def _constraint(constraint: pb.Constraint) -> Constraint:
    kind = constraint.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError.single(
            "constraint", "set one of json_schema, json_object, regex, grammar or choice"
        )
    if kind == "choice":
        return Constraint(ConstraintKind.CHOICE, choices=tuple(constraint.choice.choices))
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    return Constraint(ConstraintKind(kind), text=getattr(constraint, kind))


def _float32_to_python(value: float) -> float:
    """The shortest decimal that maps to the same float32 (0.9f -> 0.9); NaN/inf unchanged."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if _as_float32(candidate) == _as_float32(value):
            return candidate
    return value


def _as_float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _logprobs(items: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=item.token_id,
            text=item.text,
            logprob=item.logprob,
            top_logprobs=[
                pb.TopLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in item.top
            ],
        )
        for item in items
    ]


def _sequence(seq: SequenceResult, options: ResponseOptions, with_content: bool) -> pb.Sequence:
    message = pb.Sequence(index=seq.index, finish_reason=_FINISH_REASONS[seq.finish_reason])
    if with_content:
        message.text = seq.text
        if options.return_token_ids:
            message.token_ids.extend(seq.token_ids)
        if options.return_logprobs:
            message.logprobs.extend(_logprobs(seq.logprobs))
    if seq.beam_score is not None:
        message.beam_score = seq.beam_score
    message.incomplete = seq.incomplete
    return message


def _effective(params: EffectiveParams) -> pb.EffectiveParameters:
    return pb.EffectiveParameters(
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        typical_p=params.typical_p,
        num_beams=params.num_beams,
        num_return_sequences=params.num_return_sequences,
        length_penalty=params.length_penalty,
        early_stopping=params.early_stopping,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        stop_sequences=list(params.stop_sequences),
        bad_words=list(params.bad_words),
        sequence_bias=[pb.SequenceBias(text=t, bias=b) for t, b in params.sequence_bias],
    )


def _provenance(result: GenerationResult) -> pb.Provenance:
    return pb.Provenance(
        model_id=result.model_id,
        adapter=result.adapter,
        adapter_sha256=result.adapter_sha256,
        seed=result.effective.seed,
        effective_parameters=_effective(result.effective),
    )


def _usage(result: GenerationResult) -> pb.Usage:
    return pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)


def _timing(result: GenerationResult) -> pb.Timing:
    return pb.Timing(queue_wait_ms=result.queue_wait_ms, inference_ms=result.inference_ms)


def generate_response(result: GenerationResult, options: ResponseOptions) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=result.request_id,
        sequences=[_sequence(s, options, with_content=True) for s in result.sequences],
        usage=_usage(result),
        provenance=_provenance(result),
        timing=_timing(result),
    )


def stream_delta(
    request_id: str, event: TokenEvent, options: ResponseOptions
) -> pb.StreamGenerateResponse:
    delta = pb.SequenceDelta(index=event.sequence_index, text=event.text_delta)
    if options.return_token_ids:
        delta.token_ids.extend(event.token_ids)
    if options.return_logprobs:
        delta.logprobs.extend(_logprobs(event.logprobs))
    return pb.StreamGenerateResponse(request_id=request_id, delta=delta)


def stream_deltas(
    request_id: str, events: list[TokenEvent], options: ResponseOptions
) -> list[pb.StreamGenerateResponse]:
    """Events that arrived together -> one message per sequence, contents concatenated."""
    merged: dict[int, TokenEvent] = {}
    for event in events:
        previous = merged.get(event.sequence_index)
        if previous is None:
            merged[event.sequence_index] = event
        else:
            merged[event.sequence_index] = TokenEvent(
                sequence_index=event.sequence_index,
                token_ids=previous.token_ids + event.token_ids,
                text_delta=previous.text_delta + event.text_delta,
                logprobs=previous.logprobs + event.logprobs,
            )
    return [stream_delta(request_id, event, options) for event in merged.values()]


def stream_summary(result: GenerationResult, options: ResponseOptions) -> pb.StreamGenerateResponse:
    summary = pb.StreamSummary(
        sequences=[_sequence(s, options, with_content=False) for s in result.sequences],
        usage=_usage(result),
        provenance=_provenance(result),
        timing=_timing(result),
    )
    return pb.StreamGenerateResponse(request_id=result.request_id, summary=summary)


def tokenize_response(result: TokenizeResult) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(token_ids=list(result.token_ids), tokens=list(result.tokens))


def model_info_response(info: ModelInfo) -> pb.GetModelInfoResponse:
    limits = info.limits
    response = pb.GetModelInfoResponse(
        model_id=info.model_id,
        dtype=info.dtype,
        device=info.device,
        context_length=info.context_length,
        vocab_size=info.vocab_size,
        limits=pb.ServerLimits(
            max_batch_size=limits.max_batch_size,
            max_batch_tokens=limits.max_batch_tokens,
            max_queue_size=limits.max_queue_size,
            max_prompt_tokens=limits.max_prompt_tokens,
            max_new_tokens=limits.max_new_tokens,
            default_max_new_tokens=limits.default_max_new_tokens,
            max_beams_times_sequences=limits.max_beams_times_sequences,
            max_stop_sequences=limits.max_stop_sequences,
            max_stop_sequence_length=limits.max_stop_sequence_length,
            max_top_logprobs=limits.max_top_logprobs,
            max_constraint_text_length=limits.max_constraint_text_length,
            constraint_compile_timeout_ms=round(limits.constraint_compile_timeout_s * 1000),
            max_prefill_tokens=limits.max_prefill_tokens,
        ),
        chat_template=info.chat_template,
    )
    if info.eos_token_id is not None:
        response.eos_token_id = info.eos_token_id
    return response


_ADAPTER_STATES: dict[AdapterState, pb.AdapterState.ValueType] = {
    AdapterState.LOADING: pb.ADAPTER_STATE_LOADING,
    AdapterState.READY: pb.ADAPTER_STATE_READY,
    AdapterState.FAILED: pb.ADAPTER_STATE_FAILED,
    AdapterState.UNLOADING: pb.ADAPTER_STATE_UNLOADING,
}

_ADAPTER_EVENT_KINDS: dict[AdapterEventKind, pb.AdapterEventKind.ValueType] = {
    AdapterEventKind.CHANGED: pb.ADAPTER_EVENT_KIND_CHANGED,
    AdapterEventKind.REMOVED: pb.ADAPTER_EVENT_KIND_REMOVED,
}


def adapter_message(status: AdapterStatus) -> pb.Adapter:
    """One known adapter; type, rank, targets and sha256 only once it has been inspected."""
    message = pb.Adapter(
        name=status.name,
        state=_ADAPTER_STATES[status.state],
        in_flight_requests=status.in_flight,
        pinned=status.pinned,
        path=status.path,
        error=status.error,
    )
    info = status.info
    if info is not None:
        message.peft_type = info.peft_type
        message.sha256 = info.sha256
        message.target_modules.extend(info.target_modules)
        message.mixed_batching = info.mixed_batching
        if info.rank is not None:
            message.rank = info.rank
    if status.last_used is not None:
        message.last_used_time.FromNanoseconds(int(status.last_used * 1e9))
    return message


def adapters_response(adapters: list[AdapterStatus]) -> pb.ListAdaptersResponse:
    return pb.ListAdaptersResponse(
        adapters=[adapter_message(a) for a in sorted(adapters, key=lambda a: a.name)]
    )


def adapter_event(event: AdapterEvent) -> pb.WatchAdaptersResponse:
    return pb.WatchAdaptersResponse(
        kind=_ADAPTER_EVENT_KINDS[event.kind], adapter=adapter_message(event.status)
    )


def existing_adapter_event(status: AdapterStatus) -> pb.WatchAdaptersResponse:
    return pb.WatchAdaptersResponse(
        kind=pb.ADAPTER_EVENT_KIND_EXISTING, adapter=adapter_message(status)
    )
