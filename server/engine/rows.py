"""Per-row decoding inside one shared ``generate`` call: logits processing and stopping.

``generate`` runs greedily over the whole batch; the real per-row decisions happen here:

* ``RowLogitsProcessor`` applies, for each row, transformers' own processors (built by
  ``GenerationMixin._get_logits_processor`` from the row's GenerationConfig, hence in
  transformers' own order) to that row's *un-padded* input ids. Then it picks the row's token
  itself - argmax, or a draw with the row's own ``torch.Generator`` - and returns scores that
  are -inf except the chosen token, so ``generate``'s argmax takes exactly that token. A row's
  sampled tokens thus depend only on its own seed and its own logits, never on its neighbours.
  Logprobs are taken here from the raw model logits. A constrained row's grammar mask
  (``structured.RowConstraint``) is applied first, before its processors, so top-k/top-p act
  on the allowed tokens only; a row whose mask and processors leave no token is a dead end.
* ``RowStoppingCriteria`` gets each new token right after it is appended: it feeds the row's
  detokenizer, emits the token event, and ends the row on EOS, its own max_new_tokens, a stop
  sequence, cancellation or deadline. A finished row's result is published at once.

For beam batches (``beams=True``) the processor only applies the rows' processors (beam search
selects tokens itself) and the criteria only watch for cancellation and deadlines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, StoppingCriteria

from .detokenize import TextStream
from .handle import Job, flush_events
from .structured import RowConstraint, apply_masks
from .types import FinishReason, TokenEvent, TokenLogprob, TopLogprob


@dataclass
class Row:
    """One returned sequence being generated (one row of the model's batch)."""

    job: Job
    index: int  # sequence_index within its request
    prompt_len: int
    processors: LogitsProcessorList
    generator: torch.Generator | None  # set for sampled rows
    max_new_tokens: int
    eos_ids: frozenset[int]
    stream: TextStream
    logprobs_top_n: int | None  # None: no logprobs wanted
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    pending_logprob: TokenLogprob | None = None
    constraint: RowConstraint | None = None  # None: unconstrained
    dead_end: bool = False  # the constraint left no token at the last step
    # Constrained and the text does not satisfy the constraint (set when the row finishes).
    incomplete: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def apply_processors(
    processors: LogitsProcessorList, input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    # transformers annotates LongTensor/FloatTensor, which tensor slicing never yields for mypy.
    return processors(input_ids, scores)  # type: ignore[arg-type]


class BatchState:
    """The rows of one running batch and the callbacks that publish their progress."""

    def __init__(
        self,
        rows: list[Row],
        jobs: list[Job],
        padded_prompt_len: int,
        token_text: Callable[[int], str],
        on_job_finished: Callable[[Job], None],
        on_step: Callable[[], None],
        beams: bool = False,
        num_beams: int = 1,
    ) -> None:
        self.rows = rows
        self.jobs = jobs
        self.padded_prompt_len = padded_prompt_len
        self.token_text = token_text
        self.on_job_finished = on_job_finished
        self.on_step = on_step
        self.beams = beams
        self.num_beams = num_beams

    # -- row lifecycle --
    def finish_row(self, row: Row, reason: FinishReason) -> None:
        if row.finished:
            return
        tail = row.stream.finish()
        if tail:
            row.job.publish_event(TokenEvent(row.index, (), tail))
        if row.constraint is not None:
            satisfied = reason in (FinishReason.EOS, FinishReason.LENGTH)
            row.incomplete = not (satisfied and row.constraint.is_complete)
        row.finish_reason = reason
        job = row.job
        if not job.done and all(r.finished for r in job.rows):
            self.on_job_finished(job)

    def accept(self, row: Row, token: int) -> None:
        row.tokens.append(token)
        logprob = row.pending_logprob
        row.pending_logprob = None
        if logprob is not None:
            row.logprobs.append(logprob)
        delta = row.stream.push(token)
        if row.constraint is not None:
            row.constraint.accept(token)
        reason: FinishReason | None = None
        if row.stream.stopped:
            reason = FinishReason.STOP_SEQUENCE
        elif token in row.eos_ids:
            reason = FinishReason.EOS
        elif len(row.tokens) >= row.max_new_tokens:
            reason = FinishReason.LENGTH
            if row.constraint is not None and not row.constraint.is_complete:
                reason = FinishReason.CONSTRAINT_INCOMPLETE
        if reason is not None:
            # Flush held-back text into this token's event so the stream ends with it.
            delta += row.stream.finish()
        row.job.publish_event(
            TokenEvent(row.index, (token,), delta, (logprob,) if logprob is not None else ())
        )
        if reason is not None:
            self.finish_row(row, reason)

    def interrupt_jobs(self) -> None:
        """End the rows of cancelled jobs and of jobs whose deadline passed."""
        for job in self.jobs:
            if job.done:
                continue
            reason = None
            if job.cancelled:
                reason = FinishReason.CANCELLED
            elif job.deadline_passed:
                reason = FinishReason.DEADLINE_EXCEEDED
            if reason is not None:
                for row in job.rows:
                    self.finish_row(row, reason)

    def logprob_for(self, row: Row, raw: torch.Tensor, token: int) -> TokenLogprob:
        logp = torch.log_softmax(raw.float(), dim=-1)
        top: tuple[TopLogprob, ...] = ()
        if row.logprobs_top_n:
            values, ids = torch.topk(logp, row.logprobs_top_n)
            top = tuple(
                TopLogprob(int(i), self.token_text(int(i)), float(v))
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            )
        return TokenLogprob(token, self.token_text(token), float(logp[token]), top)


class RowLogitsProcessor:
    """Applies each row's own processors and (outside beams) chooses each row's token."""

    def __init__(self, state: BatchState) -> None:
        self.state = state

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.beams:
            return self._beam_rows(input_ids, scores)
        chosen = torch.full_like(scores, float("-inf"))
        masked = self._masked_rows(scores)
        for i, row in enumerate(state.rows):
            if row.finished:
                # generate replaces a finished row's token with pad anyway; any choice will do.
                chosen[i, 0] = 0.0
                continue
            raw = scores[i]
            processed = raw
            dead_end = False
            if i in masked:
                processed, dead_end = masked[i]
            if len(row.processors) > 0 and not dead_end:
                start = state.padded_prompt_len - row.prompt_len
                ids = input_ids[i : i + 1, start:]
                processed = apply_processors(row.processors, ids, processed.unsqueeze(0).clone())[0]
                dead_end = row.constraint is not None and row.constraint.is_dead_end(processed)
            if dead_end:
                # Nothing is left to choose: never sample from all -inf (NaN); end the row.
                row.dead_end = True
                chosen[i, 0] = 0.0
                continue
            if row.generator is not None:
                probs = torch.softmax(processed.float(), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=row.generator))
            else:
                token = int(torch.argmax(processed))
            if row.logprobs_top_n is not None:
                row.pending_logprob = state.logprob_for(row, raw, token)
            chosen[i, token] = 0.0
        return chosen

    def _masked_rows(self, scores: torch.Tensor) -> dict[int, tuple[torch.Tensor, bool]]:
        """Every live constrained row's logits with its grammar mask applied, all in one
        tensor operation (unconstrained rows are not touched), and whether it is a dead end."""
        rows = [
            (i, row.constraint)
            for i, row in enumerate(self.state.rows)
            if row.constraint is not None and not row.finished
        ]
        if not rows:
            return {}
        block = scores.index_select(0, torch.tensor([i for i, _ in rows], device=scores.device))
        dead = apply_masks(block, [c for _, c in rows])
        return {i: (block[j], dead[j]) for j, (i, _) in enumerate(rows)}

    def _beam_rows(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        state = self.state
        out = scores
        for i in range(scores.shape[0]):
            row = state.rows[i // state.num_beams]
            if len(row.processors) == 0:
                continue
            if out is scores:
                out = scores.clone()
            start = state.padded_prompt_len - row.prompt_len
            ids = input_ids[i : i + 1, start:]
            out[i : i + 1] = apply_processors(row.processors, ids, scores[i : i + 1].clone())
        return out


class RowStoppingCriteria(StoppingCriteria):
    """Per-row done flags; also the place where tokens are emitted and deadlines checked."""

    def __init__(self, state: BatchState, eos_token_id: int) -> None:
        self.state = state
        # The attribute's presence makes generate pad finished rows instead of extending them.
        self.eos_token_id = eos_token_id

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        state = self.state
        state.on_step()
        state.interrupt_jobs()
        if state.beams:
            all_done = all(job.done for job in state.jobs)
            return torch.full(
                (input_ids.shape[0],), all_done, dtype=torch.bool, device=input_ids.device
            )  # type: ignore[return-value]
        last = input_ids[:, -1].tolist()
        for i, row in enumerate(state.rows):
            if row.finished:
                continue
            if row.dead_end:
                state.finish_row(row, FinishReason.CONSTRAINT_DEAD_END)
            else:
                state.accept(row, int(last[i]))
        flush_events(state.jobs)
        done = [row.finished for row in state.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def now_ms(since: float) -> float:
    return (time.monotonic() - since) * 1000.0
