"""Keyword arguments to protobuf requests: the one place both client twins build messages.

Pure functions, no I/O. Optional protobuf fields are set only when the caller gave a value,
because "unset" and "zero" mean different things in the contract (unset temperature is the
model's default; there is no "temperature 0" shortcut for greedy decoding).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from peftserve.v1 import generation_pb2 as pb

__all__ = [
    "GENERATION_PARAMETER_NAMES",
    "build_generate_request",
    "build_tokenize_request",
]

# The optional scalar fields of GenerationParameters, taken from the descriptor so a field added
# to the contract is noticed by the contract tests rather than silently unreachable.
GENERATION_PARAMETER_NAMES: tuple[str, ...] = tuple(
    field.name
    for field in pb.GenerationParameters.DESCRIPTOR.fields
    if field.has_presence and field.message_type is None
)


def build_generate_request(
    prompt: str | Sequence[int],
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
) -> pb.GenerateRequest:
    """Build a ``GenerateRequest`` for Generate and StreamGenerate.

    ``prompt`` is text (tokenized by the server) or token ids (used verbatim). A None keyword
    leaves its optional field unset so the server's default applies; 0 and False are sent.
    Range checks are the server's job: it reports every offending field at once, by path.
    Values protobuf itself cannot hold (a negative uint, a str for a float) raise ValueError
    or TypeError naming the field.
    """
    request = pb.GenerateRequest(request_id=request_id, adapter=adapter)
    if isinstance(prompt, str):
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


def build_tokenize_request(text: str, add_special_tokens: bool = True) -> pb.TokenizeRequest:
    """Build a ``TokenizeRequest``."""
    return pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)


def _assign(setter: Any, value: Any, field_path: str) -> None:
    # protobuf's own errors say "Value out of range" without saying which field; add the path.
    try:
        setter(value)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{field_path}: {error}") from error
