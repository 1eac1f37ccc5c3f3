"""Every invalid request is refused with a typed error naming the offending field."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from peftserve.server.engine import Engine
from peftserve.server.engine.errors import (
    AdapterNotFoundError,
    ContextLengthExceededError,
    InvalidRequestError,
)
from peftserve.server.engine.types import GenerationParams, GenerationRequest, ResponseOptions

OK = GenerationRequest("ok", text="hello", parameters=GenerationParams(max_new_tokens=2))
S = {"do_sample": True}  # sampling parameters only apply when sampling

INVALID_PARAMETERS = [
    ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
    ({"max_new_tokens": 10**6}, "parameters.max_new_tokens"),
    ({"max_new_tokens": 4, "max_length": 30}, "parameters.max_length"),
    ({"max_new_tokens": None, "max_length": 3}, "parameters.max_length"),
    ({"min_new_tokens": -1}, "parameters.min_new_tokens"),
    ({"min_new_tokens": 5}, "parameters.min_new_tokens"),
    ({**S, "temperature": -0.1}, "parameters.temperature"),
    ({**S, "temperature": math.nan}, "parameters.temperature"),
    ({**S, "temperature": math.inf}, "parameters.temperature"),
    ({**S, "temperature": 0.0}, "parameters.temperature"),
    ({"temperature": 0.7}, "parameters.temperature"),
    ({"top_k": 5}, "parameters.top_k"),
    ({**S, "top_p": 0.0}, "parameters.top_p"),
    ({**S, "top_p": 1.5}, "parameters.top_p"),
    ({**S, "top_k": -1}, "parameters.top_k"),
    ({**S, "min_p": 1.5}, "parameters.min_p"),
    ({**S, "typical_p": 0.0}, "parameters.typical_p"),
    ({"repetition_penalty": 0.0}, "parameters.repetition_penalty"),
    ({"no_repeat_ngram_size": -2}, "parameters.no_repeat_ngram_size"),
    ({"num_beams": 0}, "parameters.num_beams"),
    ({"num_return_sequences": 0}, "parameters.num_return_sequences"),
    ({"num_return_sequences": 2}, "parameters.num_return_sequences"),
    ({"num_beams": 2, "num_return_sequences": 3}, "parameters.num_return_sequences"),
    ({"num_beams": 8, "num_return_sequences": 4}, "parameters.num_beams"),
    ({**S, "num_return_sequences": 17}, "parameters.num_return_sequences"),
    ({**S, "num_beams": 2}, "parameters.do_sample"),
    ({"seed": -1}, "parameters.seed"),
    ({"stop_sequences": ("a",) * 9}, "parameters.stop_sequences"),
    ({"stop_sequences": ("ok", "")}, "parameters.stop_sequences[1]"),
    ({"stop_sequences": ("x" * 129,)}, "parameters.stop_sequences[0]"),
    ({"bad_words": ("",)}, "parameters.bad_words[0]"),
    ({"sequence_bias": (("", 1.0),)}, "parameters.sequence_bias[0].text"),
    ({"sequence_bias": (("a", math.inf),)}, "parameters.sequence_bias[0].bias"),
    ({"length_penalty": math.nan}, "parameters.length_penalty"),
]


def fields(error: InvalidRequestError) -> set[str]:
    return {v.field for v in error.violations}


@pytest.mark.parametrize(
    ("changes", "field"), INVALID_PARAMETERS, ids=[f for _, f in INVALID_PARAMETERS]
)
def test_invalid_parameter_names_its_field(
    engine: Engine, changes: dict[str, object], field: str
) -> None:
    request = replace(OK, parameters=replace(OK.parameters, **changes))
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(request)
    assert field in fields(info.value), info.value.message
    assert engine.stats().queued == 0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (ResponseOptions(return_logprobs=True, top_logprobs=11), "options.top_logprobs"),
        (ResponseOptions(return_logprobs=True, top_logprobs=-1), "options.top_logprobs"),
        (ResponseOptions(top_logprobs=2), "options.top_logprobs"),
    ],
)
def test_invalid_options_name_their_field(
    engine: Engine, options: ResponseOptions, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(replace(OK, options=options))
    assert fields(info.value) == {field}


def test_logprobs_with_beams_are_refused(engine: Engine) -> None:
    request = replace(
        OK,
        parameters=replace(OK.parameters, num_beams=2),
        options=ResponseOptions(return_logprobs=True),
    )
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(request)
    assert fields(info.value) == {"options.return_logprobs"}


@pytest.mark.parametrize(
    ("text", "token_ids", "field"),
    [
        (None, None, "text"),
        ("hi", (5,), "text"),
        ("", None, "text"),
        (None, (), "token_ids"),
        (None, (5, 10**6), "token_ids[1]"),
        (None, (-1,), "token_ids[0]"),
    ],
)
def test_prompt_must_be_exactly_one_valid_form(
    engine: Engine, text: str | None, token_ids: tuple[int, ...] | None, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(replace(OK, text=text, token_ids=token_ids))
    assert fields(info.value) == {field}


def test_unknown_adapter_never_falls_back_to_base(engine: Engine) -> None:
    with pytest.raises(AdapterNotFoundError) as info:
        engine.submit(replace(OK, adapter="nope"))
    assert info.value.adapter == "nope"
    assert set(info.value.available) == {a.name for a in engine.adapters()}


def test_prompt_longer_than_limit(engine: Engine) -> None:
    too_long = "x" * (engine.info.limits.max_prompt_tokens + 1)
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(replace(OK, text=too_long))
    assert fields(info.value) == {"text"}


def test_prompt_plus_new_tokens_beyond_context(engine: Engine) -> None:
    context = engine.info.context_length
    prompt = "x" * (context - 10)  # + <s> and <sep> = context - 8 tokens
    with pytest.raises(ContextLengthExceededError) as info:
        engine.submit(replace(OK, text=prompt, parameters=GenerationParams(max_new_tokens=9)))
    assert fields(info.value) == {"parameters.max_new_tokens"}
    # max_length counts the prompt, as in transformers.
    with pytest.raises(ContextLengthExceededError) as info:
        engine.submit(replace(OK, text=prompt, parameters=GenerationParams(max_length=context + 1)))
    assert fields(info.value) == {"parameters.max_length"}


def test_several_violations_are_reported_together(engine: Engine) -> None:
    params = GenerationParams(do_sample=True, top_p=2.0, top_k=-1)
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(replace(OK, parameters=params))
    assert fields(info.value) == {"parameters.top_p", "parameters.top_k"}
