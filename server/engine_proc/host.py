"""The engine process: an ``Engine`` on its own event loop, driven over one socket by the front.

``python -m peftserve.server.engine_proc.host --fd N`` (started by ``EngineProxy.launch``):
reads ``wire`` messages on its event loop, submits, cancels and calls into the engine, and
sends everything the engine produced since its last message as one ``wire.Output``: the
worker thread hands a whole step's events to this loop in one callback, and the loop sends
once per iteration. A writer thread pickles and sends, so the loop never blocks on the socket
and always reads the front's messages. SIGINT/SIGTERM are ignored (the front drains and stops
this process); when the front goes away (end of file on the socket) the engine stops and the
process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import inspect
import logging
import os
import pickle
import queue
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from ..engine.config import EngineConfig
from ..engine.engine import Engine
from ..engine.errors import PeftServeError
from ..engine.handle import RequestHandle
from ..engine.stats import StepStats
from ..engine.types import AdapterEvent, GenerationRequest, GenerationResult, TokenEvent
from ..logs import configure_logging
from . import wire

logger = logging.getLogger("peftserve.engine_proc")

# A step that produced no event or outcome (unary rows decoding) is reported to the front
# at most this late: its StepStats, and the engine's queue count and stats with it.
STEPS_FLUSH_S = 0.02
# How often the host checks that the front is still its parent.
PARENT_CHECK_S = 1.0


class _ForwardingHandle(RequestHandle):
    """The engine-side handle of a front's request: its output goes to the host's outbox."""

    def __init__(
        self,
        host: EngineHost,
        key: int,
        request_id: str,
        stream: bool,
        loop: asyncio.AbstractEventLoop,
        on_cancel: Callable[[], None],
        max_buffered_tokens: int,
    ) -> None:
        # The front's handle bounds what its caller leaves unread; nothing is buffered here.
        super().__init__(request_id, stream, loop, on_cancel, 0)
        self._host = host
        self._key = key

    def _deliver(self, event: TokenEvent) -> None:
        if not self.done:
            self._host.event(self._key, event)

    def _resolve(self, outcome: GenerationResult | BaseException) -> None:
        if self.done:
            return
        super()._resolve(outcome)  # done callbacks (adapter release) run before it is sent
        self._host.outcome(self._key, outcome)


class EngineHost:
    """Serves one front over ``conn``; runs on the engine process's event loop."""

    def __init__(self, conn: Connection, engine: Engine) -> None:
        self._conn = conn
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self._loop.create_future()
        self._handles: dict[int, RequestHandle] = {}
        # SUBMITs read but not yet queued or refused, and cancels that arrived meanwhile.
        self._submitting: set[int] = set()
        self._cancel_early: set[int] = set()
        self._seen = 0
        self._initial_stats = engine.stats()
        self._out = self._new_output()
        self._flush_scheduled = False
        self._usage_dirty = False
        self._usage: dict[str, tuple[int, float | None]] = {}
        # StepStats from the worker thread (deque: appends and pops are thread-safe).
        self._steps: collections.deque[StepStats] = collections.deque()
        self._steps_wake = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._sendq: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # A daemon: an exit must never wait on a send to a front that is gone.
        self._writer = threading.Thread(
            target=self._write, name="peftserve-ipc-writer", daemon=True
        )
        self._parent = os.getppid()

    def start(self) -> None:
        self._engine.subscribe_adapters(self._adapter_event)
        self._engine.add_step_listener(self._step)
        self._writer.start()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        self._loop.call_later(PARENT_CHECK_S, self._check_parent)

    def _check_parent(self) -> None:
        """Besides end of file on the socket: a front that died leaves us re-parented."""
        if self._stopping:
            return
        if os.getppid() != self._parent:
            logger.warning("the front process is gone; stopping the engine")
            self._spawn(self._stop(reply_to=None))
            return
        self._loop.call_later(PARENT_CHECK_S, self._check_parent)

    # ---- the outbox (loop thread) ----
    def _new_output(self) -> wire.Output:
        # Placeholders: _flush fills in the state as of the moment it sends.
        return wire.Output(stats=self._initial_stats, waiting=0, seen=0, step_seconds=0.0)

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # call_soon: runs after every callback the worker queued for this step (its
            # events, then each finished request's outcome), so a step is one message.
            self._loop.call_soon(self._flush)

    def event(self, key: int, event: TokenEvent) -> None:
        self._out.events.append((key, event))
        self._schedule()

    def outcome(self, key: int, outcome: GenerationResult | BaseException) -> None:
        self._handles.pop(key, None)
        self._out.outcomes.append((key, _picklable(outcome)))
        self._usage_dirty = True
        self._schedule()

    def _reply(self, call_id: int, ok: bool, value: Any) -> None:
        self._out.replies.append((call_id, ok, value if ok else _picklable(value)))
        self._schedule()

    def _adapter_event(self, event: AdapterEvent) -> None:
        if _on_loop(self._loop):
            self._out.adapter_events.append(event)
            self._schedule()
        else:
            self._loop.call_soon_threadsafe(self._adapter_event, event)

    def _step(self, step: StepStats) -> None:  # worker thread
        # No wake-up per step: a step's events and outcomes (published after its StepStats)
        # carry it; a step with neither is sent within STEPS_FLUSH_S, with the state.
        self._steps.append(step)
        if not self._steps_wake:
            self._steps_wake = True
            self._loop.call_soon_threadsafe(self._loop.call_later, STEPS_FLUSH_S, self._schedule)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, self._new_output()
        out.stats = self._engine.stats()
        out.waiting = out.stats.queued + len(self._submitting)
        out.seen = self._seen
        out.step_seconds = self._engine.step_seconds
        self._steps_wake = False
        while self._steps:
            out.steps.append(self._steps.popleft())
        if self._usage_dirty:
            self._usage_dirty = False
            usage = {s.name: (s.in_flight, s.last_used) for s in self._engine.adapter_statuses()}
            if usage != self._usage:
                self._usage = out.adapter_usage = usage
        self._sendq.put((wire.OUT, out))

    def _write(self) -> None:
        """Writer thread: pickle and send, so a slow reader never stalls the event loop."""
        while (message := self._sendq.get()) is not None:
            try:
                self._conn.send(message)
            except OSError:
                return  # the front is gone; the reader sees it too

    # ---- commands (loop thread) ----
    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            logger.warning("the front process went away; stopping the engine")
            self._spawn(self._stop(reply_to=None))

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == wire.SUBMIT:
            _, key, request, stream = message
            self._seen += 1
            self._submitting.add(key)
            self._spawn(self._submit(key, request, stream))
        elif kind == wire.CANCEL:
            key = message[1]
            handle = self._handles.get(key)
            if handle is not None:
                handle.cancel()
            elif key in self._submitting:
                self._cancel_early.add(key)
        elif kind == wire.CALL:
            _, call_id, name, args = message
            if name == "stop":
                self._spawn(self._stop(reply_to=call_id))
            elif name in wire.CALLS:
                self._spawn(self._call(call_id, name, args))
            else:
                self._reply(call_id, False, ValueError(f"not an engine call: {name!r}"))
        else:
            logger.error("unknown message from the front: %r", kind)

    def _spawn(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _submit(self, key: int, request: GenerationRequest, stream: bool) -> None:
        engine = self._engine
        try:
            await engine.await_adapter(request.adapter, request.deadline)
            prepared = await engine.prepare_async(request)
            handle = engine.submit_prepared(
                prepared, stream, functools.partial(_ForwardingHandle, self, key)
            )
        except Exception as error:
            self.outcome(key, error)
            return
        finally:
            self._submitting.discard(key)
        self._handles[key] = handle
        self._usage_dirty = True
        if key in self._cancel_early:
            self._cancel_early.discard(key)
            handle.cancel()

    async def _call(self, call_id: int, name: str, args: tuple[Any, ...]) -> None:
        try:
            result = getattr(self._engine, name)(*args)
            if inspect.isawaitable(result):
                result = await result
        except Exception as error:
            self._reply(call_id, False, error)
        else:
            self._reply(call_id, True, result)

    async def _stop(self, reply_to: int | None) -> None:
        if self.finished.done() or self._stopping:
            return
        self._stopping = True
        self._loop.remove_reader(self._conn.fileno())
        try:
            await self._engine.stop()
        finally:
            if reply_to is not None:
                self._reply(reply_to, True, None)
            self._flush()
            self._sendq.put(None)
            if not self.finished.done():
                self.finished.set_result(None)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _picklable(value: Any) -> Any:
    """Errors cross as they are when they pickle (every engine error does), else as text."""
    if isinstance(value, (GenerationResult, PeftServeError)):
        return value
    try:
        pickle.dumps(value)
    except Exception:
        return RuntimeError(f"{type(value).__name__}: {value}")
    return value


async def _serve(conn: Connection, config: EngineConfig) -> int:
    try:
        engine = await asyncio.to_thread(Engine, config)
        await engine.start()
    except Exception as error:
        logger.exception("failed to load the model from %s", config.model_path)
        conn.send((wire.FAILED, f"{type(error).__name__}: {error}"))
        return 1
    conn.send(
        (wire.READY, engine.info, engine.adapter_statuses(), engine.stats(), engine.step_seconds)
    )
    host = EngineHost(conn, engine)
    host.start()
    await host.finished
    host._writer.join(10)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the socket to the front")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    # The front handles signals and drains; a Ctrl-C sent to the whole process group must not
    # cut the requests it is still finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(args.log_level, args.log_format)
    conn = Connection(args.fd)
    kind, config = conn.recv()
    if kind != wire.CONFIG:
        raise SystemExit(f"expected {wire.CONFIG!r} first, got {kind!r}")
    code = asyncio.run(_serve(conn, config))
    # The engine has stopped and the front has its last message; leave now. Not through the
    # interpreter's exit: its logging.shutdown waits for handler locks, and the JSON log's
    # stderr relay thread can hold one for ever once stderr's reader is gone (seen after a
    # killed front: the process never exited).
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
