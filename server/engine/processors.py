"""Every row's own logits processors applied batched: the same floats, a few tensor operations.

A row's processors are transformers' own (``GenerationMixin._get_logits_processor``, in its
fixed order). ``plan`` turns a row's list into steps, one per processor, each with a *rank* (the
processor's place in transformers' order) and a *key* (what it does: kind and parameters).
``BatchedProcessors.apply`` then walks the ranks in order and runs each step for all rows whose
keys agree as one operation on their block of logits. A row sees its processors in its own
order and each processor's arithmetic unchanged, only with more rows at once, so its logits are
bit-identical to what its own processors produce alone (tested on random logits):

* warpers that read the scores only (temperature, top-k, top-p, min-p, epsilon) are the
  processor object itself called on the block of every row with the same parameters (a
  temperature is a Python scalar here as in ``generate``: rows with different temperatures
  are different blocks);
* min-new-tokens / min-length: one indexed fill of ``-inf`` at the EOS ids of the rows below
  their minimum this step;
* repetition penalty: the processor's gather, penalty and scatter over the rows' padded ids,
  kept incrementally in one ``(slots, width)`` tensor (``SeenTokens``: each step writes only
  the tokens a row got since);
* bad words and sequence biases of single tokens: one addition of the processor's own bias
  vector (a shared one broadcast, different ones stacked).

What cannot be batched exactly runs per row at its place in the row's order, with the row's
un-padded ids: no-repeat n-grams, bad words or biases of several tokens, typical-p and the
entropy-based warpers (their sums would be reduced in a different order over a batch when
torch uses several threads), and every processor not named here. A row whose list is not in
transformers' order (extra processors appended) runs its whole list per row.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.logits_process import ExponentialDecayLengthPenalty, TopHLogitsWarper

if TYPE_CHECKING:
    from .rows import Row

# transformers' order (GenerationMixin._get_logits_processor); a row's ranks strictly increase.
_ORDER: tuple[type, ...] = (
    SequenceBiasLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    NoBadWordsLogitsProcessor,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    ExponentialDecayLengthPenalty,
    SuppressTokensLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitNormalization,
)
_RANK = {cls: rank for rank, cls in enumerate(_ORDER)}

# How a step runs.
_WARP = "warp"  # the processor on the block of all rows with its key (reads scores only)
_MIN_NEW = "min_new"  # -inf at the EOS ids while new tokens < minimum
_MIN_LENGTH = "min_length"  # -inf at the EOS ids while prompt + new tokens < minimum
_PENALTY = "penalty"  # repetition penalty over the rows' seen ids
_BIAS = "bias"  # + the processor's single-token bias vector
_ROW = "row"  # the processor alone, on the row's own ids


@dataclass(frozen=True)
class Step:
    """One processor of a row: where it runs in transformers' order and how."""

    rank: int
    mode: str
    key: tuple[Any, ...]  # equal keys: one operation for all their rows
    processor: Any


@dataclass(frozen=True)
class RowPlan:
    """A row's processors as batched steps; ``steps`` is None: the whole list runs per row."""

    size: int  # len(processors) it was made from (a list that grew is planned again)
    steps: tuple[Step, ...] | None


# EOS tensors seen (RowFactory shares one among all requests) -> their ids: reading a device
# tensor's ids is a host sync, once per tensor rather than once per row.
_EOS_KEYS: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}


def _eos_key(processor: Any) -> tuple[int, ...]:
    eos = torch.as_tensor(processor.eos_token_id)
    known = _EOS_KEYS.get(id(eos))
    if known is not None and known[0] is eos:
        return known[1]
    if len(_EOS_KEYS) > 64:
        _EOS_KEYS.clear()
    key = tuple(int(t) for t in eos.flatten().tolist())
    _EOS_KEYS[id(eos)] = (eos, key)
    return key


def _step(processor: Any) -> Step | None:
    cls = type(processor)
    rank = _RANK.get(cls)
    if rank is None:
        return None
    mode: str = _ROW
    key: tuple[Any, ...] = (id(processor),)
    if cls is TemperatureLogitsWarper:
        mode, key = _WARP, (cls, float(processor.temperature))
    elif cls is TopKLogitsWarper:
        mode, key = _WARP, (cls, processor.top_k, processor.filter_value)
    elif cls in (TopPLogitsWarper, MinPLogitsWarper):
        value = processor.top_p if cls is TopPLogitsWarper else processor.min_p
        mode, key = _WARP, (cls, value, processor.filter_value, processor.min_tokens_to_keep)
    elif cls is EpsilonLogitsWarper:
        key = (cls, processor.epsilon, processor.filter_value, processor.min_tokens_to_keep)
        mode = _WARP
    elif cls is MinNewTokensLengthLogitsProcessor:
        mode, key = _MIN_NEW, (_MIN_NEW, _eos_key(processor))
    elif cls is MinLengthLogitsProcessor:
        mode, key = _MIN_LENGTH, (_MIN_LENGTH, _eos_key(processor))
    elif cls is RepetitionPenaltyLogitsProcessor and processor.prompt_ignore_length is None:
        mode, key = _PENALTY, (_PENALTY, float(processor.penalty))
    elif cls in (SequenceBiasLogitsProcessor, NoBadWordsLogitsProcessor):
        biases = processor.sequence_bias  # {token ids: bias} once constructed
        if isinstance(biases, dict) and all(len(ids) == 1 for ids in biases):
            mode, key = _BIAS, (_BIAS, tuple(sorted(biases.items())))
    return Step(rank, mode, key, processor)


def plan(processors: Sequence[Any]) -> RowPlan:
    """The batched form of one row's processor list."""
    steps = [_step(p) for p in processors]
    ranks = [s.rank for s in steps if s is not None]
    if None in steps or any(b <= a for a, b in itertools.pairwise(ranks)):
        return RowPlan(len(processors), None)
    return RowPlan(len(processors), tuple(s for s in steps if s is not None))


def row_plan(row: Row) -> RowPlan:
    """``row``'s plan, made on first use and again if its processor list changed size."""
    current = row.plan
    if current is None or current.size != len(row.processors):
        current = row.plan = plan(row.processors)
    return current


class SeenTokens:
    """The ids each repetition-penalised row has seen (prompt and generated): one padded row
    per slot of a ``(slots, width)`` tensor, appended to incrementally (each step writes only
    the tokens a row got since). Padding repeats the row's first id: gathering and scattering
    an id twice writes the same value twice, as the processor does for a repeated id. A row
    keeps its slot until it finishes or is gone; those slots are reused when no free one is
    left, and the table doubles when all are taken."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset(-1)

    def _reset(self, vocab: int) -> None:
        self.ids = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._vocab = vocab
        self._filled: list[int] = []  # per slot: how many columns hold the row's ids
        # Weak: a row that is gone (or finished) gives its slot back; none is kept alive here.
        self._owners: list[weakref.ref[Row] | None] = []
        self._free: list[int] = []
        self._slots: weakref.WeakKeyDictionary[Row, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )  # row -> (slot, row.length written)

    def slots(self, rows: Sequence[Row], vocab: int) -> tuple[torch.Tensor, int, bool]:
        """The slots of ``rows`` (a long tensor) with every row's ids up to now written, the
        most ids any of them has, and whether each has at least one (ids beyond the logits
        are dropped, as the processor drops them)."""
        if vocab != self._vocab:
            self._reset(vocab)
        out: list[int] = []
        fill_at: list[int] = []
        fill_id: list[int] = []
        at: list[int] = []
        cols: list[int] = []
        ids: list[int] = []
        width, complete = 0, True
        for row in rows:
            entry = self._slots.get(row)
            length = row.length
            if entry is None or entry[1] > length:
                slot = entry[0] if entry is not None else self._take(row)
                new = [t for t in (*row.prompt, *row.tokens) if 0 <= t < vocab]
                filled = 0
            else:
                slot, written = entry
                filled = self._filled[slot]
                start = written - len(row.prompt)
                new = [t for t in row.tokens[start:] if 0 <= t < vocab] if written < length else []
            if new and filled == 0:
                fill_at.append(slot)  # the whole row: its first id, then its ids over it
                fill_id.append(new[0])
            for k, token in enumerate(new):
                at.append(slot)
                cols.append(filled + k)
                ids.append(token)
            filled += len(new)
            self._filled[slot] = filled
            self._slots[row] = (slot, length)
            width = max(width, filled)
            complete = complete and filled > 0
            out.append(slot)
        have = self.ids.shape[1]
        if width > have:
            grown = max(width, 2 * have, 64)
            pad = (
                self.ids[:, :1].expand(-1, grown - have)
                if have
                else self.ids.new_zeros((self.ids.shape[0], grown))
            )
            self.ids = torch.cat([self.ids, pad], dim=1)
        if fill_at:
            self.ids[torch.tensor(fill_at, device=self.device)] = torch.tensor(
                fill_id, device=self.device
            ).unsqueeze(1)
        if ids:
            index = torch.tensor([at, cols, ids], device=self.device)
            self.ids[index[0], index[1]] = index[2]
        return torch.tensor(out, device=self.device), width, complete

    def _take(self, row: Row) -> int:
        if not self._free:
            for slot, ref in enumerate(self._owners):
                owner = ref() if ref is not None else None
                if ref is not None and (owner is None or owner.finished):
                    if owner is not None:
                        del self._slots[owner]
                    self._owners[slot] = None
                    self._free.append(slot)
        if not self._free:
            size = len(self._owners)
            grown = max(8, 2 * size)
            extra = self.ids.new_zeros((grown - size, self.ids.shape[1]))
            self.ids = torch.cat([self.ids, extra])
            self._owners.extend([None] * (grown - size))
            self._filled.extend([0] * (grown - size))
            self._free.extend(range(grown - 1, size - 1, -1))
        slot = self._free.pop()
        self._owners[slot] = weakref.ref(row)
        self._filled[slot] = 0
        return slot


@dataclass
class _Group:
    """One operation of a step: a step key and the rows (positions in the block) it runs on."""

    mode: str
    key: tuple[Any, ...]
    members: list[int]
    steps: list[Step]
    index: torch.Tensor | None = None  # the members as a tensor; None: every row, in order
    # min tokens: a row is below its minimum while its length (prompt + new) < this.
    thresholds: list[int] | None = None


class BatchedProcessors:
    """Applies the processors of many rows to one ``(rows, vocab)`` block of scores.

    The grouping (which rows share which operation, their index tensors) depends only on
    the rows' plans and places, so it is kept from one step to the next while the batch
    stays the same; only a join or a leave makes a new one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seen = SeenTokens(device)
        self._biases: dict[tuple[Any, ...], torch.Tensor] = {}
        self._eos: dict[tuple[int, ...], torch.Tensor] = {}
        # The last layout and what it was made for (the plans held: their ids stay unique).
        self._layout: list[_Group] = []
        self._layout_for: tuple[tuple[int, ...], int, tuple[RowPlan, ...]] = ((), 0, ())

    def apply(
        self, scores: torch.Tensor, rows: Sequence[Row], members: Sequence[int]
    ) -> torch.Tensor:
        """Run the processors of ``rows[i]`` for every ``i`` in ``members`` (ascending) on
        ``scores[i]``: in place, or in a new tensor returned (a warper over every row);
        other rows keep their scores. Every member has a plan with steps (``row_plan``)."""
        plans = tuple(row_plan(rows[i]) for i in members)
        places, n, held = self._layout_for
        same = n == scores.shape[0] and places == tuple(members)
        if not (same and all(a is b for a, b in zip(plans, held, strict=True))):
            self._layout = self._groups(members, plans, scores.shape[0])
            self._layout_for = (tuple(members), scores.shape[0], plans)
        histories: dict[int, torch.Tensor] = {}
        for group in self._layout:
            scores = self._run(scores, rows, group, histories)
        return scores

    def _groups(self, members: Sequence[int], plans: Sequence[RowPlan], n: int) -> list[_Group]:
        by_rank: dict[int, dict[tuple[Any, ...], _Group]] = {}
        for i, row_plan_ in zip(members, plans, strict=True):
            for step in row_plan_.steps or ():
                keyed = by_rank.setdefault(step.rank, {})
                group = keyed.get(step.key)
                if group is None:
                    group = keyed[step.key] = _Group(step.mode, step.key, [], [])
                group.members.append(i)
                group.steps.append(step)
        out = []
        for rank in sorted(by_rank):
            for group in by_rank[rank].values():
                if group.mode in (_MIN_NEW, _MIN_LENGTH):
                    group.thresholds = [_threshold(step) for step in group.steps]
                elif len(group.members) != n:  # else: every row, in order
                    group.index = torch.tensor(group.members, device=self.device)
                out.append(group)
        return out

    def _run(
        self,
        scores: torch.Tensor,
        rows: Sequence[Row],
        group: _Group,
        histories: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        mode, key, first = group.mode, group.key, group.steps[0]
        if mode == _ROW:
            for i, step in zip(group.members, group.steps, strict=True):
                if i not in histories:
                    histories[i] = rows[i].history(self.device)
                scores[i : i + 1] = step.processor(histories[i], scores[i : i + 1].clone())
            return scores
        if group.thresholds is not None:  # min new tokens / min length
            below = [
                i
                for i, limit in zip(group.members, group.thresholds, strict=True)
                if rows[i].length < limit
            ]
            if below:
                eos = self._eos_ids(key[1], scores.shape[1])
                if eos.numel():
                    at = torch.tensor(below, device=self.device).unsqueeze(1)
                    scores[at, eos] = -math.inf
            return scores
        index = group.index
        if mode == _PENALTY:
            members = [rows[i] for i in group.members]
            slots, width, complete = self.seen.slots(members, scores.shape[1])
            if not complete:  # a row without an id to gather: the processor, row by row
                for i, step in zip(group.members, group.steps, strict=True):
                    ids = rows[i].history(self.device)
                    scores[i : i + 1] = step.processor(ids, scores[i : i + 1].clone())
                return scores
            # The processor's own gather, penalty and scatter, over the rows' padded ids.
            seen = self.seen.ids[:, :width].index_select(0, slots)
            block = scores if index is None else scores.index_select(0, index)
            score = block.gather(1, seen)
            penalty = key[1]
            score = torch.where(score < 0, score * penalty, score / penalty)
            block.scatter_(1, seen, score)
            if index is not None:
                scores.index_copy_(0, index, block)
            return scores
        if mode == _BIAS:
            bias = self._bias(key, first.processor, scores)
            if index is None:
                return scores.add_(bias)
            return scores.index_copy_(0, index, scores.index_select(0, index).add_(bias))
        # _WARP: the processor returns a new tensor; over every row, it becomes the scores.
        if index is None:
            out: torch.Tensor = first.processor(_NO_IDS, scores)
            return out
        return scores.index_copy_(0, index, first.processor(_NO_IDS, scores.index_select(0, index)))

    def _eos_ids(self, ids: tuple[int, ...], vocab: int) -> torch.Tensor:
        eos = self._eos.get(ids)
        if eos is None:
            if len(self._eos) > 64:
                self._eos.clear()  # one tensor per distinct EOS set; keep a few
            # isin(arange(vocab), eos) in the processor: ids beyond the logits mask nothing.
            eos = self._eos[ids] = torch.tensor(
                [t for t in ids if 0 <= t < vocab], dtype=torch.long, device=self.device
            )
        return eos

    def _bias(self, key: tuple[Any, ...], processor: Any, scores: torch.Tensor) -> torch.Tensor:
        """The processor's own ``zeros + length_1_bias`` (it adds that to the scores)."""
        bias = self._biases.get(key)
        if bias is None or bias.shape[-1] != scores.shape[-1]:
            if len(self._biases) > 64:
                self._biases.clear()  # one vector per distinct bias set; keep a few
            if not processor.prepared_bias_variables:
                processor._prepare_bias_variables(scores)
            bias = torch.zeros_like(scores[:1])
            bias += processor.length_1_bias
            self._biases[key] = bias
        return bias


# Warpers read the scores only; their input_ids argument is never looked at.
_NO_IDS = torch.zeros((0, 0), dtype=torch.long)


def _threshold(step: Step) -> int:
    """The length (prompt + new tokens, ``input_ids.shape[-1]``) a row must reach before
    its min-tokens processor stops masking EOS."""
    p = step.processor
    if step.mode == _MIN_NEW:
        return int(p.prompt_length_to_skip + p.min_new_tokens)
    return int(p.min_length)
