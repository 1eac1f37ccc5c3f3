"""Request validation: pure checks that turn a request into a ``PreparedRequest`` or raise.

Every failure names the field path a client sees (``parameters.top_p``, ``options.top_logprobs``,
``text``). Nothing is silently changed: a value the engine cannot honour is rejected, never
clamped. Defined semantics worth knowing (also in ``docs/engine.md``):

* ``do_sample`` unset means the model's generation-config default (greedy for the demo model).
* Sampling parameters (temperature, top_p, top_k, min_p, typical_p) are rejected when the
  request does not sample: ``temperature=0`` is *not* a synonym for greedy.
* ``max_new_tokens`` and ``max_length`` are mutually exclusive; ``max_length`` counts prompt
  tokens (as in transformers) and becomes ``max_length - prompt_tokens`` new tokens.
  With neither, ``default_max_new_tokens`` applies, shortened to fit the context window.
* ``top_logprobs > 0`` requires ``return_logprobs``; logprobs are not available with beams.
* Beam sampling (``do_sample`` with ``num_beams > 1``) is not supported.
* Chat input renders with the model's own template (``chat.py``); a constraint compiles
  (``structured.py``) within the server's size and time limits, and not with beams.
"""

from __future__ import annotations

import copy
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

from .errors import (
    AdapterNotFoundError,
    ChatTemplateMissingError,
    ContextLengthExceededError,
    FieldViolation,
    InvalidRequestError,
)
from .structured import CompiledConstraint
from .types import (
    AdapterInfo,
    ChatInput,
    Constraint,
    EffectiveParams,
    EngineLimits,
    GenerationRequest,
)


def _no_chat(chat: ChatInput) -> list[int]:
    raise ChatTemplateMissingError("chat")


def _no_constraints(constraint: Constraint) -> CompiledConstraint:
    raise InvalidRequestError.single(constraint.field, "constraints are not available here")


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
MAX_SEED = 2**63 - 1
# Numeric bounds that keep every score finite. Logits are divided by the temperature and by
# the repetition penalty and shifted by sequence biases, in float32 (max ~3.4e38): beyond these
# bounds a score overflows to inf, the softmax turns it into NaN and sampling fails (found by
# fuzzing: temperature=1e-45, repetition_penalty=1e-38 with sampling, bias 3e38). Within them
# the product stays below ~1e30 for any realistic logit, and every value is far outside what
# changes a result in practice (temperature 1e-6 is already greedy).
MIN_TEMPERATURE = 1e-6
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
MAX_ABS_SEQUENCE_BIAS = 1e9
# transformers computes ``new_tokens ** length_penalty`` in Python floats for every finished
# beam: 3e38 raised OverflowError. |10| keeps it finite up to any context length we could see.
MAX_ABS_LENGTH_PENALTY = 10.0
# Request ids travel into log lines, error details and responses: short and printable only.
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class ValidationContext:
    """What validation needs to know about the loaded model, without touching the model."""

    limits: EngineLimits
    context_length: int
    vocab_size: int
    # The model's own generation config: the defaults behind every ``None`` parameter.
    defaults: GenerationConfig
    encode: Callable[[str, bool], list[int]]  # (text, add_special_tokens) -> ids
    find_adapter: Callable[[str], AdapterInfo | None]
    adapter_names: Callable[[], list[str]]
    # Chat messages -> prompt ids with the model's own template (raises for a model without).
    render_chat: Callable[[ChatInput], list[int]] = _no_chat
    # The chat template's end-of-turn tokens: extra stop tokens for chat requests.
    end_of_turn_ids: tuple[int, ...] = ()
    # Constraint -> compiled grammar, within the size and time limits (blocks its thread).
    compile_constraint: Callable[[Constraint], CompiledConstraint] = _no_constraints


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request with everything resolved that scheduling and running need."""

    request: GenerationRequest
    prompt_ids: tuple[int, ...]
    adapter: AdapterInfo | None  # None = base model
    effective: EffectiveParams
    # Model defaults + request overrides: builds the row's logits processors.
    generation_config: GenerationConfig
    # The compiled constraint; None: unconstrained. Each row takes its own matcher from it.
    constraint: CompiledConstraint | None = None
    # Tokens that end a row besides the model's EOS (a chat template's end of turn).
    extra_stop_ids: tuple[int, ...] = ()

    @property
    def beams(self) -> bool:
        return self.effective.num_beams > 1

    @property
    def model_rows(self) -> int:
        """Rows this request occupies in the model's batch."""
        e = self.effective
        return e.num_beams if e.num_beams > 1 else e.num_return_sequences

    @property
    def padded_tokens(self) -> int:
        return self.model_rows * (len(self.prompt_ids) + self.effective.max_new_tokens)


def check_bounds(request: GenerationRequest, limits: EngineLimits) -> None:
    """The checks that cost (almost) nothing: run before tokenizing, on any thread.

    A text longer than ``max_prompt_bytes`` cannot tokenize into ``max_prompt_tokens`` tokens,
    so it is refused without paying for tokenizing it (a 4 MiB text took seconds and hundreds
    of MB); likewise a ``token_ids`` list longer than the limit is refused before each id is
    read.
    """
    request_id = request.request_id
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError.single(
            "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters"
        )
    if not request_id.isprintable():
        # Newlines, ANSI escapes, NUL, U+2028 and bidi controls forge or hide log lines.
        raise InvalidRequestError.single(
            "request_id", "must not contain control, format or line-separator characters"
        )
    if request.text is not None:
        check_text_bytes(request.text, "text", limits.max_prompt_bytes)
    if request.chat is not None:
        # The rendered prompt holds every message's role and content, at least.
        spoken = "".join(m.role + m.content for m in request.chat.messages)
        check_text_bytes(spoken, "chat.messages", limits.max_prompt_bytes)
    if request.token_ids is not None and len(request.token_ids) > limits.max_prompt_tokens:
        raise InvalidRequestError.single(
            "token_ids",
            f"{len(request.token_ids)} prompt tokens exceed the limit of "
            f"{limits.max_prompt_tokens}",
        )


def check_text_bytes(text: str, field: str, max_bytes: int) -> None:
    """Refuse ``text`` beyond ``max_bytes`` UTF-8 bytes without encoding it when avoidable."""
    # A character is 1-4 bytes: only texts in between need counting.
    if len(text) > max_bytes or (
        len(text) * 4 > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes
    ):
        raise InvalidRequestError.single(
            field, f"longer than {max_bytes} bytes, more than the prompt limit could hold"
        )


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def check_parameters(
    request: GenerationRequest, do_sample: bool, limits: EngineLimits
) -> list[FieldViolation]:
    """Range and consistency checks that need no tokenizer or model."""
    p, o = request.parameters, request.options
    out: list[FieldViolation] = []

    def bad(name: str, description: str) -> None:
        out.append(FieldViolation(name, description))

    if p.max_new_tokens is not None:
        if p.max_new_tokens < 1:
            bad("parameters.max_new_tokens", "must be at least 1")
        elif p.max_new_tokens > limits.max_new_tokens:
            bad("parameters.max_new_tokens", f"must be at most {limits.max_new_tokens}")
    if p.max_length is not None:
        if p.max_new_tokens is not None:
            bad("parameters.max_length", "set either max_new_tokens or max_length, not both")
        elif p.max_length < 1:
            bad("parameters.max_length", "must be at least 1")
    if p.min_new_tokens is not None:
        if p.min_new_tokens < 0:
            bad("parameters.min_new_tokens", "must not be negative")
        elif p.max_new_tokens is not None and p.min_new_tokens > p.max_new_tokens:
            bad("parameters.min_new_tokens", "must not exceed max_new_tokens")
    if p.temperature is not None:
        if not _finite(p.temperature) or p.temperature < 0:
            bad("parameters.temperature", "must be a finite number >= 0")
        elif do_sample and p.temperature == 0:
            bad(
                "parameters.temperature",
                "must be > 0 when sampling; for greedy set do_sample=false",
            )
        elif do_sample and p.temperature < MIN_TEMPERATURE:
            bad(
                "parameters.temperature",
                f"must be >= {MIN_TEMPERATURE:g} when sampling (smaller overflows the scores); "
                "for greedy set do_sample=false",
            )
    if p.top_p is not None and not (_finite(p.top_p) and 0 < p.top_p <= 1):
        bad("parameters.top_p", "must be in (0, 1]")
    if p.top_k is not None and p.top_k < 0:
        bad("parameters.top_k", "must not be negative (0 disables top-k)")
    if p.min_p is not None and not (_finite(p.min_p) and 0 <= p.min_p <= 1):
        bad("parameters.min_p", "must be in [0, 1]")
    if p.typical_p is not None and not (_finite(p.typical_p) and 0 < p.typical_p <= 1):
        bad("parameters.typical_p", "must be in (0, 1]")
    if not do_sample:
        for name in SAMPLING_FIELDS:
            if getattr(p, name) is not None:
                bad(
                    f"parameters.{name}",
                    "only applies when sampling; set parameters.do_sample=true",
                )
    low, high = REPETITION_PENALTY_RANGE
    if p.repetition_penalty is not None and not (
        _finite(p.repetition_penalty) and low <= p.repetition_penalty <= high
    ):
        bad("parameters.repetition_penalty", f"must be in [{low:g}, {high:g}]")
    if p.no_repeat_ngram_size is not None and p.no_repeat_ngram_size < 0:
        bad("parameters.no_repeat_ngram_size", "must not be negative")
    if p.length_penalty is not None and not (
        _finite(p.length_penalty) and abs(p.length_penalty) <= MAX_ABS_LENGTH_PENALTY
    ):
        bad(
            "parameters.length_penalty",
            f"must be in [{-MAX_ABS_LENGTH_PENALTY:g}, {MAX_ABS_LENGTH_PENALTY:g}]",
        )
    if p.seed is not None and not 0 <= p.seed <= MAX_SEED:
        bad("parameters.seed", f"must be in [0, {MAX_SEED}]")
    num_beams = 1 if p.num_beams is None else p.num_beams
    nrs = 1 if p.num_return_sequences is None else p.num_return_sequences
    if num_beams < 1:
        bad("parameters.num_beams", "must be at least 1")
    if nrs < 1:
        bad("parameters.num_return_sequences", "must be at least 1")
    if num_beams >= 1 and nrs >= 1:
        if num_beams > 1 and do_sample:
            bad(
                "parameters.do_sample",
                "sampling with num_beams > 1 (beam sampling) is not supported",
            )
        if num_beams > 1 and nrs > num_beams:
            bad("parameters.num_return_sequences", "must not exceed num_beams")
        if num_beams == 1 and nrs > 1 and not do_sample:
            bad(
                "parameters.num_return_sequences",
                "greedy decoding returns one sequence; sample or use beams",
            )
        if num_beams * nrs > limits.max_beams_times_sequences:
            name = "parameters.num_beams" if num_beams > 1 else "parameters.num_return_sequences"
            most = limits.max_beams_times_sequences
            bad(name, f"num_beams * num_return_sequences must be at most {most}")
    if len(p.stop_sequences) > limits.max_stop_sequences:
        bad("parameters.stop_sequences", f"at most {limits.max_stop_sequences} stop sequences")
    for i, stop in enumerate(p.stop_sequences):
        if not stop:
            bad(f"parameters.stop_sequences[{i}]", "must not be empty")
        elif len(stop) > limits.max_stop_sequence_length:
            bad(
                f"parameters.stop_sequences[{i}]",
                f"longer than {limits.max_stop_sequence_length} characters",
            )
    for name, count in (("bad_words", len(p.bad_words)), ("sequence_bias", len(p.sequence_bias))):
        if count > limits.max_constraints:
            bad(f"parameters.{name}", f"at most {limits.max_constraints} entries")
    for i, word in enumerate(p.bad_words):
        if not word:
            bad(f"parameters.bad_words[{i}]", "must not be empty")
        elif len(word) > limits.max_constraint_length:
            bad(
                f"parameters.bad_words[{i}]",
                f"longer than {limits.max_constraint_length} characters",
            )
    for i, (text, bias) in enumerate(p.sequence_bias):
        if not text:
            bad(f"parameters.sequence_bias[{i}].text", "must not be empty")
        elif len(text) > limits.max_constraint_length:
            bad(
                f"parameters.sequence_bias[{i}].text",
                f"longer than {limits.max_constraint_length} characters",
            )
        if not (_finite(bias) and abs(bias) <= MAX_ABS_SEQUENCE_BIAS):
            bad(
                f"parameters.sequence_bias[{i}].bias",
                f"must be in [{-MAX_ABS_SEQUENCE_BIAS:g}, {MAX_ABS_SEQUENCE_BIAS:g}]",
            )
    if not 0 <= o.top_logprobs <= limits.max_top_logprobs:
        bad("options.top_logprobs", f"must be in [0, {limits.max_top_logprobs}]")
    elif o.top_logprobs > 0 and not o.return_logprobs:
        bad("options.top_logprobs", "requires options.return_logprobs=true")
    if o.return_logprobs and num_beams > 1:
        bad("options.return_logprobs", "not available with beam search (num_beams > 1)")
    return out


def _prompt_ids(request: GenerationRequest, ctx: ValidationContext) -> list[int]:
    inputs = sum(x is not None for x in (request.text, request.token_ids, request.chat))
    if inputs != 1:
        raise InvalidRequestError(
            [FieldViolation("text", "set exactly one of text, token_ids and chat")]
        )
    if request.chat is not None:
        return ctx.render_chat(request.chat)
    if request.text is not None:
        if not request.text:
            raise InvalidRequestError.single("text", "must not be empty")
        return ctx.encode(request.text, True)
    ids = list(request.token_ids or ())
    if not ids:
        raise InvalidRequestError.single("token_ids", "must not be empty")
    for i, tok in enumerate(ids):
        if not 0 <= tok < ctx.vocab_size:
            raise InvalidRequestError.single(
                f"token_ids[{i}]", f"token id {tok} is outside the vocabulary [0, {ctx.vocab_size})"
            )
    return ids


def _word_ids(ctx: ValidationContext, texts: Sequence[str], field: str) -> list[list[int]]:
    out = []
    for i, text in enumerate(texts):
        ids = ctx.encode(text, False)
        if not ids:
            raise InvalidRequestError.single(f"{field}[{i}]", "tokenizes to nothing")
        out.append(ids)
    return out


def prepare(request: GenerationRequest, ctx: ValidationContext) -> PreparedRequest:
    """Validate ``request`` and resolve every default; raise a typed error naming the field.

    Thread-safe (it tokenizes, so the server runs it off the event loop).
    """
    check_bounds(request, ctx.limits)
    adapter: AdapterInfo | None = None
    if request.adapter:
        adapter = ctx.find_adapter(request.adapter)
        if adapter is None:
            raise AdapterNotFoundError(request.adapter, ctx.adapter_names())
    p = request.parameters
    defaults = ctx.defaults
    do_sample = bool(defaults.do_sample) if p.do_sample is None else p.do_sample
    violations = check_parameters(request, do_sample, ctx.limits)
    if violations:
        raise InvalidRequestError(violations)

    if request.constraint is not None and (p.num_beams or 1) > 1:
        raise InvalidRequestError.single(
            "constraint", "not available with beam search (num_beams > 1)"
        )
    prompt = _prompt_ids(request, ctx)
    prompt_field = (
        "text" if request.text is not None else "chat" if request.chat is not None else "token_ids"
    )
    limits = ctx.limits
    if len(prompt) > limits.max_prompt_tokens:
        raise InvalidRequestError.single(
            prompt_field,
            f"{len(prompt)} prompt tokens exceed the limit of {limits.max_prompt_tokens}",
        )
    room = ctx.context_length - len(prompt)
    if p.max_new_tokens is not None:
        max_new, length_field = p.max_new_tokens, "parameters.max_new_tokens"
    elif p.max_length is not None:
        max_new, length_field = p.max_length - len(prompt), "parameters.max_length"
        if max_new < 1:
            raise InvalidRequestError.single(
                length_field, f"must exceed the prompt's {len(prompt)} tokens (it counts them)"
            )
        if max_new > limits.max_new_tokens:
            raise InvalidRequestError.single(
                length_field, f"allows {max_new} new tokens; the limit is {limits.max_new_tokens}"
            )
    else:
        # A default, not a caller's value: shortening it to fit changes nothing they asked for.
        max_new, length_field = (
            min(limits.default_max_new_tokens, room),
            "parameters.max_new_tokens",
        )
        if max_new < 1:
            raise ContextLengthExceededError(
                [
                    FieldViolation(
                        prompt_field, f"the prompt fills the {ctx.context_length}-token context"
                    )
                ]
            )
    if max_new > room:
        raise ContextLengthExceededError(
            [
                FieldViolation(
                    length_field,
                    f"{len(prompt)} prompt tokens + {max_new} new tokens exceed the model's "
                    f"context length of {ctx.context_length}",
                )
            ]
        )
    if p.min_new_tokens is not None and p.min_new_tokens > max_new:
        raise InvalidRequestError.single(
            "parameters.min_new_tokens", f"must not exceed {max_new} new tokens"
        )

    overrides: dict[str, Any] = {
        name: getattr(p, name)
        for name in (
            "min_new_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "typical_p",
            "num_beams",
            "num_return_sequences",
            "length_penalty",
            "early_stopping",
            "repetition_penalty",
            "no_repeat_ngram_size",
        )
        if getattr(p, name) is not None
    }
    overrides.update(do_sample=do_sample, max_new_tokens=max_new, max_length=len(prompt) + max_new)
    config = copy.deepcopy(defaults)
    config.update(**overrides)
    if p.bad_words:
        config.bad_words_ids = _word_ids(ctx, p.bad_words, "parameters.bad_words")
    if p.sequence_bias:
        ids = _word_ids(ctx, [t for t, _ in p.sequence_bias], "parameters.sequence_bias")
        config.sequence_bias = [
            [seq, float(b)] for seq, (_, b) in zip(ids, p.sequence_bias, strict=True)
        ]
    # Same precedence as GenerationMixin._prepare_generation_config: set > model > global.
    config.update(**defaults._get_default_generation_params(), defaults_only=True)
    # Last: the most expensive check, and only for a request that is otherwise valid.
    compiled = ctx.compile_constraint(request.constraint) if request.constraint else None
    seed = p.seed if p.seed is not None else secrets.randbits(63)
    effective = EffectiveParams(
        max_new_tokens=max_new,
        min_new_tokens=int(config.min_new_tokens or 0),
        do_sample=do_sample,
        temperature=float(config.temperature),
        top_p=float(config.top_p),
        top_k=int(config.top_k or 0),
        min_p=float(config.min_p or 0.0),
        typical_p=float(config.typical_p),
        num_beams=int(config.num_beams),
        num_return_sequences=int(config.num_return_sequences),
        length_penalty=float(config.length_penalty),
        early_stopping=bool(config.early_stopping),
        repetition_penalty=float(config.repetition_penalty),
        no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
        seed=seed,
        stop_sequences=p.stop_sequences,
        bad_words=p.bad_words,
        sequence_bias=p.sequence_bias,
    )
    return PreparedRequest(
        request=request,
        prompt_ids=tuple(prompt),
        adapter=adapter,
        effective=effective,
        generation_config=config,
        constraint=compiled,
        extra_stop_ids=ctx.end_of_turn_ids if request.chat is not None else (),
    )
