"""Plain, immutable results of the client: what callers get instead of protobuf messages.

Frozen dataclasses with tuples rather than lists, so a result can be shared between threads
and tasks without anyone mutating it underneath the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

__all__ = [
    "AdapterEvent",
    "AdapterInfo",
    "ChatMessage",
    "ChatMessageLike",
    "GenerateOptions",
    "GenerationOutput",
    "ModelInfo",
    "SequenceDelta",
    "SequenceOutput",
    "ServerLimits",
    "StreamEvent",
    "StreamSummary",
    "TokenLogprob",
    "TokenizeOutput",
    "TopLogprob",
]


@dataclass(frozen=True)
class ChatMessage:
    """One chat message for ``messages=`` (a ``{"role": ..., "content": ...}`` dict works too)."""

    role: str
    content: str


ChatMessageLike = ChatMessage | Mapping[str, str]


class GenerateOptions(TypedDict, total=False):
    """The keyword arguments of ``generate``/``stream``: ``build_generate_request``'s keywords.

    An absent key (or None) leaves the optional protobuf field unset, so the server applies the
    model's default and reports it in ``GenerationOutput.effective_parameters``.
    """

    adapter: str
    max_new_tokens: int | None
    max_length: int | None
    min_new_tokens: int | None
    do_sample: bool | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    typical_p: float | None
    num_beams: int | None
    num_return_sequences: int | None
    length_penalty: float | None
    early_stopping: bool | None
    repetition_penalty: float | None
    no_repeat_ngram_size: int | None
    seed: int | None
    stop_sequences: tuple[str, ...] | list[str]
    bad_words: tuple[str, ...] | list[str]
    sequence_bias: Mapping[str, float] | None
    return_token_ids: bool
    return_logprobs: bool
    top_logprobs: int
    include_special_tokens: bool
    request_id: str
    json_schema: str | Mapping[str, Any] | None
    json_object: bool
    regex: str | None
    grammar: str | None
    choice: Sequence[str] | None
    messages: Sequence[ChatMessageLike] | None
    add_generation_prompt: bool | None
    continue_final_message: bool


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token, with the alternatives if requested."""

    token_id: int
    text: str
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class SequenceOutput:
    """One returned sequence.

    ``finish_reason`` is the lower-case enum name without its prefix: "length", "eos",
    "stop_sequence", "cancelled", "deadline_exceeded", "context_length",
    "constraint_incomplete", "constraint_dead_end" ("unspecified" never comes from a
    well-behaved server). ``incomplete``: the request had a constraint and this text does not
    satisfy it.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...]
    beam_score: float | None
    incomplete: bool = False


@dataclass(frozen=True)
class GenerationOutput:
    """The result of one generation, with usage, provenance and timing."""

    request_id: str
    sequences: tuple[SequenceOutput, ...]
    prompt_tokens: int
    completion_tokens: int
    model_id: str
    adapter: str
    adapter_sha256: str
    seed: int
    queue_wait_ms: float
    inference_ms: float
    # The parameters the request ran with after server defaults, keyed by proto field name.
    effective_parameters: Mapping[str, Any]
    # The replica of a scaled-out deployment that served it (Ray Serve); "" from a plain server.
    replica: str = ""

    @property
    def text(self) -> str:
        """The first sequence's text (the only one unless num_return_sequences > 1)."""
        return self.sequences[0].text if self.sequences else ""

    @property
    def finish_reason(self) -> str:
        """The first sequence's finish reason."""
        return self.sequences[0].finish_reason if self.sequences else ""


@dataclass(frozen=True)
class SequenceDelta:
    """Stream event: new text (and token ids/logprobs if requested) for sequence ``index``."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class StreamSummary:
    """Stream event, always the last: the whole result, texts assembled from the deltas."""

    output: GenerationOutput

    @property
    def request_id(self) -> str:
        return self.output.request_id


StreamEvent = SequenceDelta | StreamSummary


@dataclass(frozen=True)
class TokenizeOutput:
    """Token ids and the text of each token."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class ServerLimits:
    """Limits the server enforces before any model work (see the proto for each)."""

    max_batch_size: int
    max_batch_tokens: int
    max_queue_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_beams_times_sequences: int
    max_stop_sequences: int
    max_stop_sequence_length: int
    max_top_logprobs: int
    # Structured output limits (0 from servers without constraints).
    max_constraint_text_length: int = 0
    constraint_compile_timeout_ms: int = 0
    # Prompt tokens fed per decode step (longer prompts are chunked); 0 from older servers.
    max_prefill_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the server's limits."""

    model_id: str
    dtype: str
    device: str
    context_length: int
    vocab_size: int
    eos_token_id: int | None
    limits: ServerLimits
    # The model has a chat template, so ``messages=`` is accepted.
    chat_template: bool = False


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter that requests may name."""

    name: str
    peft_type: str
    sha256: str
    rank: int | None
    target_modules: tuple[str, ...]
    mixed_batching: bool
    # Lifecycle (servers before contract v1.1 send none of these: READY, unused, unpinned).
    # "loading", "ready", "failed" or "unloading".
    state: str = "ready"
    in_flight_requests: int = 0
    # Unix time (seconds) of the last request naming it; None when never used since loading.
    last_used: float | None = None
    pinned: bool = False
    # Directory relative to the server's adapters root.
    path: str = ""
    # Why loading failed (state "failed").
    error: str = ""


@dataclass(frozen=True)
class AdapterEvent:
    """One WatchAdapters message.

    ``kind``: "existing" (the initial set), "synced" (initial set complete; ``adapter`` is
    None), "changed" (appeared or changed state) or "removed" (unloaded or evicted).
    """

    kind: str
    adapter: AdapterInfo | None
