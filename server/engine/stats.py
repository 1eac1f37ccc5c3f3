"""What the engine reports about its load (``EngineStats``) and about each step (``StepStats``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, read by metrics and admission decisions."""

    queued: int  # requests admitted and waiting to run
    running: int  # requests admitted to the running batch (prefilling, decoding, beams)
    completed: int
    # Batch size a request ran at (most requests sharing its forward) -> requests that ran.
    batch_size_histogram: dict[int, int] = field(default_factory=dict)
    running_rows: int = 0  # model rows (sequences, beams) of the running requests
    # KV-cache tokens reserved by running requests, and the budget they are admitted against.
    kv_tokens_used: int = 0
    kv_tokens_budget: int = 0
    # Distinct adapter names ("" = base excluded) of running and of queued requests.
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()

    @property
    def kv_cache_utilization(self) -> float:
        """``kv_tokens_used`` as a fraction of the budget (0.0 with no budget)."""
        if self.kv_tokens_budget <= 0:
            return 0.0
        return min(1.0, self.kv_tokens_used / self.kv_tokens_budget)


@dataclass(frozen=True)
class StepStats:
    """One iteration of the decode loop, reported to step listeners (worker thread)."""

    prefill_tokens: int  # prompt tokens fed through the model in this step
    decode_tokens: int  # rows that were decoding before this step and got a token in it
    rows: int  # model rows that got a token in this step (decoding + newly prefilled)
    seconds: float  # wall time of the step


StepListener = Callable[[StepStats], None]
