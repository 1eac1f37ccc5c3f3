"""Plain data types the engine takes and gives: requests, parameters, events, results.

They mirror the protobuf contract field for field (same names, same "unset" semantics) so that
validation errors can name the field path a client sees (``parameters.top_p``), yet nothing
here imports gRPC or protobuf.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from .errors import SlowConsumerError


class FinishReason(enum.Enum):
    """Why a returned sequence stopped growing."""

    LENGTH = "length"  # max_new_tokens / max_length reached
    EOS = "eos"  # the model produced its end-of-sequence token
    STOP_SEQUENCE = "stop_sequence"  # a requested stop sequence was produced (not included)
    CANCELLED = "cancelled"  # the caller cancelled the request
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the caller's deadline passed mid-generation
    CONTEXT_LENGTH = "context_length"  # the model's context window is full
    # A length limit ended a constrained row before its constraint was satisfied.
    CONSTRAINT_INCOMPLETE = "constraint_incomplete"
    # The constraint allowed no token that the row's other rules (bad words, min tokens) allow.
    CONSTRAINT_DEAD_END = "constraint_dead_end"


class ConstraintKind(enum.Enum):
    """Which kind of structural constraint a request carries (the contract's oneof)."""

    JSON_SCHEMA = "json_schema"  # JSON Schema text
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"  # a regular expression the whole output matches
    GRAMMAR = "grammar"  # llguidance's Lark dialect
    CHOICE = "choice"  # exactly one of a list of strings


@dataclass(frozen=True)
class Constraint:
    """A structural constraint on the output; ``text`` is empty for JSON_OBJECT and CHOICE."""

    kind: ConstraintKind
    text: str = ""
    choices: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        """The contract's field path of this constraint's value."""
        return f"constraint.{self.kind.value}"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatInput:
    """Messages rendered by the served model's own chat template (never one from a request)."""

    messages: tuple[ChatMessage, ...]
    # None means the default: True.
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False


@dataclass(frozen=True)
class GenerationParams:
    """Generation parameters; ``None`` means "use the model's generation config default".

    Names and meanings follow ``transformers.GenerationConfig``.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    num_beams: int | None = None
    num_return_sequences: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    # Text that must never appear in the output; tokenized without special tokens.
    bad_words: tuple[str, ...] = ()
    # (text, bias) pairs added to the logits of the token sequence that spells ``text``.
    sequence_bias: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ResponseOptions:
    """What to include in the response besides the text."""

    return_token_ids: bool = False
    # Log-probabilities of each generated token under the model's raw (unprocessed)
    # next-token distribution.
    return_logprobs: bool = False
    # How many most likely alternatives to report per position (0 = none).
    top_logprobs: int = 0
    # Drop special tokens (bos/eos/pad/...) from returned text.
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    """One caller's request. Exactly one of ``text``, ``token_ids`` and ``chat`` is set."""

    request_id: str
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    chat: ChatInput | None = None
    # "" means the base model without any adapter.
    adapter: str = ""
    parameters: GenerationParams = field(default_factory=GenerationParams)
    options: ResponseOptions = field(default_factory=ResponseOptions)
    # Absolute ``time.monotonic()`` instant after which the caller no longer wants an answer.
    deadline: float | None = None
    # None: the output is unconstrained.
    constraint: Constraint | None = None


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token plus the most likely alternatives."""

    token_id: int
    text: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """New tokens for one returned sequence, emitted as soon as they are decoded.

    ``text_delta`` never ends inside a UTF-8 character and never contains text at or after a
    stop sequence; concatenating a sequence's deltas gives its final ``text`` byte for byte.
    """

    sequence_index: int
    token_ids: tuple[int, ...]
    text_delta: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class SequenceResult:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()
    # Beam search score (length-penalised sum of log-probabilities); None without beams.
    beam_score: float | None = None
    # The request was constrained and this text does not satisfy its constraint.
    incomplete: bool = False


@dataclass(frozen=True)
class EffectiveParams:
    """The parameters a request actually ran with, after the model's defaults were applied."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    typical_p: float
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool
    repetition_penalty: float
    no_repeat_ngram_size: int
    seed: int
    stop_sequences: tuple[str, ...]
    bad_words: tuple[str, ...]
    sequence_bias: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class GenerationResult:
    """The final outcome of a request."""

    request_id: str
    sequences: tuple[SequenceResult, ...]
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    # sha256 over the adapter's weight file(s); "" for the base model.
    adapter_sha256: str
    effective: EffectiveParams
    model_id: str
    queue_wait_ms: float
    inference_ms: float
    # Number of requests in the batch this request ran in (for metrics/benchmarks).
    batch_size: int = 1


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    peft_type: str  # e.g. "LORA", "LOHA", "IA3"
    path: str
    sha256: str
    rank: int | None  # LoRA-style rank where the type has one
    target_modules: tuple[str, ...]
    # Whether rows of this adapter can share a batch with other adapters (peft adapter_names).
    mixed_batching: bool
    # The type group (one PeftModel) serving it: the PEFT type, or "<TYPE>:<name>" for an
    # adapter that needs a model of its own (see mixing.py).
    group: str = ""
    # Its requests batch together only when their prompts have the same length.
    same_prompt_length: bool = False
    # The mixing table's row and reason (see mixing.py), for logs and docs.
    mixing: str = ""


@dataclass(frozen=True)
class EngineLimits:
    """Limits the engine enforces before any model work."""

    max_batch_size: int  # model rows decoding at once
    max_batch_tokens: int  # KV-cache budget: rows x (prompt + max_new_tokens) per request
    max_queue_size: int
    max_prompt_tokens: int
    # Longest prompt text in UTF-8 bytes, checked before tokenizing (Tokenize's text too).
    max_prompt_bytes: int
    max_new_tokens: int
    # Applied when a request sets neither max_new_tokens nor max_length.
    default_max_new_tokens: int
    max_beams_times_sequences: int
    max_stop_sequences: int
    max_stop_sequence_length: int
    max_top_logprobs: int
    max_constraints: int
    max_constraint_length: int
    # Structured output: longest constraint text (characters) and the compile time limit.
    max_constraint_text_length: int = 0
    constraint_compile_timeout_s: float = 0.0
    # Prompt tokens fed per step (longer prompts are chunked); 0 = not reported.
    max_prefill_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_path: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # e.g. "cpu", "cuda:0"
    context_length: int
    vocab_size: int
    eos_token_id: int | None
    limits: EngineLimits
    # The model directory ships a chat template, so chat input is accepted.
    chat_template: bool = False


@dataclass(frozen=True)
class TokenizeResult:
    token_ids: tuple[int, ...]
    # The text each token stands for (byte-level pieces may be partial characters).
    tokens: tuple[str, ...]


class AdapterState(enum.Enum):
    """Where an adapter is in its lifecycle (mirrors the contract's ``AdapterState``)."""

    LOADING = "loading"  # being read/attached; requests naming it wait for READY
    READY = "ready"  # requests may name it
    FAILED = "failed"  # loading failed; ``AdapterStatus.error`` says why
    UNLOADING = "unloading"  # new requests get AdapterNotFoundError; admitted ones finish


@dataclass(frozen=True)
class AdapterStatus:
    """A snapshot of one known adapter: what it is (once known) and how it is used."""

    name: str
    state: AdapterState
    # The adapter's directory relative to the adapters root.
    path: str
    # Type, rank, targets and sha256; None until the directory has been inspected.
    info: AdapterInfo | None
    # Never evicted to make room for another adapter.
    pinned: bool
    # Admitted (queued or running) requests naming it that have not finished.
    in_flight: int
    # ``time.time()`` of the last request naming it; None when never used since loading.
    last_used: float | None
    # Why loading failed (FAILED only).
    error: str = ""


class AdapterEventKind(enum.Enum):
    """What an ``AdapterEvent`` reports."""

    CHANGED = "changed"  # appeared or changed state
    REMOVED = "removed"  # unloaded or evicted; the status is its last one


@dataclass(frozen=True)
class AdapterEvent:
    kind: AdapterEventKind
    status: AdapterStatus


@dataclass
class AdapterWatch:
    """One watcher's view: every adapter known when it started, then each change after that.

    ``events`` is the watcher's own bounded queue, fed on the event loop until the watch ends;
    a ``None`` in it means the engine is draining or stopping and no more changes will come,
    or (``dropped``) that the watcher fell too far behind: ``next_event`` then raises.
    """

    snapshot: tuple[AdapterStatus, ...]
    events: asyncio.Queue[AdapterEvent | None]
    dropped: bool = False

    async def next_event(self) -> AdapterEvent | None:
        """The next change; None once the watch is over; SlowConsumerError if dropped."""
        event = await self.events.get()
        if event is None and self.dropped:
            raise SlowConsumerError(
                "this watcher fell too far behind the adapter changes and was dropped; "
                "watch again for a fresh snapshot"
            )
        return event
