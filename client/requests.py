"""Keyword arguments to protobuf requests: the one place both client twins build messages.

Pure functions, no I/O. Optional protobuf fields are set only when the caller gave a value,
because "unset" and "zero" mean different things in the contract (unset temperature is the
model's default; there is no "temperature 0" shortcut for greedy decoding).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from peftserve.v1 import generation_pb2 as pb

from .types import ChatMessage, ChatMessageLike

__all__ = [
    "GENERATION_PARAMETER_NAMES",
    "ROUTING_METADATA_KEY",
    "build_generate_request",
    "build_tokenize_request",
    "routing_metadata",
]

# Ray Serve routes a call to a replica that already holds the model named by this metadata key
# (its model multiplexing); peftserve's Ray deployment makes the adapter that model id. A plain
# server ignores it. Clients in other languages send it themselves: see docs/deploy.md.
ROUTING_METADATA_KEY = "multiplexed_model_id"

# The optional scalar fields of GenerationParameters, taken from the descriptor so a field added
# to the contract is noticed by the contract tests rather than silently unreachable.
GENERATION_PARAMETER_NAMES: tuple[str, ...] = tuple(
    field.name
    for field in pb.GenerationParameters.DESCRIPTOR.fields
    if field.has_presence and field.message_type is None
)


def build_generate_request(
    prompt: str | Sequence[int] | None = None,
    *,
    adapter: str = "",
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    num_beams: int | None = None,
    num_return_sequences: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    seed: int | None = None,
    stop_sequences: Iterable[str] = (),
    bad_words: Iterable[str] = (),
    sequence_bias: Mapping[str, float] | Iterable[tuple[str, float]] | None = None,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    include_special_tokens: bool = False,
    request_id: str = "",
    json_schema: str | Mapping[str, Any] | None = None,
    json_object: bool = False,
    regex: str | None = None,
    grammar: str | None = None,
    choice: Sequence[str] | None = None,
    messages: Sequence[ChatMessageLike] | None = None,
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
) -> pb.GenerateRequest:
    """Build a ``GenerateRequest`` for Generate and StreamGenerate.

    ``prompt`` is text (tokenized by the server) or token ids (used verbatim). A None keyword
    leaves its optional field unset so the server's default applies; 0 and False are sent.
    Range checks are the server's job: it reports every offending field at once, by path.
    Values protobuf itself cannot hold (a negative uint, a str for a float) raise ValueError
    or TypeError naming the field.

    Structured output: at most one of ``json_schema`` (a JSON Schema, as text or a dict),
    ``json_object=True`` (any JSON object), ``regex``, ``grammar`` (llguidance's Lark) and
    ``choice`` (a list of allowed outputs). Chat: ``messages`` (``ChatMessage`` or
    ``{"role", "content"}`` dicts) instead of ``prompt``, rendered by the server's own chat
    template; ``add_generation_prompt`` (None: the server's default, true) and
    ``continue_final_message``.
    """
    request = pb.GenerateRequest(request_id=request_id, adapter=adapter)
    _constrain(request, json_schema, json_object, regex, grammar, choice)
    if messages is not None:
        if prompt is not None:
            raise TypeError("give either a prompt or messages, not both")
        _chat(request, messages, add_generation_prompt, continue_final_message)
    elif add_generation_prompt is not None or continue_final_message:
        raise TypeError("add_generation_prompt and continue_final_message need messages")
    elif prompt is None:
        raise TypeError("a prompt (text or token ids) or messages is required")
    elif isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, bytes | bytearray):
        # bytes is a Sequence[int] too; accepting it as token ids would be a silent surprise.
        raise TypeError("prompt must be str or a sequence of token ids, not bytes")
    else:
        # Assigning an empty TokenIds still selects the oneof, so [] means "empty token input"
        # (which the server rejects by field) rather than "no input".
        request.token_ids.SetInParent()
        _assign(request.token_ids.ids.extend, list(prompt), "token_ids")

    given: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "min_new_tokens": min_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "typical_p": typical_p,
        "num_beams": num_beams,
        "num_return_sequences": num_return_sequences,
        "length_penalty": length_penalty,
        "early_stopping": early_stopping,
        "repetition_penalty": repetition_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "seed": seed,
    }
    parameters = request.parameters
    for name, value in given.items():
        if value is not None:
            _assign(lambda v, n=name: setattr(parameters, n, v), value, f"parameters.{name}")
    if isinstance(stop_sequences, str) or isinstance(bad_words, str):
        # A bare string would otherwise become one stop sequence per character.
        raise TypeError("stop_sequences and bad_words take a list of strings, not a string")
    parameters.stop_sequences.extend(stop_sequences)
    parameters.bad_words.extend(bad_words)
    if sequence_bias:
        pairs = sequence_bias.items() if isinstance(sequence_bias, Mapping) else sequence_bias
        for text, bias in pairs:
            _assign(
                lambda v, t=text: parameters.sequence_bias.add(text=t, bias=v),
                bias,
                "parameters.sequence_bias",
            )
    # Leave ``parameters`` unset when nothing was given: the message then says "all defaults"
    # in the contract's own words instead of an empty-but-present sub-message.
    if parameters.ByteSize() == 0:
        request.ClearField("parameters")

    options = request.options
    options.return_token_ids = return_token_ids
    options.return_logprobs = return_logprobs
    _assign(lambda v: setattr(options, "top_logprobs", v), top_logprobs, "options.top_logprobs")
    options.include_special_tokens = include_special_tokens
    if options.ByteSize() == 0:
        request.ClearField("options")
    return request


def _constrain(
    request: pb.GenerateRequest,
    json_schema: str | Mapping[str, Any] | None,
    json_object: bool,
    regex: str | None,
    grammar: str | None,
    choice: Sequence[str] | None,
) -> None:
    given = {
        "json_schema": json_schema is not None,
        "json_object": bool(json_object),
        "regex": regex is not None,
        "grammar": grammar is not None,
        "choice": choice is not None,
    }
    chosen = [name for name, present in given.items() if present]
    if len(chosen) > 1:
        raise TypeError(f"give at most one constraint, not {' and '.join(chosen)}")
    constraint = request.constraint
    if json_schema is not None:
        constraint.json_schema = (
            json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        )
    elif json_object:
        constraint.json_object.SetInParent()
    elif regex is not None:
        constraint.regex = regex
    elif grammar is not None:
        constraint.grammar = grammar
    elif choice is not None:
        if isinstance(choice, str):
            raise TypeError("choice takes a list of strings, not a string")
        constraint.choice.SetInParent()
        constraint.choice.choices.extend(choice)
    else:
        request.ClearField("constraint")


def _chat(
    request: pb.GenerateRequest,
    messages: Sequence[ChatMessageLike],
    add_generation_prompt: bool | None,
    continue_final_message: bool,
) -> None:
    chat = request.chat
    chat.SetInParent()
    for message in messages:
        if isinstance(message, ChatMessage):
            chat.messages.add(role=message.role, content=message.content)
        else:
            chat.messages.add(role=message["role"], content=message.get("content", ""))
    if add_generation_prompt is not None:
        chat.add_generation_prompt = add_generation_prompt
    chat.continue_final_message = continue_final_message


def build_tokenize_request(text: str, add_special_tokens: bool = True) -> pb.TokenizeRequest:
    """Build a ``TokenizeRequest``."""
    return pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)


def _assign(setter: Any, value: Any, field_path: str) -> None:
    # protobuf's own errors say "Value out of range" without saying which field; add the path.
    try:
        setter(value)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{field_path}: {error}") from error


def routing_metadata(adapter: str) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a call naming ``adapter`` to a replica holding it (none for the
    base model)."""
    return ((ROUTING_METADATA_KEY, adapter),) if adapter else ()
