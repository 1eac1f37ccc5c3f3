"""The caller's side of a request (``RequestHandle``) and the worker's side (``Job``).

The worker thread never touches asyncio objects: it hands every event and the final outcome to
the event loop with ``loop.call_soon_threadsafe``, which runs callbacks in FIFO order, so a
stream's events always arrive before its end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from .errors import SlowConsumerError
from .types import GenerationResult, SequenceResult, TokenEvent

if TYPE_CHECKING:
    from .rows import Row
    from .validation import PreparedRequest


class RequestHandle:
    """What ``Engine.submit`` returns: await ``result()`` or iterate events, or ``cancel()``."""

    def __init__(
        self,
        request_id: str,
        stream: bool,
        loop: asyncio.AbstractEventLoop,
        on_cancel: Callable[[], None],
        max_buffered_tokens: int = 0,
    ) -> None:
        self.request_id = request_id
        self.stream = stream
        self._on_cancel = on_cancel
        self._future: asyncio.Future[GenerationResult] = loop.create_future()
        self._events: asyncio.Queue[TokenEvent | None] | None = asyncio.Queue() if stream else None
        # Tokens delivered to the queue and not yet taken by the consumer; 0 = unbounded.
        self._max_buffered = max_buffered_tokens
        self._buffered = 0
        self._done_callbacks: list[Callable[[], None]] = []

    # -- called on the loop thread only (directly or via call_soon_threadsafe) --
    def _deliver(self, event: TokenEvent) -> None:
        if self._events is None or self._future.done():
            return
        self._buffered += max(1, len(event.token_ids))
        if self._max_buffered and self._buffered > self._max_buffered:
            self._drop_slow_consumer()
            return
        self._events.put_nowait(event)

    def _drop_slow_consumer(self) -> None:
        """The consumer fell too far behind: free its output, stop the request, end the stream
        with SlowConsumerError (seen when the consumer next reads)."""
        assert self._events is not None
        while not self._events.empty():
            self._events.get_nowait()
        self._buffered = 0
        self._resolve(
            SlowConsumerError(
                f"request {self.request_id!r}: more than {self._max_buffered} generated tokens "
                "were waiting for the client to read them; the request was stopped"
            )
        )
        self._on_cancel()

    def _taken(self, event: TokenEvent) -> None:
        self._buffered = max(0, self._buffered - max(1, len(event.token_ids)))

    def _resolve(self, outcome: GenerationResult | BaseException) -> None:
        if self._future.done():
            return
        if isinstance(outcome, BaseException):
            self._future.set_exception(outcome)
            # Mark it retrieved: a caller that already left (client cancel or deadline; the
            # servicer's await of the shielded future was cancelled) never reads it, and asyncio
            # would log "Future exception was never retrieved" for each such request.
            self._future.exception()
        else:
            self._future.set_result(outcome)
        if self._events is not None:
            self._events.put_nowait(None)
        # Run now, not as future callbacks a loop iteration later: whatever reads the engine's
        # state next (a caller woken by the result, the engine process's next message to the
        # front) sees the request's bookkeeping (an adapter's in-flight count) already undone.
        callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            callback()

    # -- public API --
    @property
    def done(self) -> bool:
        return self._future.done()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._events is None:
            raise TypeError("events are only available for requests submitted with stream=True")
        return self._iterate(self._events)

    async def _iterate(self, events: asyncio.Queue[TokenEvent | None]) -> AsyncIterator[TokenEvent]:
        while True:
            event = await events.get()
            if event is None:
                break
            self._taken(event)
            yield event
        error = self._future.exception()
        if error is not None:
            raise error

    def event_batches(self) -> AsyncIterator[list[TokenEvent]]:
        """Like iterating the handle, but each step yields every event already waiting.

        A consumer that falls behind (e.g. a gRPC stream under load) then catches up in fewer,
        larger messages instead of paying per-message costs for every token.
        """
        if self._events is None:
            raise TypeError("events are only available for requests submitted with stream=True")
        return self._iterate_batches(self._events)

    async def _iterate_batches(
        self, events: asyncio.Queue[TokenEvent | None]
    ) -> AsyncIterator[list[TokenEvent]]:
        ended = False
        while not ended:
            event = await events.get()
            if event is None:
                break
            self._taken(event)
            batch = [event]
            while not events.empty():
                waiting = events.get_nowait()
                if waiting is None:
                    ended = True
                    break
                self._taken(waiting)
                batch.append(waiting)
            yield batch
        error = self._future.exception()
        if error is not None:
            raise error

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop thread once the request has its outcome (any kind)."""
        if self._future.done():
            callback()
        else:
            self._done_callbacks.append(callback)

    async def result(self) -> GenerationResult:
        # shield: a caller's task being cancelled must not cancel the shared future.
        return await asyncio.shield(self._future)

    def cancel(self) -> None:
        """Queued: removed from the queue. Running: its rows stop at the next step."""
        self._on_cancel()


# How ``Engine.submit_prepared`` builds a handle: (request_id, stream, loop, on_cancel,
# max_buffered_tokens) -> handle.
HandleFactory = Callable[
    [str, bool, asyncio.AbstractEventLoop, Callable[[], None], int], RequestHandle
]


class Job:
    """A request in the engine: its prepared form, its handle and its progress."""

    def __init__(
        self, prepared: PreparedRequest, handle: RequestHandle, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.prepared = prepared
        self.handle = handle
        self.loop = loop
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        self.batch_size = 1
        # Written by the loop thread, read by the worker at each step (a bool is atomic).
        self.cancelled = False
        self.done = False
        self.rows: list[Row] = []
        # Beam requests get whole sequences at the end instead of growing rows.
        self.beam_sequences: list[SequenceResult] | None = None
        # Events decoded in the current step, not yet handed to the loop (worker thread only).
        self.pending_events: list[TokenEvent] = []

    @property
    def request_id(self) -> str:
        return self.prepared.request.request_id

    @property
    def deadline_passed(self) -> bool:
        deadline = self.prepared.request.deadline
        return deadline is not None and time.monotonic() >= deadline

    def publish_event(self, event: TokenEvent) -> None:
        # Buffered: the batch hands a whole decoding step's events to the loop in one callback
        # (see flush_events), instead of waking the loop once per row per token.
        if self.handle.stream:
            self.pending_events.append(event)

    def take_events(self) -> list[TokenEvent]:
        events, self.pending_events = self.pending_events, []
        return events

    def publish_outcome(self, outcome: GenerationResult | BaseException) -> None:
        events = self.take_events()
        if events:
            # FIFO callbacks: a stream's last events always precede its end.
            self.loop.call_soon_threadsafe(_deliver_all, [(self.handle, events)])
        self.loop.call_soon_threadsafe(self.handle._resolve, outcome)


def flush_events(jobs: list[Job]) -> None:
    """Hand every job's buffered events to the event loop in one callback (worker thread)."""
    ready = [(job.handle, events) for job in jobs if (events := job.take_events())]
    if ready:
        jobs[0].loop.call_soon_threadsafe(_deliver_all, ready)


def _deliver_all(ready: list[tuple[RequestHandle, list[TokenEvent]]]) -> None:
    for handle, events in ready:
        for event in events:
            handle._deliver(event)
