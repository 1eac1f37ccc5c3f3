"""The batcher: the queue, the worker thread and its decode loop, one iteration at a time.

Each iteration of the loop (``_iterate``), on the worker thread:

1. run the work handed over for between steps (adapter attach/detach: ``run_between_steps``);
2. end running rows whose request was cancelled or passed its deadline; expire queued ones;
3. admit queued requests (``scheduler.py``: FIFO, by rows and KV budget);
4. one step (``_step``): prefill what the prefill budget allows, one decode forward of every
   running sub-batch, then one sampler call for every row that gets a token; a prefill forward
   (whole prompts, or a chunk of a long one) and the decode of a running sub-batch of the same
   key share one fused pass of the fast forward where the matmuls of both keep their own
   forwards' bits (see ``_fuses``);
5. rows that finished leave their sub-batch at once (``SubBatch.filter``), so the next
   iteration admits into the room they freed.

When nothing runs, the first queued request waits at most ``max_wait_ms`` for companions (so a
burst starts as one batch); while anything runs, a new request joins at the next iteration.
Beam requests run through ``generate`` (``beams.py``) and drive this same loop from its
per-step callback, so they never freeze the running batch.

Accelerator out-of-memory in a step: see ``_recover_from_oom``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from . import kv_cache
from .beams import BeamRunner, generate_key, through_generate
from .config import EngineConfig
from .errors import (
    BatchOutOfMemoryError,
    DeadlineExceededError,
    EngineUnavailableError,
    PeftServeError,
    QueueFullError,
)
from .handle import Job, flush_events
from .results import build_result
from .rows import RowFactory, accept, finish, interruption
from .running import Prefill, RunningBatch, SubBatch, SubBatchKey
from .sampler import Sampler
from .scheduler import Scheduler
from .stats import EngineStats, StepListener, StepStats
from .step import FusedInputs, ModelStep, prefill_inputs
from .types import FinishReason

logger = logging.getLogger(__name__)

# A prefill and a decode fuse only when each feeds the matmuls at least this many rows (tokens):
# MKL's sgemm on this CPU gives a row of a matmul of 4+ rows the same bits whatever the other
# rows are, while 1-3 rows take another kernel (measured for every projection shape of the
# demo model: docs/engine.md "Fused forwards"), so the fused pass keeps both forwards' numbers.
FUSE_MIN_ROWS = 4

T = TypeVar("T")


KeyFor = Callable[[Job], SubBatchKey]
# The model family's quirk partition: a row of this many tokens never shares a forward with a
# row of another partition (e.g. both sides of Phi-3 LongRoPE's switch). Default: one.
Partition = Callable[[int], Hashable]


def no_partition(length: int) -> Hashable:
    return None


@dataclass
class _Forward:
    """One forward of a step, waiting for its rows' tokens from the shared sampler call."""

    batch: SubBatch
    new: bool  # a prefilled sub-batch that joins the running batch after its first token


# A decode's (input_ids, mask, positions), and its logits once computed.
_Decode = tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor | None]


def _decode_mask(batch: SubBatch, mask: torch.Tensor | None) -> torch.Tensor | None:
    # No padding left: no mask, as transformers itself turns an all-ones mask into none for a
    # one-token query (SDPA) after summing it on every forward.
    return mask if any(batch.pads) else None


class Batcher:
    """Owns the queue and the worker thread; everything shared is guarded by ``_cond``."""

    def __init__(
        self,
        config: EngineConfig,
        step: ModelStep,
        rows: RowFactory,
        beams: BeamRunner,
        sampler: Sampler,
        key_for: KeyFor,
        model_id: str,
        pad_token_id: int,
    ) -> None:
        self._config = config
        self._step_model = step
        self._rows = rows
        self._beams = beams
        self._sampler = sampler
        self._key_for = key_for
        self.partition: Partition = no_partition
        self._model_id = model_id
        self._pad_token_id = pad_token_id
        self._cond = threading.Condition()
        self._scheduler = Scheduler(
            config.max_batch_size, config.max_batch_tokens, config.max_prefill_tokens
        )
        self._running: set[Job] = set()
        self._completed = 0
        self._histogram: Counter[int] = Counter()
        self._step_seconds_ema = 0.05  # a prior; replaced by measurements
        self._admitting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Work that must not overlap a model step (attaching/detaching adapters to a PeftModel
        # a running row may be using); the worker runs it between iterations.
        self._tasks: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._step_listeners: list[StepListener] = []
        # Worker thread only.
        self._batch = RunningBatch()
        self._prefills: list[Prefill] = []
        self._generate_waiting: list[Job] = []
        self._finished: list[Job] = []  # done in this iteration, outcome not yet published
        self._step_events: list[Job] = []  # jobs with events of this iteration's step
        self._oom_retrying: set[Job] = set()

    @property
    def _queue(self) -> list[Job]:
        return self._scheduler.queue

    # ---- lifecycle (event-loop thread) ----
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._admitting = True
            self._thread = threading.Thread(target=self._work, name="peftserve-engine", daemon=True)
            self._thread.start()

    def stop_admitting(self) -> None:
        with self._cond:
            self._admitting = False

    def outstanding(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._running)

    def tracked(self) -> int:
        """Per-request entries the batcher holds anywhere (0 when idle; more is a leak)."""
        with self._cond:
            return (
                len(self._queue)
                + len(self._running)
                + len(self._prefills)
                + len(self._generate_waiting)
                + self._batch.rows()
                + len(self._oom_retrying)
            )

    def abort_all(self, reason: str) -> None:
        """Fail queued requests with UNAVAILABLE; stop running rows at their next step."""
        with self._cond:
            queued, self._scheduler.queue = self._queue, []
            for job in self._running:
                job.cancelled = True
            self._cond.notify_all()
        for job in queued:
            self._fail(job, EngineUnavailableError(reason))

    async def join(self) -> None:
        with self._cond:
            self._stopping = True
            self._admitting = False
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)

    # ---- admission and cancellation (event-loop thread) ----
    def check_admission(self, reserved: int = 0) -> None:
        """Raise what ``admit`` would for a request now, counting ``reserved`` requests that
        are being prepared as already queued (cheap: the server calls it before preparing)."""
        with self._cond:
            self._check_admission_locked(reserved)

    def check_queue(self, reserved: int = 0) -> None:
        """``check_admission`` without the lock: a racy read of the queue's length, for the
        servicer's first look at a call (``admit`` decides for real, under the lock)."""
        self._check_admission_locked(reserved)

    def _check_admission_locked(self, reserved: int) -> None:
        if not self._admitting:
            raise EngineUnavailableError(
                "the engine is not accepting requests (not started or draining)"
            )
        waiting = len(self._queue) + reserved
        if waiting >= self._config.max_queue_size:
            raise QueueFullError(waiting, retry_after_s(waiting, self._config, self.step_seconds))

    @property
    def step_seconds(self) -> float:
        """Recent model step time (an exponential moving average; a prior before any step)."""
        return self._step_seconds_ema

    def admit(self, job: Job) -> None:
        with self._cond:
            self._check_admission_locked(0)
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._cond:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
                job.done = True
                self._completed += 1
        if queued:
            job.publish_outcome(build_result(job, FinishReason.CANCELLED, self._model_id))

    def stats(self) -> EngineStats:
        with self._cond:
            running = list(self._running)
            queued = list(self._queue)
            return EngineStats(
                queued=len(queued),
                running=len(running),
                completed=self._completed,
                batch_size_histogram=dict(self._histogram),
                running_rows=sum(j.prepared.model_rows for j in running),
                kv_tokens_used=sum(j.prepared.padded_tokens for j in running),
                kv_tokens_budget=self._config.max_batch_tokens,
                running_adapters=_adapter_names(running),
                waiting_adapters=_adapter_names(queued),
            )

    def add_step_listener(self, listener: StepListener) -> Callable[[], None]:
        """Call ``listener`` on the worker thread after every step; returns the unsubscribe."""
        with self._cond:
            self._step_listeners.append(listener)

        def unsubscribe() -> None:
            with self._cond:
                if listener in self._step_listeners:
                    self._step_listeners.remove(listener)

        return unsubscribe

    def _report_step(self, step: StepStats) -> None:
        for listener in list(self._step_listeners):
            try:
                listener(step)
            except Exception:  # a listener's bug must not fail the step
                logger.exception("step listener failed")

    # ---- between steps ----
    def run_between_steps(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the worker thread between two model steps; a future of its result.

        Never while a beam search's ``generate`` call is running. Before the worker starts (or
        after it stopped) nothing can be running, so ``fn`` runs right here.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            thread = self._thread
            if thread is not None and thread.is_alive() and not self._stopping:
                self._tasks.append((fn, future))
                self._cond.notify_all()
                return future
        _run_task(fn, future)
        return future

    def _run_tasks(self) -> None:
        with self._cond:
            tasks, self._tasks = self._tasks, []
        for fn, future in tasks:
            _run_task(fn, future)

    # ---- worker thread ----
    def _work(self) -> None:
        while True:
            self._run_tasks()
            if not self._wait_for_work():
                self._run_tasks()  # nothing runs any more: finish what was handed over
                return
            if self._generate_waiting:
                self._run_generate()
            else:
                self._iterate()

    def _busy(self) -> bool:
        return bool(self._prefills or self._generate_waiting or self._batch.rows())

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once the batcher stops."""
        max_wait_s = self._config.max_wait_ms / 1000.0
        with self._cond:
            while True:
                if self._stopping:
                    return False
                self._expire_queued_locked()
                if self._tasks or self._busy():
                    return True
                if not self._queue:
                    self._cond.wait(timeout=self._nearest_deadline_wait())
                    continue
                # Idle: the head waits briefly for companions, so a burst starts together.
                head = self._queue[0]
                rows = sum(j.prepared.model_rows for j in self._queue)
                wait = head.enqueued_at + max_wait_s - time.monotonic()
                if wait > 0 and rows < self._config.max_batch_size and self._admitting:
                    deadline_wait = self._nearest_deadline_wait()
                    self._cond.wait(
                        timeout=wait if deadline_wait is None else min(wait, deadline_wait)
                    )
                    continue
                return True

    def _iterate(self, beam_step: StepStats | None = None) -> None:
        """One loop iteration; any failure fails the running requests, never the server.

        ``beam_step``: the beam search step that ran just before (when a beam's ``generate``
        drives the loop), reported together with this iteration's own step.
        """
        failed_oom = False
        try:
            self._interrupt()
            self._admit()
            stats = self._step()
            if beam_step is not None:
                stats = beam_step if stats is None else _combined(stats, beam_step)
            if stats is not None:
                self._report_step(stats)
        except torch.OutOfMemoryError:
            failed_oom = True
        except Exception as e:  # a bug or a device error: fail what ran, keep serving
            logger.exception("decode step failed")
            error = PeftServeError(f"internal error while generating: {type(e).__name__}: {e}")
            for job in self._step_jobs():
                self._fail(job, error)
            self._batch.clear()
            self._prefills.clear()
        if failed_oom:
            # Outside the except clause: only now are the failed step's frames (activations,
            # caches) released, so memory can really be returned before anything is retried.
            self._recover_from_oom()
        events, self._step_events = self._step_events, []
        if events:
            flush_events(events)
        self._publish_finished()

    def _step_jobs(self) -> list[Job]:
        jobs = [p.job for p in self._prefills]
        for batch in self._batch:
            jobs.extend(batch.jobs())
        return list(dict.fromkeys(jobs))

    def _interrupt(self) -> None:
        """End cancelled / deadline-passed rows now; they leave before the next forward."""
        for batch in self._batch:
            for job in batch.jobs():
                reason = interruption(job)
                if reason is not None:
                    for row in job.rows:
                        finish(row, reason, self._job_finished)
            batch.filter([i for i, row in enumerate(batch.rows) if not row.finished])
        self._batch.drop_empty()
        kept: list[Prefill] = []
        for prefill in self._prefills:
            reason = interruption(prefill.job)
            if reason is None:
                kept.append(prefill)
            else:
                for row in prefill.rows:
                    finish(row, reason, self._job_finished)
        self._prefills = kept
        for job in list(self._generate_waiting):
            reason = interruption(job)
            if reason is not None:
                self._generate_waiting.remove(job)
                for row in job.rows:
                    finish(row, reason, self._job_finished)

    def _admit(self) -> None:
        now = time.monotonic()
        with self._cond:
            self._expire_queued_locked()
            rows = sum(j.prepared.model_rows for j in self._running)
            kv = sum(j.prepared.padded_tokens for j in self._running)
            admitted = self._scheduler.admit(rows, kv)
            for job in admitted:
                self._running.add(job)
                if job.started_at is None:
                    job.started_at = now
        for job in admitted:
            prepared = job.prepared
            if through_generate(job):
                copies = 1 if prepared.beams else prepared.effective.num_return_sequences
                job.rows = self._rows.rows(job, copies, seeded=not prepared.beams)
                self._generate_waiting.append(job)
                continue
            job.rows = self._rows.rows(job, prepared.effective.num_return_sequences)
            key = dataclasses.replace(
                self._key_for(job), partition=self.partition(len(prepared.prompt_ids))
            )
            self._prefills.append(Prefill(job, job.rows, key))

    # ---- the step ----
    def _step(self) -> StepStats | None:
        started = time.monotonic()
        # A beam search may hold a model on another adapter: those sub-batches wait.
        decoding = [b for b in self._batch if self._step_model.can_run(b.key)]
        forwards, prefill_tokens, fused = self._prefill(decoding)
        decode_tokens = 0
        for batch in decoding:
            # A sub-batch a prefill tried to fuse with has its inputs made (``decode_inputs``
            # extends the mask: once a step), and its logits when the fused pass ran.
            inputs, logits = fused.get(id(batch), (None, None))
            if logits is None:
                input_ids, mask, positions = inputs or batch.decode_inputs()
                logits = self._step_model.forward(
                    batch.key,
                    batch.rows,
                    input_ids,
                    _decode_mask(batch, mask),
                    positions,
                    batch.cache,
                )
            batch.advance()
            forwards.append((_Forward(batch, new=False), logits))
            decode_tokens += len(batch)
        if not forwards:
            return None
        for f, _ in forwards:
            jobs = f.batch.jobs()
            for job in jobs:
                job.batch_size = max(job.batch_size, len(jobs))
        rows = [row for f, _ in forwards for row in f.batch.rows]
        logits = torch.cat([lg for _, lg in forwards]) if len(forwards) > 1 else forwards[0][1]
        choices = self._sampler.choose(logits, rows)
        offset = 0
        for f, _ in forwards:
            n = len(f.batch)
            f.batch.next_tokens = choices.tokens[offset : offset + n]
            for i, row in enumerate(f.batch.rows):
                if row.dead_end:
                    finish(row, FinishReason.CONSTRAINT_DEAD_END, self._job_finished)
                    continue
                accept(
                    row,
                    choices.token_ids[offset + i],
                    choices.logprobs[offset + i],
                    self._job_finished,
                )
            offset += n
        # Newly prefilled rows join the running batch (merged where exact, one merge per cohort).
        self._batch.add([f.batch for f, _ in forwards if f.new])
        self._leave_and_move()
        # Handed to the event loop once this step's StepStats is reported (_iterate): whoever
        # sees a token can count the step that made it (the engine process sends both at once).
        self._step_events = list(dict.fromkeys(row.job for row in rows))
        seconds = time.monotonic() - started
        self._step_seconds_ema = 0.9 * self._step_seconds_ema + 0.1 * seconds
        if len(self._oom_retrying) == 0:
            self._scheduler.row_cap = self._config.max_batch_size
        return StepStats(prefill_tokens, decode_tokens, len(rows), seconds)

    def _prefill(
        self, decoding: list[SubBatch]
    ) -> tuple[list[tuple[_Forward, torch.Tensor]], int, dict[int, _Decode]]:
        """This step's prompt work: whole prompts by key, then chunks of long ones. A key's
        whole prompts, and each chunk, fuse with the decode of a sub-batch of ``decoding`` of
        the same key where ``_fuses`` allows (one sub-batch per prefill forward); for such a
        sub-batch the result maps its ``id`` to its decode inputs and, when the fused pass
        ran, its logits (its decode is then done)."""
        plan = self._scheduler.plan_prefill(self._prefills, self.partition)
        forwards: list[tuple[_Forward, torch.Tensor]] = []
        fused: dict[int, _Decode] = {}
        tokens = 0
        done: set[int] = set()
        step = self._step_model
        device = step.device
        for key, group in plan.whole.items():
            if not step.can_run(key):
                continue
            prompts = [p.ids for p in group]
            input_ids, mask, positions, pads = prefill_inputs(prompts, self._pad_token_id, device)
            cache = kv_cache.new_cache(step.model_config)
            rows = [p.rows[0] for p in group]
            prompt_mask = mask if any(pads) else None  # generate drops an all-ones mask too
            part = (rows, input_ids, prompt_mask, positions, cache)
            logits = self._prefill_forward(key, part, decoding, fused)
            forwards.append(self._joined(key, group, logits, cache, mask, pads))
            tokens += sum(len(p) for p in prompts)
            done.update(id(p) for p in group)
        for prefill, take in plan.chunks:
            if not step.can_run(prefill.key):
                continue
            if prefill.cache is None:
                prefill.cache = kv_cache.new_cache(step.model_config)
            start = prefill.done
            chunk = torch.tensor(
                [prefill.ids[start : start + take]], dtype=torch.long, device=device
            )
            positions = torch.arange(start, start + take, device=device).unsqueeze(0)
            part = (prefill.rows[:1], chunk, None, positions, prefill.cache)
            logits = self._prefill_forward(prefill.key, part, decoding, fused)
            prefill.done += take
            tokens += take
            if prefill.remaining == 0:
                width = len(prefill.ids)
                mask = torch.ones((1, width), dtype=torch.long, device=device)
                forwards.append(
                    self._joined(prefill.key, [prefill], logits, prefill.cache, mask, [0])
                )
                done.add(id(prefill))
        self._prefills = [p for p in self._prefills if id(p) not in done]
        return forwards, tokens, fused

    def _prefill_forward(
        self,
        key: SubBatchKey,
        part: FusedInputs,
        decoding: list[SubBatch],
        fused: dict[int, _Decode],
    ) -> torch.Tensor:
        """The logits of one prefill forward (whole prompts or a chunk, ``part``), fused with
        the decode of a sub-batch of ``decoding`` where ``_fuses`` finds one and the fast
        forward takes both; ``fused`` records that sub-batch's inputs (and logits if fused)."""
        step = self._step_model
        partner = self._fuses(key, part[1], decoding, fused)
        if partner is not None:
            d_ids, d_mask, d_positions = d_inputs = partner.decode_inputs()
            fused[id(partner)] = (d_inputs, None)
            decode = (partner.rows, d_ids, _decode_mask(partner, d_mask), d_positions)
            both = step.forward_fused(key, [(*decode, partner.cache), part])
            if both is not None:
                fused[id(partner)] = (d_inputs, both[0])
                return both[1]
        return step.forward(key, *part)

    @staticmethod
    def _fuses(
        key: SubBatchKey,
        prompt_ids: torch.Tensor,
        decoding: list[SubBatch],
        fused: dict[int, _Decode],
    ) -> SubBatch | None:
        """The running sub-batch a prefill of ``key`` shares its pass with, if any: one of the
        same key, not fused yet, and both feeding the matmuls ``FUSE_MIN_ROWS`` rows or more
        (the step's fast forward still decides whether it takes the pair)."""
        if prompt_ids.numel() < FUSE_MIN_ROWS:
            return None
        for batch in decoding:
            if batch.key == key and len(batch) >= FUSE_MIN_ROWS and id(batch) not in fused:
                return batch
        return None

    def _joined(
        self,
        key: SubBatchKey,
        group: list[Prefill],
        logits: torch.Tensor,
        cache: Any,
        mask: torch.Tensor,
        pads: list[int],
    ) -> tuple[_Forward, torch.Tensor]:
        """The sub-batch prefilled prompts become (one row per returned sequence: a prompt
        is fed once and its cache row repeated), with the matching logits."""
        index = [i for i, p in enumerate(group) for _ in p.rows]
        rows = [row for p in group for row in p.rows]
        if index != list(range(len(group))):
            select = torch.tensor(index, dtype=torch.long, device=mask.device)
            kv_cache.select_rows(cache, select)
            mask = mask.index_select(0, select)
            logits = logits.index_select(0, select)
        lengths = [len(group[i].ids) for i in index]
        positions = torch.tensor(lengths, dtype=torch.long, device=mask.device)
        batch = SubBatch(key, rows, cache, mask, [pads[i] for i in index], positions)
        return _Forward(batch, new=True), logits

    def _leave_and_move(self) -> None:
        """Finished rows leave now; a row whose quirk partition changed starts over in it.

        Starting over means its whole history (prompt + tokens) is fed again as a prefill of
        the new partition, ahead of other prompts: that is what ``generate`` does at Phi-3's
        LongRoPE switch (``Phi3ForCausalLM.prepare_inputs_for_generation`` drops the cache
        the first time the sequence outgrows the short factors), so the row keeps its solo
        tokens.
        """
        restarts: list[Prefill] = []
        for batch in self._batch:
            keep: list[int] = []
            for i, row in enumerate(batch.rows):
                if row.finished:
                    continue
                partition = self.partition(row.length)
                if partition == batch.key.partition:
                    keep.append(i)
                    continue
                key = dataclasses.replace(batch.key, partition=partition)
                ids = row.prompt + tuple(row.tokens)
                restarts.append(Prefill(row.job, [row], key, ids=ids))
            batch.filter(keep)
        self._batch.drop_empty()
        self._prefills[:0] = restarts

    # ---- requests through generate (beams, prompt learning) ----
    def _generate_key(self, job: Job) -> Any:
        return generate_key(job, self._key_for(job).group, self.partition is not no_partition)

    def _run_generate(self) -> None:
        head = self._generate_waiting[0]
        key = self._generate_key(head)
        cap = max(self._scheduler.row_cap, head.prepared.model_rows)
        jobs: list[Job] = []
        rows = 0
        for job in list(self._generate_waiting):
            if self._generate_key(job) == key and rows + job.prepared.model_rows <= cap:
                jobs.append(job)
                rows += job.prepared.model_rows
        for job in jobs:
            self._generate_waiting.remove(job)
            job.batch_size = len(jobs)
        failed_oom = False
        try:
            self._beams.run(key, jobs, self._iterate, self._job_finished)
        except torch.OutOfMemoryError:
            failed_oom = True
        except Exception as e:
            logger.exception("generate failed")
            error = PeftServeError(f"internal error while generating: {type(e).__name__}: {e}")
            for job in jobs:
                self._fail(job, error)
        if failed_oom:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._retry_or_fail([j for j in jobs if not j.done], alone=len(jobs) == 1)
        self._publish_finished()

    # ---- out of memory ----
    def _recover_from_oom(self) -> None:
        """An accelerator OOM in a step: free it, then retry what can be retried invisibly.

        Every request of the running batch is taken out (the failed step may have grown some
        caches and not others). A request whose tokens nobody has seen - unary, or a stream
        that has not produced a token - goes back to the head of the queue and restarts from
        its prompt with the same seeds, so it gets the same tokens; a stream that already
        produced tokens fails with ``BatchOutOfMemoryError`` (RESOURCE_EXHAUSTED), as does a
        request that ran out of memory alone. Until the retried requests are done, admission
        allows half the rows the failed step had.
        """
        jobs = self._step_jobs()
        rows = self._batch.rows() + sum(len(p.rows) for p in self._prefills)
        self._batch.clear()
        self._prefills.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pending = [job for job in jobs if not job.done]
        logger.warning(
            "out of memory in a step of %d rows (%d requests); retrying what is invisible",
            rows,
            len(pending),
        )
        self._scheduler.row_cap = max(1, rows // 2)
        self._retry_or_fail(pending, alone=len(pending) == 1)

    def _retry_or_fail(self, jobs: list[Job], alone: bool) -> None:
        retry: list[Job] = []
        for job in jobs:
            if alone or (job.handle.stream and _produced_tokens(job)):
                why = "even alone" if alone else "after this stream had started"
                self._oom_retrying.discard(job)
                self._fail(
                    job,
                    BatchOutOfMemoryError(
                        f"the accelerator ran out of memory {why}; "
                        "retry later or lower max_new_tokens / num_beams"
                    ),
                )
            else:
                retry.append(job)
        for job in retry:
            job.rows = []
            job.pending_events = []
            job.batch_size = 1
            self._oom_retrying.add(job)
        with self._cond:
            for job in retry:
                self._running.discard(job)
            self._scheduler.queue[:0] = retry

    # ---- queue deadlines ----
    def _nearest_deadline_wait(self) -> float | None:
        deadlines = [
            j.prepared.request.deadline
            for j in self._queue
            if j.prepared.request.deadline is not None
        ]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire_queued_locked(self) -> None:
        expired = [j for j in self._queue if j.deadline_passed]
        for job in expired:
            self._queue.remove(job)
            job.done = True
            self._oom_retrying.discard(job)
            self._completed += 1
            job.publish_outcome(
                DeadlineExceededError(
                    f"request {job.request_id!r} passed its deadline while queued"
                )
            )

    # ---- outcomes ----
    def _fail(self, job: Job, error: BaseException) -> None:
        with self._cond:
            if job.done:
                return
            job.done = True
            self._running.discard(job)
            self._completed += 1
        job.publish_outcome(error)

    def _job_finished(self, job: Job) -> None:
        with self._cond:
            if job.done:
                return
            job.done = True
            self._running.discard(job)
            self._completed += 1
            self._histogram[job.batch_size] += 1
        self._oom_retrying.discard(job)
        # Published once the step is over (its rows have left, its stats are reported), so a
        # caller that got its result sees an engine that no longer holds it.
        self._finished.append(job)

    def _publish_finished(self) -> None:
        finished, self._finished = self._finished, []
        for job in finished:
            job.publish_outcome(build_result(job, FinishReason.CANCELLED, self._model_id))


def retry_after_s(waiting: int, config: EngineConfig, step_seconds: float) -> float:
    """A full queue's retry hint: about how long until it moves, i.e. the requests ahead, a
    batch at a time, each taking its tokens' worth of recent steps (at least 0.1 s)."""
    batches_ahead = waiting / max(1, config.max_batch_size) + 1
    return max(0.1, step_seconds * config.default_max_new_tokens * batches_ahead)


def _combined(a: StepStats, b: StepStats) -> StepStats:
    return StepStats(
        a.prefill_tokens + b.prefill_tokens,
        a.decode_tokens + b.decode_tokens,
        a.rows + b.rows,
        a.seconds + b.seconds,
    )


def _run_task(fn: Callable[[], T], future: concurrent.futures.Future[T]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as error:  # handed to the waiting caller, never raised here
        future.set_exception(error)


def _adapter_names(jobs: list[Job]) -> tuple[str, ...]:
    return tuple(sorted({j.prepared.adapter.name for j in jobs if j.prepared.adapter is not None}))


def _produced_tokens(job: Job) -> bool:
    return any(row.tokens for row in job.rows) or bool(job.pending_events)
