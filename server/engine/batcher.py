"""The batcher: bounded FIFO queue, batch formation, the worker thread and result fan-out.

Batch formation. The oldest queued request (the head) always goes into the next batch, so no
request starves; younger requests join it in FIFO order while they share its ``BatchKey`` and
fit ``max_batch_size`` (model rows), the padded-token budget ``max_batch_tokens`` (rows x
(longest prompt + largest max_new_tokens)) and the context window. The head waits at most
``max_wait_ms`` for companions. A head that alone exceeds the budget still runs, alone.

What splits batches (``BatchKey``), and why - nothing else does:

* the adapter type group: one ``PeftModel`` per PEFT type (peft cannot mix types in one);
* an adapter that cannot be mixed (anything but plain LoRA): peft's ``adapter_names`` is
  silently ignored by e.g. IA3, so such an adapter runs in batches of its own;
* beam search: ``generate`` takes one ``num_beams``, ``num_return_sequences``,
  ``length_penalty`` and ``early_stopping`` per call, and beam hypotheses end only at EOS or
  the call's length limit, so beam requests batch only with the same beam configuration
  and ``max_new_tokens``.

* rows whose output depends on their neighbours (``BatchKey.partition``): prompt-learning
  adapters batch only with prompts of the same length, and LongRoPE models never mix rows on
  both sides of the RoPE switch (see ``mixing.py`` and ``quirks.py``).

Sampling parameters, seeds, ``num_return_sequences`` without beams, stop sequences, EOS,
``max_new_tokens``, penalties, bad words and logprobs are all per row (see ``rows.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .config import EngineConfig
from .errors import (
    BatchOutOfMemoryError,
    DeadlineExceededError,
    EngineUnavailableError,
    PeftServeError,
    QueueFullError,
)
from .handle import Job
from .runner import Batch, BatchKey, ModelRunner
from .types import FinishReason, GenerationResult, SequenceResult

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _TasksPending:
    """Returned by ``_next_batch`` when work between batches (adapter loads) is waiting."""


_TASKS_PENDING = _TasksPending()


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, read by metrics and admission decisions."""

    queued: int  # requests admitted and waiting to run
    running: int  # requests with rows in the running batch
    completed: int
    # Requests per batch -> number of batches of that size.
    batch_size_histogram: dict[int, int] = field(default_factory=dict)
    running_rows: int = 0  # model rows (sequences, beams) of the running requests
    # KV-cache tokens reserved by running requests, and the budget they are admitted against.
    kv_tokens_used: int = 0
    kv_tokens_budget: int = 0
    # Distinct adapter names ("" = base excluded) of running and of queued requests.
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()

    @property
    def kv_cache_utilization(self) -> float:
        """``kv_tokens_used`` as a fraction of the budget (0.0 with no budget)."""
        if self.kv_tokens_budget <= 0:
            return 0.0
        return min(1.0, self.kv_tokens_used / self.kv_tokens_budget)


@dataclass(frozen=True)
class StepStats:
    """One forward step of the running batch, reported to step listeners (worker thread)."""

    prefill_tokens: int  # prompt tokens fed through the model in this step
    decode_tokens: int  # rows that produced a token in this step
    rows: int  # model rows in the forward
    seconds: float  # wall time of the step


StepListener = Callable[[StepStats], None]


class Batcher:
    """Owns the queue and the worker thread; everything shared is guarded by ``_cond``."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        key_for: Callable[[Job], BatchKey],
        model_id: str,
        context_length: int,
    ) -> None:
        self._config = config
        self._runner = runner
        self._key_for = key_for
        self._model_id = model_id
        self._context_length = context_length
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._keys: dict[int, BatchKey] = {}
        self._running: set[Job] = set()
        self._completed = 0
        self._histogram: Counter[int] = Counter()
        self._batch_seconds_ema = 0.5  # a prior; replaced by measurements
        self._admitting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Work that must not overlap a batch (attaching/detaching adapters to a PeftModel the
        # running batch may be using); the worker runs it before forming the next batch.
        self._tasks: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._step_listeners: list[StepListener] = []

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

    def abort_all(self, reason: str) -> None:
        """Fail queued requests with UNAVAILABLE; stop running rows at their next step."""
        with self._cond:
            queued, self._queue = self._queue, []
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

    def _check_admission_locked(self, reserved: int) -> None:
        if not self._admitting:
            raise EngineUnavailableError(
                "the engine is not accepting requests (not started or draining)"
            )
        waiting = len(self._queue) + reserved
        if waiting >= self._config.max_queue_size:
            batches_ahead = waiting / max(1, self._config.max_batch_size) + 1
            raise QueueFullError(waiting, max(0.1, self._batch_seconds_ema * batches_ahead))

    def admit(self, job: Job) -> None:
        key = self._key_for(job)
        with self._cond:
            self._check_admission_locked(0)
            self._keys[id(job)] = key
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._cond:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
                # Every path out of the queue must drop the job's key, or each cancel leaks one.
                self._keys.pop(id(job), None)
                job.done = True
                self._completed += 1
        if queued:
            job.publish_outcome(self._result(job, FinishReason.CANCELLED))

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
            except Exception:  # a listener's bug must not fail the batch
                logger.exception("step listener failed")

    # ---- worker thread ----
    def run_between_batches(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the worker thread when no batch is running; a future of its result.

        Before the worker starts (or after it stopped) nothing can be running, so ``fn`` runs
        right here.
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

    def _work(self) -> None:
        while True:
            self._run_tasks()
            batch = self._next_batch()
            if isinstance(batch, _TasksPending):
                continue
            if batch is None:
                self._run_tasks()  # nothing runs any more: finish what was handed over
                return
            started = time.monotonic()
            try:
                self._run_splitting_on_oom(batch)
            except Exception as e:  # a bug or a device error: fail the batch, keep serving
                logger.exception("batch failed")
                for job in batch.jobs:
                    self._fail(
                        job,
                        PeftServeError(f"internal error while generating: {type(e).__name__}: {e}"),
                    )
            elapsed = time.monotonic() - started
            with self._cond:
                self._batch_seconds_ema = 0.8 * self._batch_seconds_ema + 0.2 * elapsed

    def _run_splitting_on_oom(self, batch: Batch) -> None:
        """Run a batch; on accelerator OOM retry its requests in halves where that is invisible.

        A retry is invisible for every request whose tokens nobody has seen: unary requests
        (their rows are rebuilt with the same seeds, so they get the same tokens) and streams
        that have not produced a token yet. A stream that already emitted tokens cannot be
        restarted without the client seeing text twice, and a request that does not fit even
        alone cannot be helped; both fail with BatchOutOfMemoryError (RESOURCE_EXHAUSTED).
        The other requests and the server carry on.
        """
        if self._run_catching_oom(batch):
            return
        # Only here, outside the ``except`` clause, are the failed attempt's frames (and the
        # activations and KV cache they reference) released, so the cache can really shrink
        # before the retry; inside the clause the traceback would keep them alive.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pending = [job for job in batch.jobs if not job.done]
        streamed = [job for job in pending if job.handle.stream and _produced_tokens(job)]
        retry = [job for job in pending if job not in streamed]
        for job in streamed:
            self._fail(
                job,
                BatchOutOfMemoryError(
                    "the accelerator ran out of memory after this stream had started; "
                    "retry later or lower max_new_tokens / num_beams"
                ),
            )
        if len(batch.jobs) > 1 and retry:
            logger.warning(
                "out of memory on a batch of %d requests; retrying %d in halves",
                len(batch.jobs),
                len(retry),
            )
            half = len(retry) // 2
            for part in (retry[:half], retry[half:]):
                if not part:
                    continue
                for job in part:
                    job.batch_size = len(part)
                    job.rows = []
                    job.pending_events = []
                self._run_splitting_on_oom(Batch(batch.key, part))
            return
        for job in retry:
            logger.error("out of memory on request %r alone; failing it", job.request_id)
            self._fail(
                job,
                BatchOutOfMemoryError(
                    "the accelerator ran out of memory for this request even alone; "
                    "retry later or lower max_new_tokens / num_beams"
                ),
            )

    def _run_catching_oom(self, batch: Batch) -> bool:
        """Run the batch; False if the accelerator ran out of memory."""
        rows = sum(j.prepared.model_rows for j in batch.jobs)
        prompt_tokens = sum(j.prepared.model_rows * len(j.prepared.prompt_ids) for j in batch.jobs)
        last = [time.monotonic(), True]  # [time of the previous step's end, first step pending]

        def on_step() -> None:
            # generate's stopping criteria run once per step, right after its forward.
            now = time.monotonic()
            first = bool(last[1])
            self._report_step(
                StepStats(
                    prefill_tokens=prompt_tokens if first else 0,
                    decode_tokens=rows,
                    rows=rows,
                    seconds=now - float(last[0]),
                )
            )
            last[0], last[1] = now, False
            self._expire_queued()

        try:
            self._runner.run(batch, self._job_finished, on_step)
        except torch.OutOfMemoryError:
            return False
        return True

    def _next_batch(self) -> Batch | _TasksPending | None:
        max_wait_s = self._config.max_wait_ms / 1000.0
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._tasks:
                    return _TASKS_PENDING
                self._expire_queued_locked()
                if not self._queue:
                    self._cond.wait(timeout=self._nearest_deadline_wait())
                    continue
                head = self._queue[0]
                jobs = self._compatible(head)
                rows = sum(j.prepared.model_rows for j in jobs)
                wait = head.enqueued_at + max_wait_s - time.monotonic()
                if wait > 0 and rows < self._config.max_batch_size and self._admitting:
                    deadline_wait = self._nearest_deadline_wait()
                    self._cond.wait(
                        timeout=wait if deadline_wait is None else min(wait, deadline_wait)
                    )
                    continue
                now = time.monotonic()
                key = self._keys[id(head)]
                for job in jobs:
                    self._queue.remove(job)
                    self._keys.pop(id(job), None)
                    job.started_at = now
                    job.batch_size = len(jobs)
                    self._running.add(job)
                self._histogram[len(jobs)] += 1
                return Batch(key, jobs)

    def _compatible(self, head: Job) -> list[Job]:
        """The head plus, in FIFO order, every queued request that fits its batch."""
        cfg = self._config
        key = self._keys[id(head)]
        chosen = [head]
        rows = head.prepared.model_rows
        width = len(head.prepared.prompt_ids)
        new = head.prepared.effective.max_new_tokens
        for job in self._queue[1:]:
            if self._keys[id(job)] != key:
                continue
            p = job.prepared
            r = rows + p.model_rows
            w = max(width, len(p.prompt_ids))
            n = max(new, p.effective.max_new_tokens)
            if (
                r > cfg.max_batch_size
                or r * (w + n) > cfg.max_batch_tokens
                or w + n > self._context_length
                or (key.length_limit and w + n - 1 > key.length_limit)
            ):
                continue
            chosen.append(job)
            rows, width, new = r, w, n
        return chosen

    def _nearest_deadline_wait(self) -> float | None:
        deadlines = [
            j.prepared.request.deadline
            for j in self._queue
            if j.prepared.request.deadline is not None
        ]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire_queued(self) -> None:
        with self._cond:
            self._expire_queued_locked()

    def _expire_queued_locked(self) -> None:
        expired = [j for j in self._queue if j.deadline_passed]
        for job in expired:
            self._queue.remove(job)
            self._keys.pop(id(job), None)
            job.done = True
            self._completed += 1
            job.publish_outcome(
                DeadlineExceededError(
                    f"request {job.request_id!r} passed its deadline while queued"
                )
            )

    def _fail(self, job: Job, error: BaseException) -> None:
        with self._cond:
            if job.done:
                return
            job.done = True
            self._running.discard(job)
            self._keys.pop(id(job), None)
            self._completed += 1
        job.publish_outcome(error)

    def _job_finished(self, job: Job) -> None:
        with self._cond:
            if job.done:
                return
            job.done = True
            self._running.discard(job)
            self._completed += 1
        job.publish_outcome(self._result(job, FinishReason.CANCELLED))

    # ---- results ----
    def _result(self, job: Job, default_reason: FinishReason) -> GenerationResult:
        """Build the final result; ``default_reason`` fills sequences that never ran."""
        now = time.monotonic()
        prepared = job.prepared
        e = prepared.effective
        sequences: list[SequenceResult]
        if job.beam_sequences is not None:
            sequences = job.beam_sequences
        elif job.rows:
            sequences = [
                SequenceResult(
                    index=row.index,
                    text=row.stream.text,
                    token_ids=tuple(row.tokens),
                    finish_reason=row.finish_reason or default_reason,
                    logprobs=tuple(row.logprobs),
                    incomplete=row.incomplete or (row.constraint is not None and not row.finished),
                )
                for row in job.rows
            ]
        else:
            sequences = [
                SequenceResult(i, "", (), default_reason) for i in range(e.num_return_sequences)
            ]
        started = job.started_at if job.started_at is not None else now
        adapter = prepared.adapter
        return GenerationResult(
            request_id=job.request_id,
            sequences=tuple(sequences),
            prompt_tokens=len(prepared.prompt_ids),
            completion_tokens=sum(len(s.token_ids) for s in sequences),
            adapter=adapter.name if adapter else "",
            adapter_sha256=adapter.sha256 if adapter else "",
            effective=e,
            model_id=self._model_id,
            queue_wait_ms=(started - job.enqueued_at) * 1000.0,
            inference_ms=(now - started) * 1000.0 if job.started_at is not None else 0.0,
            batch_size=job.batch_size,
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
