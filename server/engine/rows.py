"""One returned sequence being generated (a ``Row``) and what happens when it gets a token.

A request has one row per returned sequence (``num_return_sequences`` without beams). A row
carries its own logits processors (transformers' own, built from the request's
``GenerationConfig``), its own ``torch.Generator`` when it samples, its detokenizer and its
results. ``accept`` feeds a chosen token through the stop rules (stop sequence, EOS, the row's
own ``max_new_tokens``) and buffers the token's event; ``finish`` ends the row and publishes the
request's result once all its rows are done.

Per-row constraints: a constrained row carries its matcher (``structured.RowConstraint``);
the sampler applies its mask before the row's processors, ``accept`` advances it, and a row
whose mask leaves no token ends as a dead end. A row's ``processors`` list is its own: extra
logits processors added to it apply to that row only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList

from .detokenize import Decoder, TextStream
from .handle import Job
from .processors import RowPlan
from .structured import RowConstraint
from .types import FinishReason, TokenEvent, TokenLogprob


@dataclass(eq=False)
class Row:
    """One model row: a returned sequence of one request."""

    job: Job
    index: int  # sequence_index within its request
    prompt: tuple[int, ...]
    processors: LogitsProcessorList
    generator: torch.Generator | None  # set for sampled rows
    max_new_tokens: int
    eos_ids: frozenset[int]
    stream: TextStream
    logprobs_top_n: int | None  # None: no logprobs wanted
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    constraint: RowConstraint | None = None  # None: unconstrained
    dead_end: bool = False  # the constraint left no token at the last step
    # Constrained and the text does not satisfy the constraint (set when the row finishes).
    incomplete: bool = False
    plan: RowPlan | None = None  # the sampler's batched form of ``processors`` (first use)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def samples(self) -> bool:
        return self.generator is not None

    @property
    def length(self) -> int:
        """Tokens of this row the model has seen or will see next: prompt + generated."""
        return len(self.prompt) + len(self.tokens)

    def history(self, device: torch.device) -> torch.Tensor:
        """The row's un-padded ids (prompt + generated) as a (1, n) tensor, for processors."""
        return torch.tensor([self.prompt + tuple(self.tokens)], dtype=torch.long, device=device)


RowFinished = Callable[[Job], None]


def accept(row: Row, token: int, logprob: TokenLogprob | None, on_job_done: RowFinished) -> None:
    """Append ``token`` to ``row``, emit its event and end the row if a stop rule says so."""
    row.tokens.append(token)
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
        finish(row, reason, on_job_done)


def finish(row: Row, reason: FinishReason, on_job_done: RowFinished) -> None:
    """End ``row``; when it was its request's last running row, hand the request on."""
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
        on_job_done(job)


def interruption(job: Job) -> FinishReason | None:
    """Why a running request must stop now (cancelled, deadline passed), if it must."""
    if job.cancelled:
        return FinishReason.CANCELLED
    if job.deadline_passed:
        return FinishReason.DEADLINE_EXCEEDED
    return None


class RowFactory:
    """Builds a request's rows: transformers' processors for its config, seeded generators."""

    def __init__(
        self,
        base: Any,
        tokenizer: Decoder,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self._base = base
        self._tokenizer = tokenizer
        self._device = device
        self._eos = eos_token_ids
        self._eos_tensor = torch.tensor(eos_token_ids, device=device)

    def processors(self, job: Job) -> LogitsProcessorList:
        """transformers' own processors for the request, in transformers' own order."""
        config = job.prepared.generation_config
        config._eos_token_tensor = self._eos_tensor
        return self._base._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=len(job.prepared.prompt_ids),
            logits_processor=LogitsProcessorList(),
            device=str(self._device),
            model_kwargs=None,
        )

    def rows(self, job: Job, copies: int, seeded: bool = True) -> list[Row]:
        """``copies`` fresh rows; row i of a sampled request draws from ``seed + i``."""
        prepared = job.prepared
        e = prepared.effective
        options = prepared.request.options
        processors = self.processors(job)
        # A chat template's end-of-turn tokens end a row like EOS does.
        stop_ids = frozenset(self._eos) | frozenset(prepared.extra_stop_ids)
        out = []
        for index in range(copies):
            generator = None
            if seeded and e.do_sample:
                generator = torch.Generator(device=self._device)
                generator.manual_seed((e.seed + index) % (2**64))
            out.append(
                Row(
                    job=job,
                    index=index,
                    prompt=prepared.prompt_ids,
                    # A list per row: a constraint may add processors to one row only.
                    processors=LogitsProcessorList(processors),
                    generator=generator,
                    max_new_tokens=e.max_new_tokens,
                    eos_ids=stop_ids,
                    stream=TextStream(
                        self._tokenizer, e.stop_sequences, options.skip_special_tokens
                    ),
                    logprobs_top_n=options.top_logprobs if options.return_logprobs else None,
                    constraint=(
                        RowConstraint(prepared.constraint, stop_ids)
                        if prepared.constraint is not None
                        else None
                    ),
                )
            )
        return out
