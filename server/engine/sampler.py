"""Token choice for every row of a step at once, with per-row work only where a row needs it.

The logits of every forward of a step arrive as one ``(rows, vocab)`` float32 tensor, the way
``generate`` takes ``outputs.logits[:, -1]`` (a float32 copy). Then:

* a constrained row gets its constraint's mask first (so top-k/top-p act on the allowed
  tokens only); a row whose mask and processors leave nothing is marked a dead end;
* rows with logits processors (penalties, bad words, bias, min tokens, top-k/p, min-p,
  typical-p, temperature) run them batched (``processors.BatchedProcessors``: rows whose
  processors agree as one tensor operation, bit-identical to each row's own processors); only
  what cannot be batched exactly, and rows whose list is not transformers', run per row on
  their own un-padded ids; every other row is left untouched;
* greedy rows take the argmax; a sampled row takes ``argmax(probs / q)`` with ``q`` drawn
  i.i.d. Exponential(1) from the row's own ``torch.Generator`` (the exponential-race form of
  sampling from ``probs``), so its tokens depend only on its seed and its own logits, alone or
  in any crowd: one draw per sampled row, one division and one batched ``argmax`` for all;
* logprobs (raw ``log_softmax`` of the model's logits, the chosen token and the top-n) are
  computed batched for the rows that asked;
* everything the host needs (tokens, logprobs) crosses to the host in one transfer per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .processors import BatchedProcessors, row_plan
from .rows import Row
from .structured import apply_masks, dead_ends
from .types import TokenLogprob, TopLogprob

# Exponential draws of exactly 0 would divide by zero; the smallest normal float32 is far
# below anything a real draw produces (P(q < 1e-38) ~ 1e-38).
_MIN_NOISE = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Choices:
    """A step's chosen tokens: on the device (next step's input) and on the host."""

    tokens: torch.Tensor  # (rows,) long, on the model's device
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Chooses one token per row; ``token_text`` names tokens in logprobs."""

    def __init__(self, device: torch.device, token_text: Callable[[int], str]) -> None:
        self.device = device
        self.token_text = token_text
        self._processors = BatchedProcessors(device)

    def choose(self, logits: torch.Tensor, rows: Sequence[Row]) -> Choices:
        scores = self._processed(logits, rows)
        sampled = [i for i, row in enumerate(rows) if row.samples]
        if sampled:
            picks = scores[sampled].softmax(dim=-1)
            noise = torch.empty_like(picks)
            for k, i in enumerate(sampled):
                # Each row's own stream (a contiguous row draws what a fresh vector would).
                noise[k].exponential_(generator=rows[i].generator)
            picks /= noise.clamp_min_(_MIN_NOISE)
            if scores is logits:
                scores = logits.clone()
            scores[sampled] = picks
        tokens = scores.argmax(dim=-1)
        wants = [i for i, row in enumerate(rows) if row.logprobs_top_n is not None]
        if not wants:
            ids = tokens.tolist()  # the step's one device-to-host transfer
            return Choices(tokens, ids, [None] * len(rows))
        top_n = max(rows[i].logprobs_top_n or 0 for i in wants)
        logp = torch.log_softmax(logits[wants], dim=-1)
        chosen = logp.gather(1, tokens[wants].unsqueeze(1))
        packed = [tokens.double()]
        top_values, top_ids = torch.topk(logp, top_n, dim=-1) if top_n else (None, None)
        parts = [chosen.double().flatten()]
        if top_values is not None and top_ids is not None:
            parts += [top_values.double().flatten(), top_ids.double().flatten()]
        host = torch.cat(packed + parts).tolist()  # one transfer for tokens and logprobs
        n, w = len(rows), len(wants)
        ids = [int(t) for t in host[:n]]
        chosen_lp = host[n : n + w]
        tops = host[n + w : n + w + w * top_n]
        top_idx = host[n + w + w * top_n :]
        out: list[TokenLogprob | None] = [None] * n
        for k, i in enumerate(wants):
            want = rows[i].logprobs_top_n or 0
            top = tuple(
                TopLogprob(
                    int(top_idx[k * top_n + j]),
                    self.token_text(int(top_idx[k * top_n + j])),
                    tops[k * top_n + j],
                )
                for j in range(want)
            )
            out[i] = TokenLogprob(ids[i], self.token_text(ids[i]), chosen_lp[k], top)
        return Choices(tokens, ids, out)

    def _processed(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """``logits`` with constraint masks and processors applied (the same tensor if no
        row has any). The masks of all constrained rows go in one tensor operation."""
        scores = logits
        constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
        dead: set[int] = set()
        if constrained:
            scores = logits.clone()
            index = torch.tensor(constrained, dtype=torch.long, device=logits.device)
            block = scores.index_select(0, index)
            ends = apply_masks(block, [rows[i].constraint for i in constrained])  # type: ignore[misc]
            scores[index] = block
            dead = {i for i, end in zip(constrained, ends, strict=True) if end}
        batched: list[int] = []
        alone: list[int] = []
        for i, row in enumerate(rows):
            if len(row.processors) == 0 or i in dead:
                continue
            (batched if row_plan(row).steps is not None else alone).append(i)
        if (batched or alone) and scores is logits:
            scores = logits.clone()
        if batched:
            scores = self._processors.apply(scores, rows, batched)
        for i in alone:
            ids = rows[i].history(self.device)
            # transformers annotates LongTensor/FloatTensor, which slicing never yields.
            scores[i : i + 1] = rows[i].processors(ids, scores[i : i + 1].clone())  # type: ignore[arg-type]
        recheck = [i for i in batched + alone if rows[i].constraint is not None]
        if recheck:
            # A constrained row's processors may remove what its mask left: one check for all.
            recheck.sort()
            ends = dead_ends(scores[recheck])
            dead.update(i for i, end in zip(recheck, ends, strict=True) if end)
        for i in dead:
            # Nothing is left to choose: never sample from all -inf (NaN); end the row.
            rows[i].dead_end = True
            scores[i] = 0.0
        return scores
