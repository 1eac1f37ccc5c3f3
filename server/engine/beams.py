"""Beam search: ``generate`` on the request's own model, interleaved with the decode loop.

Beam requests keep exactly ``PeftModel.generate``'s results because they run through it: one
call per batch of beam requests with the same adapter and beam configuration (``num_beams``,
``num_return_sequences``, ``length_penalty``, ``early_stopping``, ``max_new_tokens``; one
value per call). It does not freeze the running batch: a stopping criterion, called by
``generate`` after each of its steps, runs one iteration of the decode loop (admission, prefill,
one decode step of every other sub-batch) before the beam step continues. The beam's model is
lent to it (``ModelStep.lend``) so the loop never switches that model's active adapter
meanwhile, and adapter attach/detach wait until the beam call returns.

Transformers cannot stream beams: each returned sequence is one event at the end, with
``beam_score`` = ``sequences_scores``; stop sequences truncate the finished text.
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
from .handle import Job
from .peft_guard import guard_models
from .rows import Row, RowFinished, finish, interruption
from .stats import StepStats
from .step import ModelStep
from .types import FinishReason, SequenceResult, TokenEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BeamKey:
    """Beam requests share one ``generate`` call only when these agree."""

    group: str
    adapter: str | None  # None = the base model
    # (num_beams, num_return_sequences, length_penalty, early_stopping, max_new_tokens)
    config: tuple[int, int, float, bool, int]


def beam_key(job: Job, group: str) -> BeamKey:
    e = job.prepared.effective
    adapter = job.prepared.adapter
    return BeamKey(
        group,
        adapter.name if adapter is not None else None,
        (e.num_beams, e.num_return_sequences, e.length_penalty, e.early_stopping, e.max_new_tokens),
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


class BeamRunner:
    """Runs one batch of beam requests through ``generate`` (worker thread)."""

    def __init__(
        self,
        step: ModelStep,
        tokenizer: Decoder,
        device: torch.device,
        pad_token_id: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.step = step
        self.tokenizer = tokenizer
        self.device = device
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids

    def run(self, key: BeamKey, jobs: list[Job], between: Between, on_done: RowFinished) -> None:
        num_beams, nrs, length_penalty, early_stopping, max_new = key.config
        rows = [job.rows[0] for job in jobs]
        width = max(len(row.prompt) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
            attention_mask[i, width - len(row.prompt) :] = 1
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
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
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
