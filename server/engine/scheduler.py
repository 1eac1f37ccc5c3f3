"""The scheduler: who joins the running batch this step, and which prompt tokens are fed.

Admission (FIFO, by memory). The queue's head is admitted while the running batch's model rows
stay within ``max_batch_size`` (lowered for a while after an out-of-memory) and its reserved KV
tokens within the KV budget (``max_batch_tokens``): each request reserves
``rows x (prompt + max_new_tokens)``, what its rows can ever hold, so an admitted request
never has to be preempted for memory. Nobody overtakes the head (no starvation); a head that
alone exceeds the budget still runs, alone, when nothing else does.

Prefill (chunked, FIFO). Each step feeds at most ``max_prefill_tokens`` prompt tokens: admitted
prompts are taken in arrival order, whole when they fit (those of one sub-batch key share one
left-padded forward), else in chunks of what is left of the budget, continued in later steps.
Decoding rows step every iteration regardless, so running streams keep flowing while a long
prompt loads. A chunk is fed only when its forward lies in its prompt's quirk partition (see
``plan_prefill``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .handle import Job
from .running import Prefill, SubBatchKey


@dataclass(frozen=True)
class PrefillPlan:
    """One step's prompt work: whole prompts by key, and chunks (prefill, tokens)."""

    whole: dict[SubBatchKey, list[Prefill]]
    chunks: list[tuple[Prefill, int]]


class Scheduler:
    """The FIFO queue and the two budgets; callers hold the batcher's lock."""

    def __init__(self, max_batch_size: int, kv_budget: int, prefill_budget: int) -> None:
        self.queue: list[Job] = []
        self.max_batch_size = max_batch_size
        self.kv_budget = kv_budget
        self.prefill_budget = prefill_budget
        # Lowered after an out-of-memory step (see Batcher._recover_from_oom).
        self.row_cap = max_batch_size

    def admit(self, rows: int, kv_tokens: int) -> list[Job]:
        """Pop the queued requests that fit next to ``rows`` / ``kv_tokens`` already running."""
        admitted: list[Job] = []
        cap = min(self.row_cap, self.max_batch_size)
        while self.queue:
            prepared = self.queue[0].prepared
            need_rows, need_kv = prepared.model_rows, prepared.padded_tokens
            if (rows or admitted) and (
                rows + need_rows > cap or kv_tokens + need_kv > self.kv_budget
            ):
                break
            admitted.append(self.queue.pop(0))
            rows += need_rows
            kv_tokens += need_kv
        return admitted

    def plan_prefill(
        self, pending: list[Prefill], partition: Callable[[int], Hashable]
    ) -> PrefillPlan:
        """``partition``: the quirk partition of a length. A chunk is fed only when the
        forward it makes lies in its prompt's partition (a LongRoPE prompt past the switch is
        never chunked: its first chunks would get the short factors); otherwise the rest of
        the prompt goes at once, over the budget."""
        whole: dict[SubBatchKey, list[Prefill]] = {}
        chunks: list[tuple[Prefill, int]] = []
        left = self.prefill_budget
        for prefill in pending:
            if left <= 0:
                break
            take = min(prefill.remaining, left)
            if take < prefill.remaining and partition(prefill.done + take) != prefill.key.partition:
                take = prefill.remaining
            left -= take
            if take == prefill.remaining and prefill.done == 0:
                whole.setdefault(prefill.key, []).append(prefill)
            else:
                chunks.append((prefill, take))
        return PrefillPlan(whole, chunks)
