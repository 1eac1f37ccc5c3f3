"""Requests that run through ``generate``, interleaved with the decode loop.

Two kinds of request keep exactly ``PeftModel.generate``'s results only by running through it:

* beam search: one call per batch of beam requests with the same adapter and beam
  configuration (``num_beams``, ``num_return_sequences``, ``length_penalty``,
  ``early_stopping``, ``max_new_tokens``; one value per call). Transformers cannot stream
  beams: each returned sequence is one event at the end, with ``beam_score`` =
  ``sequences_scores``; stop sequences truncate the finished text;
* prompt-learning adapters (prompt/prefix tuning: peft's ``generate`` feeds their virtual
  tokens and prefix cache itself, which a plain forward does not): one greedy ``generate``
  call per batch of one adapter and one prompt length, whose logits processor lets the shared
  ``Sampler`` choose every row's token (processors, seeds, logprobs exactly as in the loop) and
  whose stopping criterion accepts the tokens row by row (events stream as usual).

Neither freezes the running batch: a stopping criterion, called by ``generate`` after each of
its steps, runs one iteration of the decode loop (admission, prefill, one decode step of every
other sub-batch) before the call continues. The call's model is lent to it
(``ModelStep.lend``) so the loop never switches that model's active adapter meanwhile, and
adapter attach/detach wait until the call returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .detokenize import Decoder, TextStream
from .handle import Job, flush_events
from .peft_guard import guard_models
from .rows import Row, RowFinished, accept, finish, interruption
from .sampler import Choices, Sampler
from .stats import StepStats
from .step import ModelStep
from .types import FinishReason, SequenceResult, TokenEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateKey:
    """Requests share one ``generate`` call only when these agree."""

    group: str
    adapter: str | None  # None = the base model
    # Beams: (num_beams, num_return_sequences, length_penalty, early_stopping,
    # max_new_tokens). None: rows choose their own tokens (prompt-learning adapters).
    beams: tuple[int, int, float, bool, int] | None
    # Set where rows must never be padded against each other (prompt learning, a LongRoPE
    # switch): only prompts of this length share the call.
    prompt_length: int | None


def through_generate(job: Job) -> bool:
    """Whether ``job`` runs through ``generate`` rather than the decode loop's forwards."""
    adapter = job.prepared.adapter
    return job.prepared.beams or (adapter is not None and adapter.same_prompt_length)


def generate_key(job: Job, group: str, by_length: bool) -> GenerateKey:
    prepared = job.prepared
    e = prepared.effective
    adapter = prepared.adapter
    same_length = by_length or (adapter is not None and adapter.same_prompt_length)
    return GenerateKey(
        group,
        adapter.name if adapter is not None else None,
        (e.num_beams, e.num_return_sequences, e.length_penalty, e.early_stopping, e.max_new_tokens)
        if prepared.beams
        else None,
        len(prepared.prompt_ids) if same_length else None,
    )


class _BeamKwargWarningFilter(logging.Filter):
    """Drops transformers' notice about ``num_beams`` given both in the config and as a kwarg
    (peft expands a batch's rows for beams only when ``num_beams`` is a ``generate`` kwarg)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "together with generation-related arguments" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_BeamKwargWarningFilter())


class _RowProcessors:
    """Applies each request's own processors to its beams' rows (beam search then selects)."""

    def __init__(self, rows: list[Row], num_beams: int, width: int) -> None:
        self.rows = rows
        self.num_beams = num_beams
        self.width = width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores
        for i in range(scores.shape[0]):
            row = self.rows[i // self.num_beams]
            if len(row.processors) == 0:
                continue
            if out is scores:
                out = scores.clone()
            ids = input_ids[i : i + 1, self.width - len(row.prompt) :]
            out[i : i + 1] = row.processors(ids, scores[i : i + 1].clone())  # type: ignore[arg-type]
        return out


Between = Callable[[StepStats], None]


class _Interleave(StoppingCriteria):
    """After each beam step: end interrupted requests, then run one decode-loop iteration
    (handed the beam step's own figures, so the loop reports one ``StepStats`` for both)."""

    def __init__(
        self, jobs: list[Job], num_beams: int, between: Between, on_done: RowFinished
    ) -> None:
        self.jobs = jobs
        self.rows = num_beams * len(jobs)
        self.prompt_tokens = num_beams * sum(len(job.prepared.prompt_ids) for job in jobs)
        self.between = between
        self.on_done = on_done
        self.eos_token_id = -1  # its presence makes generate pad finished hypotheses
        self.last = time.monotonic()
        self.first = True

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        beam_step = StepStats(
            prefill_tokens=self.prompt_tokens if self.first else 0,
            decode_tokens=0 if self.first else self.rows,
            rows=self.rows,
            seconds=time.monotonic() - self.last,
        )
        self.first = False
        for job in self.jobs:
            reason = interruption(job)
            if reason is not None and not job.done:
                for row in job.rows:
                    finish(row, reason, self.on_done)
        self.between(beam_step)
        self.last = time.monotonic()
        stop = all(job.done for job in self.jobs)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _ChooseRows:
    """Logits processor: the shared sampler chooses each row's token; only it survives."""

    def __init__(self, rows: list[Row], sampler: Sampler) -> None:
        self.rows = rows
        self.sampler = sampler
        self.choices: Choices | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.choices = self.sampler.choose(scores.float(), self.rows)
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(1, self.choices.tokens.unsqueeze(1), 0.0)
        return chosen


class _AcceptRows(StoppingCriteria):
    """After each step: accept every row's token, end interrupted requests, run the loop."""

    def __init__(
        self,
        jobs: list[Job],
        rows: list[Row],
        chooser: _ChooseRows,
        between: Between,
        on_done: RowFinished,
    ) -> None:
        self.jobs = jobs
        self.rows = rows
        self.chooser = chooser
        self.between = between
        self.on_done = on_done
        self.eos_token_id = -1  # its presence makes generate pad finished rows
        self.prompt_tokens = sum(len(job.prepared.prompt_ids) for job in jobs)
        self.last = time.monotonic()
        self.first = True

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        live = sum(1 for row in self.rows if not row.finished)
        step = StepStats(
            prefill_tokens=self.prompt_tokens if self.first else 0,
            decode_tokens=0 if self.first else live,
            rows=live,
            seconds=time.monotonic() - self.last,
        )
        self.first = False
        choices = self.chooser.choices
        assert choices is not None
        for i, row in enumerate(self.rows):
            if row.finished:
                continue
            if row.dead_end:
                finish(row, FinishReason.CONSTRAINT_DEAD_END, self.on_done)
            else:
                accept(row, choices.token_ids[i], choices.logprobs[i], self.on_done)
        for job in self.jobs:
            reason = interruption(job)
            if reason is not None and not job.done:
                for row in job.rows:
                    finish(row, reason, self.on_done)
        flush_events(self.jobs)
        self.between(step)
        self.last = time.monotonic()
        done = [row.finished for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class BeamRunner:
    """Runs one batch of requests through ``generate`` (worker thread)."""

    def __init__(
        self,
        step: ModelStep,
        sampler: Sampler,
        tokenizer: Decoder,
        device: torch.device,
        pad_token_id: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.step = step
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.device = device
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids

    def run(
        self, key: GenerateKey, jobs: list[Job], between: Between, on_done: RowFinished
    ) -> None:
        if key.beams is None:
            self._run_rows(key, jobs, between, on_done)
        else:
            self._run_beams(key.beams, key, jobs, between, on_done)

    def _inputs(self, prompts: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device), width

    def _run_rows(
        self, key: GenerateKey, jobs: list[Job], between: Between, on_done: RowFinished
    ) -> None:
        """Greedy ``generate`` whose tokens are chosen by the sampler, row by row."""
        rows = [row for job in jobs for row in job.rows]
        input_ids, attention_mask, _ = self._inputs([row.prompt for row in rows])
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(row.max_new_tokens for row in rows),
            pad_token_id=self.pad_token_id,
            eos_token_id=None,  # rows stop by their own rules (rows.accept)
        )
        chooser = _ChooseRows(rows, self.sampler)
        model = self.step.beam_model(key.group, key.adapter)
        self.step.lend(model, key.adapter)
        try:
            with guard_models(self.step.registry.models()), torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([chooser]),
                    stopping_criteria=StoppingCriteriaList(
                        [_AcceptRows(jobs, rows, chooser, between, on_done)]
                    ),
                )
        finally:
            self.step.take_back()
        for row in rows:
            finish(row, FinishReason.LENGTH, on_done)  # only if generate stopped on its own

    def _run_beams(
        self,
        beams: tuple[int, int, float, bool, int],
        key: GenerateKey,
        jobs: list[Job],
        between: Between,
        on_done: RowFinished,
    ) -> None:
        num_beams, nrs, length_penalty, early_stopping, max_new = beams
        rows = [job.rows[0] for job in jobs]
        input_ids, attention_mask, width = self._inputs([row.prompt for row in rows])
        config = GenerationConfig(
            do_sample=False,
            num_beams=num_beams,
            num_return_sequences=nrs,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            max_new_tokens=max_new,
            pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_ids) or None,
            return_dict_in_generate=True,
            output_scores=True,
        )
        model = self.step.beam_model(key.group, key.adapter)
        self.step.lend(model, key.adapter)
        try:
            with guard_models(self.step.registry.models()), torch.inference_mode():
                output: Any = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([_RowProcessors(rows, num_beams, width)]),
                    stopping_criteria=StoppingCriteriaList(
                        [_Interleave(jobs, num_beams, between, on_done)]
                    ),
                    # peft expands adapter_names for beams only when num_beams is a kwarg.
                    num_beams=num_beams,
                )
        finally:
            self.step.take_back()
        self._publish(jobs, output, width, on_done)

    def _publish(self, jobs: list[Job], output: Any, width: int, on_done: RowFinished) -> None:
        """Beam results exist only at the end: decode each returned sequence, then publish."""
        sequences = output.sequences.tolist()
        scores = output.sequences_scores.tolist()
        cursor = 0
        for job in jobs:
            nrs = job.prepared.effective.num_return_sequences
            chunk = range(cursor, cursor + nrs)
            cursor += nrs
            if job.done:
                continue
            results = [
                self._sequence(job, index, sequences[s][width:], float(scores[s]))
                for index, s in enumerate(chunk)
            ]
            job.beam_sequences = results
            for r in results:
                job.publish_event(TokenEvent(r.index, r.token_ids, r.text))
            job.rows[0].finish_reason = FinishReason.LENGTH
            on_done(job)

    def _sequence(self, job: Job, index: int, tokens: list[int], score: float) -> SequenceResult:
        for pos, tok in enumerate(tokens):
            if tok in self.eos_token_ids:
                tokens = tokens[: pos + 1]
                break
        options = job.prepared.request.options
        stream = TextStream(
            self.tokenizer, job.prepared.effective.stop_sequences, options.skip_special_tokens
        )
        kept: list[int] = []
        for tok in tokens:
            kept.append(tok)
            stream.push(tok)
            if stream.stopped:
                break
        stream.finish()
        if stream.stopped:
            reason = FinishReason.STOP_SEQUENCE
        elif kept and kept[-1] in self.eos_token_ids:
            reason = FinishReason.EOS
        else:
            reason = FinishReason.LENGTH
        return SequenceResult(index, stream.text, tuple(kept), reason, beam_score=score)
