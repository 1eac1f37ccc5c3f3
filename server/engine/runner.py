"""Model runner: turns one formed batch into a single ``PeftModel.generate`` call.

It left-pads the prompts, picks the model of the batch's adapter type group, passes
``adapter_names`` for mixed LoRA batches, and hands per-row work to ``rows.py``. ``generate``
always gets an explicit GenerationConfig and the models' own ``generation_config`` is replaced
by an empty one at load time, so nothing from the model's defaults leaks into a batch: the
model's defaults live on in each request's own GenerationConfig (see ``validation.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from .detokenize import Decoder, TextStream
from .handle import Job
from .peft_guard import guard_models
from .registry import BASE_ROW_MARKER, AdapterRegistry
from .rows import BatchState, Row, RowLogitsProcessor, RowStoppingCriteria
from .structured import RowConstraint
from .types import FinishReason, SequenceResult, TokenEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchKey:
    """Requests share a batch only when these agree (see ``batcher.py`` for why)."""

    group: str  # "base" (plain base model) or a PEFT type group, e.g. "LORA"
    adapter: str | None  # set for adapters that cannot be mixed: the batch runs it alone
    # (num_beams, num_return_sequences, length_penalty, early_stopping, max_new_tokens)
    beam: tuple[int, int, float, bool, int] | None = None
    # Rows whose output depends on their neighbours apart (see mixing.py and quirks.py):
    # the prompt length for prompt-learning adapters, the LongRoPE side of the call.
    partition: tuple[int, ...] = ()
    # > 0: the batch's longest prompt + largest max_new_tokens - 1 must not exceed it (the
    # positions a LongRoPE batch may reach before transformers switches its RoPE factors).
    length_limit: int = 0


@dataclass
class Batch:
    key: BatchKey
    jobs: list[Job]


class _BeamKwargWarningFilter(logging.Filter):
    """Drops transformers' deprecation notice about ``num_beams`` given twice.

    peft expands ``adapter_names`` for beam search only when ``num_beams`` is a ``generate``
    keyword, so beam batches must pass it both ways; the notice would otherwise be logged for
    every beam batch.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "together with generation-related arguments" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_BeamKwargWarningFilter())


class ModelRunner:
    """Runs batches on the worker thread; reports progress through ``BatchState`` callbacks."""

    def __init__(
        self,
        registry: AdapterRegistry,
        tokenizer: Decoder,
        device: torch.device,
        pad_token_id: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.registry = registry
        self.tokenizer = tokenizer
        self.device = device
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self._token_text_cache: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text_cache[token_id] = text
        return text

    def _model_for(self, key: BatchKey) -> Any:
        if key.group == "base":
            return self.registry.base
        model = self.registry.groups[key.group].model
        if key.adapter is not None:
            model.set_adapter(key.adapter)
        return model

    def _processors(self, job: Job) -> LogitsProcessorList:
        config: GenerationConfig = job.prepared.generation_config
        config._eos_token_tensor = torch.tensor(self.eos_token_ids, device=self.device)
        base: Any = self.registry.base  # a PreTrainedModel; its methods confuse mypy
        return base._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=len(job.prepared.prompt_ids),
            logits_processor=LogitsProcessorList(),
            device=str(self.device),
            model_kwargs=None,
        )

    def _make_row(self, job: Job, index: int, processors: LogitsProcessorList, seeded: bool) -> Row:
        prepared = job.prepared
        e = prepared.effective
        generator = None
        if seeded and e.do_sample:
            # Row i of a request draws from seed + i: reproducible, independent of neighbours.
            generator = torch.Generator(device=self.device)
            generator.manual_seed((e.seed + index) % (2**64))
        options = prepared.request.options
        stop_ids = frozenset(self.eos_token_ids) | frozenset(prepared.extra_stop_ids)
        constraint = None
        if prepared.constraint is not None:
            constraint = RowConstraint(prepared.constraint, stop_ids)
        return Row(
            job=job,
            index=index,
            prompt_len=len(prepared.prompt_ids),
            processors=processors,
            generator=generator,
            max_new_tokens=e.max_new_tokens,
            eos_ids=stop_ids,
            stream=TextStream(self.tokenizer, e.stop_sequences, options.skip_special_tokens),
            logprobs_top_n=options.top_logprobs if options.return_logprobs else None,
            constraint=constraint,
        )

    def run(
        self,
        batch: Batch,
        on_job_finished: Callable[[Job], None],
        on_step: Callable[[], None],
    ) -> None:
        """Generate for every job in ``batch``; each job is finished through ``on_job_finished``."""
        key = batch.key
        jobs = batch.jobs
        beams = key.beam is not None
        prompts: list[tuple[int, ...]] = []
        rows: list[Row] = []
        adapter_names: list[str] = []
        for job in jobs:
            processors = self._processors(job)
            name = job.prepared.adapter.name if job.prepared.adapter else BASE_ROW_MARKER
            copies = 1 if beams else job.prepared.effective.num_return_sequences
            job.rows = [self._make_row(job, i, processors, seeded=not beams) for i in range(copies)]
            for row in job.rows:
                rows.append(row)
                prompts.append(job.prepared.prompt_ids)
                adapter_names.append(name)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            # Left padding: every row's next token is at the same position.
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt) :] = 1
        state = BatchState(
            rows=rows,
            jobs=jobs,
            padded_prompt_len=width,
            token_text=self.token_text,
            on_job_finished=on_job_finished,
            on_step=on_step,
            beams=beams,
            num_beams=key.beam[0] if key.beam else 1,
        )
        # Whatever generate raises, no hook, active adapter or swapped method of a shared
        # model survives it (see peft_guard.py); the batcher then fails or retries the batch.
        with guard_models(self.registry.models()):
            output = self._generate(key, state, input_ids, attention_mask, adapter_names)
        if beams:
            self._finish_beams(state, output, width)
        for row in rows:
            # Only reachable if generate stopped early for a reason of its own.
            state.finish_row(row, FinishReason.LENGTH)

    def _generate(
        self,
        key: BatchKey,
        state: BatchState,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        adapter_names: list[str],
    ) -> Any:
        """The one ``generate`` call of a batch, on the model of its adapter type group."""
        jobs = state.jobs
        model = self._model_for(key)
        kwargs: dict[str, Any] = {}
        if key.group != "base" and key.adapter is None:
            distinct = set(adapter_names)
            if len(distinct) > 1:
                kwargs["adapter_names"] = adapter_names
            elif BASE_ROW_MARKER in distinct:
                # Only base rows: the untouched base model (its tensors are the group's own).
                model = self.registry.base
            else:
                # One adapter only: peft's per-row routing (_mixed_batch_forward) costs ~30% of
                # a forward on small models; the plain adapter forward gives the same rows.
                model.set_adapter(adapter_names[0])
        settings: dict[str, Any] = {
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": max(job.prepared.effective.max_new_tokens for job in jobs),
            "pad_token_id": self.pad_token_id,
            # Rows stop through RowStoppingCriteria; transformers' EOS handling is only for beams.
            "eos_token_id": None,
        }
        if key.beam is not None:
            num_beams, nrs, length_penalty, early_stopping, max_new = key.beam
            settings.update(
                num_beams=num_beams,
                eos_token_id=list(self.eos_token_ids) or None,
                num_return_sequences=nrs,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                max_new_tokens=max_new,
                return_dict_in_generate=True,
                output_scores=True,
            )
            # peft expands adapter_names for beams only when num_beams is a generate kwarg.
            kwargs["num_beams"] = num_beams
        config = GenerationConfig(**settings)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([RowLogitsProcessor(state)]),
                stopping_criteria=StoppingCriteriaList(
                    [
                        RowStoppingCriteria(
                            state, self.eos_token_ids[0] if self.eos_token_ids else -1
                        )
                    ]
                ),
                **kwargs,
            )
        return output

    def _finish_beams(self, state: BatchState, output: Any, width: int) -> None:
        """Beam results exist only at the end: decode each returned sequence, then publish."""
        assert state.jobs[0].prepared.effective.num_return_sequences >= 1
        sequences = output.sequences.tolist()
        scores = output.sequences_scores.tolist()
        cursor = 0
        for job in state.jobs:
            nrs = job.prepared.effective.num_return_sequences
            chunk = range(cursor, cursor + nrs)
            cursor += nrs
            if job.done:
                continue
            row = job.rows[0]
            results = []
            for index, s in enumerate(chunk):
                tokens = sequences[s][width:]
                for pos, tok in enumerate(tokens):
                    if tok in self.eos_token_ids:
                        tokens = tokens[: pos + 1]
                        break
                options = job.prepared.request.options
                stream = TextStream(
                    self.tokenizer,
                    job.prepared.effective.stop_sequences,
                    options.skip_special_tokens,
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
                results.append(
                    SequenceResult(
                        index, stream.text, tuple(kept), reason, beam_score=float(scores[s])
                    )
                )
            job.beam_sequences = results
            for r in results:
                job.publish_event(TokenEvent(r.index, r.token_ids, r.text))
            row.finish_reason = FinishReason.LENGTH
            state.on_job_finished(job)
