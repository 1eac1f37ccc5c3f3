"""The front's stand-in for the engine: the ``Engine`` interface the server uses, over a socket.

``EngineProxy.launch`` starts ``python -m peftserve.server.engine_proc.host`` and waits for it
to load. Then, on the front's event loop:

* admission is decided here, with the counts the engine process reports in every message plus
  the requests sent since (an upper bound of its queue), so a refusal (not running, deadline,
  size bounds, queue full with the same retry hint) never crosses the socket;
* ``submit_async`` sends one message and returns a ``RequestHandle`` at once; tokenizing and
  validation run in the engine process, and their refusals arrive through the handle;
* the socket is read with ``loop.add_reader``: each ``wire.Output`` (one per model step) is
  applied in one callback, with no thread in between;
* adapters, stats and step listeners are mirrored from those messages, so ``ListAdapters``,
  ``WatchAdapters`` and the metrics read local state.

If the engine process dies, every request in flight ends with ``EngineUnavailableError`` ("the
engine process exited with code X") and ``on_exit`` is called with the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from ..engine.batcher import retry_after_s
from ..engine.config import EngineConfig
from ..engine.engine import CANCEL_GRACE_S, open_watch
from ..engine.errors import DeadlineExceededError, EngineUnavailableError, QueueFullError
from ..engine.handle import RequestHandle
from ..engine.registry import AdapterListener
from ..engine.stats import EngineStats, StepListener
from ..engine.types import (
    AdapterEvent,
    AdapterEventKind,
    AdapterInfo,
    AdapterState,
    AdapterStatus,
    AdapterWatch,
    GenerationRequest,
    ModelInfo,
    TokenizeResult,
)
from ..engine.validation import check_bounds
from . import wire

logger = logging.getLogger("peftserve.engine_proc")

HOST_MODULE = "peftserve.server.engine_proc.host"
# After the socket closes, how long the process may take to exit before it is killed.
EXIT_WAIT_S = 10.0


class RemoteRegistry:
    """The front's copy of the engine's adapter registry (the lookups the server makes)."""

    def __init__(self, statuses: list[AdapterStatus], max_loaded: int) -> None:
        self.max_loaded = max_loaded
        self._entries = {s.name: s for s in statuses}
        self._listeners: list[AdapterListener] = []

    def apply(self, event: AdapterEvent) -> None:
        status = event.status
        if event.kind is AdapterEventKind.REMOVED:
            self._entries.pop(status.name, None)
        else:
            self._entries[status.name] = status
        for listener in list(self._listeners):
            listener(event)

    def apply_usage(self, usage: dict[str, tuple[int, float | None]]) -> None:
        for name, (in_flight, last_used) in usage.items():
            status = self._entries.get(name)
            if status is not None:
                self._entries[name] = dataclasses.replace(
                    status, in_flight=in_flight, last_used=last_used
                )

    def subscribe(self, listener: AdapterListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def entry(self, name: str) -> AdapterStatus | None:
        return self._entries.get(name)

    def statuses(self) -> list[AdapterStatus]:
        return [self._entries[n] for n in sorted(self._entries)]

    def count_by_state(self) -> dict[AdapterState, int]:
        counts = dict.fromkeys(AdapterState, 0)
        for status in list(self._entries.values()):
            counts[status.state] += 1
        return counts

    def occupying(self) -> int:
        return sum(1 for s in list(self._entries.values()) if s.state is not AdapterState.FAILED)

    def infos(self) -> list[AdapterInfo]:
        return [
            s.info for s in self.statuses() if s.state is AdapterState.READY and s.info is not None
        ]


class EngineProxy:
    """The engine in a child process, behind the engine interface the server uses."""

    def __init__(
        self,
        conn: Connection,
        process: subprocess.Popen[bytes],
        config: EngineConfig,
        on_exit: Callable[[int], None] | None,
    ) -> None:
        self._conn = conn
        self._process = process
        self._config = config
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._info: ModelInfo | None = None
        self._registry = RemoteRegistry([], config.max_loaded_adapters)
        self._stats = EngineStats(0, 0, 0, {}, 0, 0, config.max_batch_tokens, (), ())
        self._step_seconds = 0.05
        # Admission: the engine's waiting count as of its last message, the SUBMITs it had
        # read then, and the SUBMITs sent so far.
        self._waiting = 0
        self._seen = 0
        self._sent = 0
        self._keys = itertools.count()
        # Requests the engine process has not reported an outcome for, by key.
        self._handles: dict[int, RequestHandle] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._step_listeners: list[StepListener] = []
        self._watches: set[asyncio.Queue[AdapterEvent | None]] = set()
        self._admitting = True
        self._draining = False
        self._stopping = False
        self._lost: str | None = None  # why the engine process is gone, once it is
        self._reader_open = True
        self._reaper: asyncio.Task[None] | None = None
        self._loop.add_reader(conn.fileno(), self._on_readable)

    @classmethod
    async def launch(
        cls,
        config: EngineConfig,
        log_level: str = "INFO",
        log_format: str = "text",
        on_exit: Callable[[int], None] | None = None,
    ) -> EngineProxy:
        """Start the engine process and wait until its model is loaded."""
        front, back = socket.socketpair()
        command = [sys.executable, "-m", HOST_MODULE, "--fd", str(back.fileno())]
        command += ["--log-level", log_level, "--log-format", log_format]
        # Its stdout is our stderr: stdout carries the server's "ready" line only.
        process = subprocess.Popen(
            command, pass_fds=(back.fileno(),), stdin=subprocess.DEVNULL, stdout=2
        )
        back.close()
        conn = Connection(front.detach())
        proxy = cls(conn, process, config, on_exit)
        try:
            proxy._send((wire.CONFIG, config))
            await asyncio.shield(proxy._ready)
        except BaseException:
            await proxy.stop()
            raise
        logger.info("engine process %d is serving", process.pid)
        return proxy

    # ---- facts ----
    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def sent_requests(self) -> int:
        """Requests sent to the engine process so far (refusals here are never sent)."""
        return self._sent

    @property
    def info(self) -> ModelInfo:
        assert self._info is not None
        return self._info

    @property
    def registry(self) -> RemoteRegistry:
        return self._registry

    @property
    def step_seconds(self) -> float:
        return self._step_seconds

    def adapters(self) -> list[AdapterInfo]:
        return self._registry.infos()

    def adapter_statuses(self) -> list[AdapterStatus]:
        return self._registry.statuses()

    def subscribe_adapters(self, listener: AdapterListener) -> Callable[[], None]:
        return self._registry.subscribe(listener)

    @contextlib.contextmanager
    def watch_adapters(self) -> Iterator[AdapterWatch]:
        """``Engine.watch_adapters`` over the mirrored registry (same bound, same end)."""
        with open_watch(
            self._registry, self._config.max_watch_buffered_events, self._draining, self._watches
        ) as watch:
            yield watch

    def stats(self) -> EngineStats:
        """The engine's stats as of its last message (sent after every step)."""
        return self._stats

    def add_step_listener(self, listener: StepListener) -> Callable[[], None]:
        """Call ``listener(StepStats)`` for every model step, on the front's event loop."""
        self._step_listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._step_listeners:
                self._step_listeners.remove(listener)

        return unsubscribe

    # ---- requests ----
    def check_queue(self) -> None:
        """``Engine.check_queue``: refuse at once when nothing could be admitted now."""
        if self._lost is not None:
            raise EngineUnavailableError(self._lost)
        if not self._admitting:
            raise EngineUnavailableError(
                "the engine is not accepting requests (not started or draining)"
            )
        # The engine's count as of its last message plus what was sent since: never less
        # than its queue now, so what passes here is never refused there for a full queue.
        waiting = self._waiting + self._sent - self._seen
        if waiting >= self._config.max_queue_size:
            raise QueueFullError(waiting, retry_after_s(waiting, self._config, self._step_seconds))

    def check_admission(self, request: GenerationRequest) -> None:
        """``Engine.check_admission``'s refusals, decided in this process."""
        self.check_queue()
        if request.deadline is not None and time.monotonic() >= request.deadline:
            raise DeadlineExceededError("the request arrived after its deadline")
        check_bounds(request, self.info.limits)

    async def submit_async(self, request: GenerationRequest, stream: bool = False) -> RequestHandle:
        """Admit here, send, return the handle; the engine process prepares and enqueues it."""
        self.check_admission(request)
        key = next(self._keys)
        handle = RequestHandle(
            request.request_id,
            stream,
            self._loop,
            lambda: self._cancel(key),
            self._config.max_stream_buffered_tokens,
        )
        self._send((wire.SUBMIT, key, request, stream))
        self._sent += 1
        self._handles[key] = handle
        return handle

    def _cancel(self, key: int) -> None:
        if key in self._handles and self._lost is None:
            self._send((wire.CANCEL, key), quiet=True)

    async def tokenize_async(self, text: str, add_special_tokens: bool = True) -> TokenizeResult:
        result: TokenizeResult = await self._call("tokenize_async", text, add_special_tokens)
        return result

    async def load_adapter(self, name: str, path: str = "", pinned: bool = False) -> AdapterStatus:
        status: AdapterStatus = await self._call("load_adapter", name, path, pinned)
        return status

    async def unload_adapter(self, name: str, deadline: float | None = None) -> AdapterStatus:
        # Monotonic deadlines hold across processes (one system clock).
        status: AdapterStatus = await self._call("unload_adapter", name, deadline)
        return status

    # ---- lifecycle ----
    def _end_watches(self) -> None:
        self._draining = True
        for events in self._watches:
            events.put_nowait(None)

    async def drain(self, timeout_s: float) -> None:
        """Admit nothing more; the engine lets queued and running requests finish, then
        cancels the rest."""
        self._admitting = False
        self._end_watches()
        if self._lost is None:
            await self._call("drain", timeout_s)

    async def stop(self) -> None:
        """Stop the engine and its process: nothing of it is left running afterwards."""
        self._admitting = False
        self._stopping = True
        self._end_watches()
        loaded = self._ready.done() and self._ready.exception() is None
        if self._lost is None and loaded:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call("stop"), CANCEL_GRACE_S + EXIT_WAIT_S)
        elif self._process.poll() is None and not loaded:
            self._process.kill()  # still loading (or failed to): nothing to drain
        self._close_reader()
        code = await self._reap()
        self._fail_all(self._lost or f"the engine process exited with code {code}")

    async def _reap(self) -> int:
        try:
            return await asyncio.to_thread(self._process.wait, EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            logger.error("engine process %d did not exit; killing it", self._process.pid)
            self._process.kill()
            return await asyncio.to_thread(self._process.wait)

    # ---- the socket ----
    def _send(self, message: tuple[Any, ...], quiet: bool = False) -> None:
        try:
            self._conn.send(message)
        except OSError:
            self._connection_lost()
            if not quiet:
                raise EngineUnavailableError(self._lost or "the engine process is gone") from None

    async def _call(self, name: str, *args: Any) -> Any:
        if self._lost is not None:
            raise EngineUnavailableError(self._lost)
        call_id = next(self._keys)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        self._send((wire.CALL, call_id, name, args))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _on_readable(self) -> None:
        try:
            while self._reader_open and self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._connection_lost()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == wire.OUT:
            self._apply(message[1])
        elif kind == wire.READY:
            _, self._info, statuses, self._stats, self._step_seconds = message
            self._registry = RemoteRegistry(statuses, self._config.max_loaded_adapters)
            if not self._ready.done():
                self._ready.set_result(None)
        elif kind == wire.FAILED and not self._ready.done():
            self._ready.set_exception(RuntimeError(f"the engine failed to load: {message[1]}"))

    def _apply(self, out: wire.Output) -> None:
        for adapter_event in out.adapter_events:
            self._registry.apply(adapter_event)
        if out.adapter_usage is not None:
            self._registry.apply_usage(out.adapter_usage)
        self._stats = out.stats
        self._waiting, self._seen, self._step_seconds = out.waiting, out.seen, out.step_seconds
        handles = self._handles
        for key, event in out.events:
            handle = handles.get(key)
            if handle is not None:
                handle._deliver(event)
        for key, outcome in out.outcomes:
            handle = handles.pop(key, None)
            if handle is not None:
                handle._resolve(outcome)
        for call_id, ok, value in out.replies:
            future = self._calls.get(call_id)
            if future is None or future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        for step in out.steps:
            for listener in list(self._step_listeners):
                try:
                    listener(step)
                except Exception:  # a listener's bug must not break delivery
                    logger.exception("step listener failed")

    def _close_reader(self) -> None:
        if self._reader_open:
            self._reader_open = False
            self._loop.remove_reader(self._conn.fileno())
            self._conn.close()

    def _connection_lost(self) -> None:
        """End of file: the engine process exited (or is exiting). Fail everything in flight."""
        if not self._reader_open:
            return
        self._close_reader()
        if self._stopping:
            return
        self._admitting = False
        task = self._loop.create_task(self._died())
        self._reaper = task  # referenced until done

    async def _died(self) -> None:
        code = await self._reap()
        self._lost = f"the engine process exited with code {code}"
        logger.error("%s", self._lost)
        self._fail_all(self._lost)
        if not self._ready.done():
            self._ready.set_exception(RuntimeError(self._lost))
        elif self._on_exit is not None:
            self._on_exit(code)

    def _fail_all(self, message: str) -> None:
        self._admitting = False
        self._end_watches()
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle._resolve(EngineUnavailableError(message))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineUnavailableError(message))
        if not self._ready.done():
            self._ready.set_exception(RuntimeError(message))
            self._ready.exception()
