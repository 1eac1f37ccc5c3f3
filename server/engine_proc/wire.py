"""The messages between the front and the engine process: pickled tuples, one per send.

Front -> engine, in order:

* ``(CONFIG, EngineConfig)`` once, first;
* ``(SUBMIT, key, GenerationRequest, stream)``: a request the front admitted (``key`` is the
  front's own number for it);
* ``(CANCEL, key)``;
* ``(CALL, call_id, method, args)``: an ``Engine`` coroutine or function from ``CALLS``.

Engine -> front:

* ``(READY, ModelInfo, statuses, EngineStats, step_seconds)`` or ``(FAILED, message)`` once;
* ``(OUT, Output)``: everything that happened since the previous one, i.e. one message per
  model step (plus replies to calls), never one per row or token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine.stats import EngineStats, StepStats
from ..engine.types import AdapterEvent, GenerationResult, TokenEvent

CONFIG = "config"
SUBMIT = "submit"
CANCEL = "cancel"
CALL = "call"
READY = "ready"
FAILED = "failed"
OUT = "out"

# Engine methods the front may call through CALL (anything else is refused).
CALLS = frozenset(
    {"tokenize_async", "load_adapter", "unload_adapter", "adapter_statuses", "drain", "stop"}
)


@dataclass
class Output:
    """One engine-process message: a step's worth of outputs and the state the front mirrors.

    Applied by the front in field order: adapter changes before the replies that caused them,
    a stream's events before its outcome.
    """

    # The engine's state when the message was made.
    stats: EngineStats
    # Requests the engine counts against the queue (queued + being prepared) and how many
    # SUBMITs it had read by then: the front's admission check adds those sent since.
    waiting: int
    seen: int
    step_seconds: float
    adapter_events: list[AdapterEvent] = field(default_factory=list)
    # (adapter name -> (in_flight, last_used)) when any changed, else None.
    adapter_usage: dict[str, tuple[int, float | None]] | None = None
    events: list[tuple[int, TokenEvent]] = field(default_factory=list)
    outcomes: list[tuple[int, GenerationResult | BaseException]] = field(default_factory=list)
    replies: list[tuple[int, bool, Any]] = field(default_factory=list)
    steps: list[StepStats] = field(default_factory=list)
