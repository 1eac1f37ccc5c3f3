"""The engine's settings: one frozen dataclass; the server's config builds it from flags/env."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to load a model and schedule requests.

    Defaults here are the engine's; the server's ``ServerConfig`` repeats none of them.
    """

    model_path: Path
    # Each subdirectory holding an ``adapter_config.json`` is one adapter, named after it.
    adapters_dir: Path | None = None
    # Reported as ``model_id``; defaults to the model directory's name.
    model_id: str | None = None
    # "auto" picks "cuda" when available, else "cpu".
    device: str = "auto"
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    # The running batch. Most model rows (sequences, beams) decoding at once.
    max_batch_size: int = 32
    # KV-cache budget in tokens: each running request reserves rows x (prompt + max_new_tokens);
    # a request is admitted only while the running ones' reservations leave room for it.
    max_batch_tokens: int = 16384
    # Most prompt tokens fed to the model per step; longer prompts are prefilled in chunks.
    max_prefill_tokens: int = 512
    # When nothing runs, how long the first queued request waits for companions. 0: requests
    # join the running batch at every step anyway, so waiting only delays the first one (5 ms
    # of a one-client request's ~65 ms were this wait).
    max_wait_ms: float = 0.0
    # Requests waiting (not yet running) beyond this are rejected with QueueFullError.
    max_queue_size: int = 256
    # Per-request limits, checked before any model work. ``None`` = the model's context length.
    max_prompt_tokens: int | None = None
    # Longest prompt ``text`` in UTF-8 bytes, checked before tokenizing so that a huge text is
    # refused without the cost of tokenizing it. ``None`` = max_prompt_tokens x the longest
    # vocabulary entry in bytes: no text beyond that can tokenize into max_prompt_tokens tokens.
    max_prompt_bytes: int | None = None
    max_new_tokens: int | None = None
    # Applied when a request sets neither max_new_tokens nor max_length.
    default_max_new_tokens: int = 64
    max_beams_times_sequences: int = 16
    max_stop_sequences: int = 8
    max_stop_sequence_length: int = 128
    max_top_logprobs: int = 10
    # Per request: at most this many bad_words and this many sequence_bias entries, each at
    # most max_constraint_length characters (each entry becomes a logits-processor rule).
    max_constraints: int = 64
    max_constraint_length: int = 128
    # Structured output (GenerateRequest.constraint). Longest constraint text in characters
    # (JSON schema, regex, grammar, or all choices together); longer is INVALID_ARGUMENT.
    max_constraint_text_length: int = 65536
    # A compile slower than this fails its request with RESOURCE_EXHAUSTED (only that one).
    constraint_compile_timeout_s: float = 5.0
    # Compiled constraints kept, by grammar text (least recently used dropped), and the
    # threads that compile them (never the decode loop).
    constraint_cache_size: int = 256
    constraint_compile_threads: int = 2
    # Adapter lifecycle. Most adapters loaded at once (0 = unlimited); beyond it the least
    # recently used idle, unpinned adapter is evicted to make room.
    max_loaded_adapters: int = 0
    # Adapters (names of subdirectories of ``adapters_dir``) loaded at startup and never evicted.
    pinned_adapters: tuple[str, ...] = ()
    # Load a subdirectory of ``adapters_dir`` the first time a request names it. Off: a name
    # that is not loaded is NOT_FOUND, full stop.
    lazy_load_adapters: bool = False
    # Load the adapters of ``adapters_dir`` at startup (up to ``max_loaded_adapters``). Off:
    # only the pinned ones; the rest load on demand (with ``lazy_load_adapters``), as on a Ray
    # Serve replica, which keeps just the adapters its traffic names.
    preload_adapters: bool = True
    # Output a stream's caller has not taken yet, in tokens: beyond it the request is stopped
    # with SlowConsumerError and its buffered output freed (a stream nobody reads held ~2 MB).
    max_stream_buffered_tokens: int = 256
    # Adapter changes queued for one WatchAdapters caller; beyond it the watcher is dropped.
    max_watch_buffered_events: int = 256
