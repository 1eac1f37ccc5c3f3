"""The running batch: sub-batches of rows decoding together, each with its KV cache.

A ``SubBatch`` is what one forward decodes: rows left-padded to a common width, their
``DynamicCache`` (with ``kv_cache.SlotLayer``s for full attention), the 2-D attention mask
(1 = a real token), each row's next position and the token each row feeds next.
Its verbs, TGI-style:

* ``filter(keep)`` drops the rows that left (finished, cancelled, deadline passed, moved) at
  once (their slots filled with rows from the end, so the kept rows may change order) and the
  leading columns that are now padding in every row;
* ``merge(others)`` appends the rows of every sub-batch joining it in this step, in one merge
  (left-padding all to a common width);
* ``decode_inputs()`` / ``advance()`` are one decode step's inputs and bookkeeping.

Positions and masks follow ``generate`` exactly: a row's positions count its real tokens only
(``cumsum(mask) - 1``), padding columns are masked out, and with no padding at all no mask is
passed (``generate`` drops an all-ones mask too).

``RunningBatch`` holds the sub-batches by key (several cohorts per key when their caches cannot
be merged exactly) and ``Prefill`` is a request whose prompt is still being fed to the model.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from . import kv_cache
from .handle import Job
from .rows import Row


@dataclass(frozen=True)
class SubBatchKey:
    """Rows share a forward only when these agree (see docs/engine.md)."""

    group: str  # "base" (plain base model) or a PEFT type group, e.g. "LORA"
    adapter: str | None  # set for adapters that cannot be mixed: their rows run alone
    partition: Hashable = None  # the model family's quirk partition (e.g. LongRoPE side)


class SubBatch:
    """Rows that decode in one forward, with their left-padded KV cache."""

    def __init__(
        self,
        key: SubBatchKey,
        rows: list[Row],
        cache: DynamicCache,
        mask: torch.Tensor,
        pads: list[int],
        positions: torch.Tensor,
    ) -> None:
        self.key = key
        self.rows = rows
        self.cache = cache
        self.mask = mask  # (rows, width) long: 1 = real token in the cache
        self.pads = pads  # leading padding columns per row (host copy of the mask's zeros)
        self.positions = positions  # (rows,) long: position of each row's next token
        self.next_tokens: torch.Tensor | None = None  # (rows,) long, set by the sampler

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def jobs(self) -> list[Job]:
        return list(dict.fromkeys(row.job for row in self.rows))

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(input_ids, attention_mask or None, position_ids) of the next decode step."""
        assert self.next_tokens is not None, "a sub-batch decodes only after its first token"
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        # The mask is kept up to date even with no padding left (merges need it); the step
        # passes it to the model only while ``pads`` say there is padding (docs/engine.md).
        return self.next_tokens.unsqueeze(1), self.mask, self.positions.unsqueeze(1)

    def advance(self) -> None:
        """After a decode forward: every row's next token sits one position further on."""
        self.positions = self.positions + 1

    def filter(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (ascending indices); trim columns that became all padding.

        The rows that left stop being computed at once; their slots are filled with kept rows
        from the end (``kv_cache.leave_order``), so a leave copies at most one row per leaver
        and the kept rows' order may change (``rows`` and every per-row tensor follow it).
        """
        if len(keep) == len(self.rows):
            return
        order, holes, movers = kv_cache.leave_order(keep)
        kv_cache.drop_rows(self.cache, order, holes, movers)
        self.rows = [self.rows[i] for i in order]
        self.pads = [self.pads[i] for i in order]
        if order != list(range(len(order))):
            index = torch.tensor(order, dtype=torch.long, device=self.mask.device)
            self.mask = self.mask.index_select(0, index)
            self.positions = self.positions.index_select(0, index)
            if self.next_tokens is not None:
                self.next_tokens = self.next_tokens.index_select(0, index)
        else:
            n = len(order)
            self.mask = self.mask[:n]
            self.positions = self.positions[:n]
            if self.next_tokens is not None:
                self.next_tokens = self.next_tokens[:n]
        columns = min(self.pads, default=0)
        if columns and kv_cache.can_trim(self.cache, self.width):
            kv_cache.trim_left(self.cache, columns)
            self.mask = self.mask[:, columns:]
            self.pads = [p - columns for p in self.pads]

    def can_merge(self, other: SubBatch) -> bool:
        return other.key == self.key and kv_cache.can_merge(
            self.cache, self.width, other.cache, other.width
        )

    def merge(self, others: list[SubBatch]) -> None:
        """Append the rows of ``others`` in order (``can_merge`` must hold for each); they are
        consumed. One widening and one copy of the joiners' rows for all of them."""
        if not others:
            return
        width = max([self.width] + [o.width for o in others])
        kv_cache.merge(self.cache, self.width, [(o.cache, o.width) for o in others])
        grow = width - self.width
        pads = [p + grow for p in self.pads]
        for other in others:
            pads.extend(p + width - other.width for p in other.pads)
        self.mask = torch.cat([_pad_left(b.mask, width) for b in [self, *others]])
        self.pads = pads
        self.rows = self.rows + [row for o in others for row in o.rows]
        self.positions = torch.cat([self.positions] + [o.positions for o in others])
        assert self.next_tokens is not None
        tokens = [self.next_tokens]
        for other in others:
            assert other.next_tokens is not None
            tokens.append(other.next_tokens)
        self.next_tokens = torch.cat(tokens)


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    zeros = mask.new_zeros((mask.shape[0], missing))
    return torch.cat([zeros, mask], dim=1)


@dataclass(eq=False)
class Prefill:
    """Rows whose ids are (partly) still to be fed; they join the running batch once fed.

    Usually a request's prompt, shared by all its rows; for a row that crossed its quirk
    partition, that row's whole history (prompt + tokens so far), fed again from scratch.
    """

    job: Job
    rows: list[Row]
    key: SubBatchKey
    ids: tuple[int, ...] = ()  # what to feed; empty = the rows' prompt
    done: int = 0  # ids already in ``cache`` (chunked prefill)
    cache: DynamicCache | None = None

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = self.rows[0].prompt

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done


@dataclass
class RunningBatch:
    """Every running sub-batch, by key; a key holds several cohorts when caches cannot merge."""

    cohorts: dict[SubBatchKey, list[SubBatch]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[SubBatch]:
        for batches in list(self.cohorts.values()):
            yield from list(batches)

    def rows(self) -> int:
        return sum(len(b) for b in self)

    def add(self, batches: list[SubBatch]) -> None:
        """Merge each of ``batches`` into the first cohort of its key that can take it, else
        it starts a new cohort; every cohort takes all its joiners of this step in one merge."""
        joining: dict[int, tuple[SubBatch, list[SubBatch]]] = {}
        for batch in batches:
            if not batch.rows:
                continue
            cohorts = self.cohorts.setdefault(batch.key, [])
            for cohort in cohorts:
                # Pairwise checks suffice: the merged width is the widest pair's.
                if cohort.can_merge(batch):
                    joining.setdefault(id(cohort), (cohort, []))[1].append(batch)
                    break
            else:
                cohorts.append(batch)
        for cohort, joiners in joining.values():
            cohort.merge(joiners)

    def drop_empty(self) -> None:
        for key in list(self.cohorts):
            kept = [b for b in self.cohorts[key] if b.rows]
            if kept:
                self.cohorts[key] = kept
            else:
                del self.cohorts[key]

    def clear(self) -> None:
        self.cohorts.clear()
