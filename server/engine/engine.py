"""The engine facade the servicer calls: load, validate, submit, drain, stop, stats.

``Engine.__init__`` loads synchronously (the server runs it in ``asyncio.to_thread``);
``start`` binds the engine to the running event loop and starts the worker thread.

A request goes in three steps, so that nothing costly runs on the event loop:
``check_admission`` (loop thread, cheap: not running, deadline, queue full, size bounds) ->
``prepare`` (any thread: tokenize and validate; the one place where per-request preparation
happens) -> ``submit_prepared`` (loop thread: enqueue, never waiting on the model).
``prepare_async`` runs the first two, preparing on the engine's small thread pool; ``submit``
runs all three inline for in-process callers and tests.

Adapter lifecycle (``load_adapter``, ``unload_adapter``, ``await_adapter``) runs on the loop
thread too: bookkeeping there, file reading and hashing in a thread, and the ``PeftModel``
mutation itself on the worker thread between model steps (``Batcher.run_between_steps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from . import quirks
from .batcher import Batcher
from .beams import BeamRunner
from .chat import ChatRenderer
from .config import EngineConfig
from .detokenize import Decoder
from .errors import (
    AdapterBudgetError,
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterPathNotFoundError,
    AdapterStateError,
    DeadlineExceededError,
    EngineUnavailableError,
    InvalidRequestError,
)
from .handle import HandleFactory, Job, RequestHandle
from .registry import (
    ADAPTER_NAME_PATTERN,
    CONFIG_FILE,
    ROUTED_GROUP,
    AdapterListener,
    AdapterRegistry,
    check_adapter_name,
    inspect_adapter,
    resolve_adapter_dir,
)
from .rows import RowFactory
from .running import SubBatchKey
from .sampler import Sampler
from .stats import EngineStats, StepListener
from .step import ModelStep
from .structured import ConstraintCompiler
from .types import (
    AdapterEvent,
    AdapterInfo,
    AdapterState,
    AdapterStatus,
    AdapterWatch,
    EngineLimits,
    GenerationRequest,
    ModelInfo,
    TokenizeResult,
)
from .validation import PreparedRequest, ValidationContext, check_bounds, check_text_bytes, prepare

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How long drain/stop wait for cancelled running rows to reach their next step.
CANCEL_GRACE_S = 10.0
# Threads that prepare requests (tokenize, validate) off the event loop. Two cores are the
# norm for this service's CPU deployments; more threads would only contend for the GIL.
PREPARE_THREADS = 2
# FAILED adapters kept listed (with their reason) after a failed LoadAdapter; older ones are
# forgotten, so repeated failing loads under new names cannot grow ListAdapters without bound.
MAX_FAILED_ADAPTERS = 32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _longest_token_bytes(tokenizer: Any) -> int:
    """UTF-8 bytes of the longest vocabulary entry, special tokens included (at least 1)."""
    vocab = tokenizer.get_vocab()
    return max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1) or 1


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


class Engine:
    """Batched text generation from a base model and its PEFT adapters."""

    def __init__(self, config: EngineConfig) -> None:
        if config.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        self._config = config
        device = resolve_device(config.device)
        path = str(config.model_path)
        # Local files only, safetensors only, no remote code: loading a model must never
        # reach the network or unpickle anything.
        self._tokenizer: Any = AutoTokenizer.from_pretrained(
            path, trust_remote_code=False, local_files_only=True
        )
        base: Any = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=DTYPES[config.dtype],
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=True,
        )
        base.to(device)
        base.eval()
        # The model's defaults stay here for per-request configs; the model itself gets an empty
        # config so generate() adds nothing of its own to a batch.
        self._defaults: GenerationConfig = copy.deepcopy(base.generation_config)
        base.generation_config = GenerationConfig()
        self._registry = AdapterRegistry(
            base,
            config.adapters_dir,
            pinned=config.pinned_adapters,
            max_loaded=config.max_loaded_adapters,
            preload=config.preload_adapters,
        )
        # Loads in progress by adapter name; requests and LoadAdapter calls await them.
        self._loads: dict[str, asyncio.Future[AdapterStatus]] = {}
        self._load_tasks: set[asyncio.Task[None]] = set()
        # Open watches' queues, so drain/stop can end them (a None at the end of each).
        self._watches: set[asyncio.Queue[AdapterEvent | None]] = set()

        text_config = base.config.get_text_config()
        context_length = quirks.context_length(
            base.config, getattr(self._tokenizer, "model_max_length", None)
        )
        # LongRoPE: rows on both sides of its switch must never share a forward (quirks.py).
        self._rope_switch = quirks.rope_switch(base.config)
        eos_ids = _as_ids(self._defaults.eos_token_id) or _as_ids(self._tokenizer.eos_token_id)
        pad_id = self._defaults.pad_token_id
        if pad_id is None:
            pad_id = (
                self._tokenizer.pad_token_id
                if self._tokenizer.pad_token_id is not None
                else eos_ids[0]
            )
        max_prompt_tokens = min(config.max_prompt_tokens or context_length, context_length)
        limits = EngineLimits(
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_prefill_tokens=config.max_prefill_tokens,
            max_queue_size=config.max_queue_size,
            max_prompt_tokens=max_prompt_tokens,
            max_prompt_bytes=config.max_prompt_bytes
            or max_prompt_tokens * _longest_token_bytes(self._tokenizer),
            max_new_tokens=min(config.max_new_tokens or context_length, context_length),
            default_max_new_tokens=config.default_max_new_tokens,
            max_beams_times_sequences=config.max_beams_times_sequences,
            max_stop_sequences=config.max_stop_sequences,
            max_stop_sequence_length=config.max_stop_sequence_length,
            max_top_logprobs=config.max_top_logprobs,
            max_constraints=config.max_constraints,
            max_constraint_length=config.max_constraint_length,
            max_constraint_text_length=config.max_constraint_text_length,
            constraint_compile_timeout_s=config.constraint_compile_timeout_s,
        )
        self._chat = ChatRenderer(self._tokenizer)
        self._compiler = ConstraintCompiler(
            self._tokenizer,
            int(text_config.vocab_size),
            max_text_length=config.max_constraint_text_length,
            timeout_s=config.constraint_compile_timeout_s,
            cache_size=config.constraint_cache_size,
            threads=config.constraint_compile_threads,
            max_choices=config.max_constraints,
        )
        model_id = config.model_id or config.model_path.name
        self._info = ModelInfo(
            model_id=model_id,
            model_path=path,
            dtype=config.dtype,
            device=str(device),
            context_length=context_length,
            vocab_size=int(text_config.vocab_size),
            eos_token_id=eos_ids[0] if eos_ids else None,
            limits=limits,
            chat_template=self._chat.has_template,
        )
        self._validation = ValidationContext(
            limits=limits,
            context_length=context_length,
            vocab_size=int(text_config.vocab_size),
            defaults=self._defaults,
            encode=self._encode,
            find_adapter=self._registry.get,
            adapter_names=self._registry.names,
            render_chat=self._chat.render,
            end_of_turn_ids=self._chat.end_of_turn_ids,
            compile_constraint=self._compiler.compile,
        )
        self._token_texts: dict[int, str] = {}
        decoder = cast(Decoder, self._tokenizer)
        step = ModelStep(self._registry, device)
        sampler = Sampler(device, self._token_text)
        self._batcher = Batcher(
            config,
            step,
            RowFactory(base, decoder, device, eos_ids),
            BeamRunner(step, sampler, decoder, device, int(pad_id), eos_ids),
            sampler,
            self._key_for,
            model_id,
            int(pad_id),
        )
        if self._rope_switch is not None:
            # A row moves sub-batch when its length crosses the switch (quirks.RopeSwitch).
            self._batcher.partition = self._rope_switch.side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._draining = False
        # Names of FAILED loads, oldest first (bounded by MAX_FAILED_ADAPTERS).
        self._failed: list[str] = []
        # Requests between check_admission and submit_prepared: they count as queued.
        self._preparing = 0
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, "peftserve-prepare")

    # ---- model facts ----
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def registry(self) -> AdapterRegistry:
        return self._registry

    def adapters(self) -> list[AdapterInfo]:
        """The adapters requests may name now (READY)."""
        return self._registry.infos()

    def adapter_statuses(self) -> list[AdapterStatus]:
        """Every known adapter in any state, by name."""
        return self._registry.statuses()

    def subscribe_adapters(self, listener: AdapterListener) -> Callable[[], None]:
        """Call ``listener`` (on the thread making the change) on every adapter state change."""
        return self._registry.subscribe(listener)

    @contextlib.contextmanager
    def watch_adapters(self) -> Iterator[AdapterWatch]:
        """A snapshot of every known adapter and an asyncio queue of the changes after it.

        Call on the loop thread. The queue is bounded (``max_watch_buffered_events``): a
        watcher that falls that far behind is dropped (its queue emptied, ``next_event`` raises
        ``SlowConsumerError``) rather than silently missing changes or holding memory without
        bound. ``None`` in the queue means the watch is over. Leaving the ``with`` block stops
        the feed.
        """
        with open_watch(
            self._registry, self._config.max_watch_buffered_events, self._draining, self._watches
        ) as watch:
            yield watch

    def _end_watches(self) -> None:
        # Watches never finish on their own; ending them here lets a graceful stop complete
        # their streams normally instead of cancelling them at the end of the grace period.
        self._draining = True
        for events in self._watches:
            events.put_nowait(None)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def tokenize(self, text: str, add_special_tokens: bool = True) -> TokenizeResult:
        """Tokenize ``text`` (any thread; the server uses ``tokenize_async``)."""
        self._check_tokenize(text)
        ids = self._encode(text, add_special_tokens)
        return TokenizeResult(tuple(ids), tuple(self._token_text(i) for i in ids))

    def _check_tokenize(self, text: str) -> None:
        if not text:
            raise InvalidRequestError.single("text", "must not be empty")
        check_text_bytes(text, "text", self._info.limits.max_prompt_bytes)

    async def tokenize_async(self, text: str, add_special_tokens: bool = True) -> TokenizeResult:
        """``tokenize`` on the preparation threads; empty or oversized text fails at once."""
        self._check_tokenize(text)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._prepare_pool, self.tokenize, text, add_special_tokens
        )

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def _key_for(self, job: Job) -> SubBatchKey:
        """The sub-batch a request's rows decode in (before the quirk partition)."""
        adapter = job.prepared.adapter
        if adapter is None:
            routed = self._registry.routes_adapters
            return SubBatchKey(ROUTED_GROUP if routed else "base", None)
        if adapter.mixed_batching:
            return SubBatchKey(ROUTED_GROUP, None)
        return SubBatchKey(adapter.group, adapter.name)

    # ---- lifecycle ----
    async def start(self) -> None:
        if self._closed:
            raise EngineUnavailableError("the engine was stopped")
        self._loop = asyncio.get_running_loop()
        self._batcher.start()

    def check_admission(self, request: GenerationRequest, reserved: int = 0) -> None:
        """Raise at once if ``request`` cannot be admitted now, without tokenizing anything.

        Not running -> UNAVAILABLE, deadline passed, queue full (counting the ``reserved``
        requests being prepared), request id, text or token ids beyond their bounds.
        """
        if self._loop is None or self._closed:
            raise EngineUnavailableError("the engine is not running")
        if request.deadline is not None and time.monotonic() >= request.deadline:
            raise DeadlineExceededError("the request arrived after its deadline")
        check_bounds(request, self._info.limits)
        self._batcher.check_admission(reserved)

    def check_queue(self) -> None:
        """Raise at once if no request could be admitted now (not running, queue full, the
        requests being prepared counted), before anything of a request is read: under a
        flood most calls end here, so this is the cheapest refusal there is."""
        if self._loop is None or self._closed:
            raise EngineUnavailableError("the engine is not running")
        self._batcher.check_queue(self._preparing)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and validate ``request`` (thread-safe; may take a while for long texts)."""
        return prepare(request, self._validation)

    async def prepare_async(self, request: GenerationRequest) -> PreparedRequest:
        """``check_admission`` on the loop, then ``prepare`` on the engine's threads.

        Requests being prepared count against the queue, so a flood is refused at the cheap
        check instead of queueing up for the tokenizer.
        """
        self.check_admission(request, self._preparing)
        self._preparing += 1
        try:
            if request.constraint is not None:
                # Compiled in the compiler's own threads within its time limit, so ``prepare``
                # finds it in the cache and a slow grammar never holds a preparing thread.
                await self._compiler.compile_async(request.constraint)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._prepare_pool, self.prepare, request)
        finally:
            self._preparing -= 1

    def submit(self, request: GenerationRequest, stream: bool = False) -> RequestHandle:
        """Check, prepare and submit inline (in-process callers; the server prepares off-loop)."""
        self.check_admission(request)
        return self.submit_prepared(self.prepare(request), stream)

    async def submit_async(self, request: GenerationRequest, stream: bool = False) -> RequestHandle:
        """What the servicer calls: ``await_adapter``, ``prepare_async``, ``submit_prepared``.

        Every refusal is raised here; after it, outcomes arrive through the handle.
        """
        await self.await_adapter(request.adapter, request.deadline)
        prepared = await self.prepare_async(request)
        return self.submit_prepared(prepared, stream)

    def submit_prepared(
        self,
        prepared: PreparedRequest,
        stream: bool = False,
        handle_factory: HandleFactory = RequestHandle,
    ) -> RequestHandle:
        """Enqueue a prepared request (loop thread); never waits on the model.

        ``handle_factory`` builds the handle (the engine process's forwards to the front).
        """
        loop = self._loop
        request = prepared.request
        if loop is None or self._closed:
            raise EngineUnavailableError("the engine is not running")
        if request.deadline is not None and time.monotonic() >= request.deadline:
            raise DeadlineExceededError(
                f"request {request.request_id!r} passed its deadline while being prepared"
            )
        if prepared.adapter is not None and self._registry.get(prepared.adapter.name) is None:
            # Unloaded or evicted while the request was being prepared.
            raise AdapterNotFoundError(prepared.adapter.name, self._registry.names())
        batcher = self._batcher
        holder: list[Job] = []
        handle = handle_factory(
            request.request_id,
            stream,
            loop,
            lambda: batcher.cancel(holder[0]),
            self._config.max_stream_buffered_tokens,
        )
        job = Job(prepared, handle, loop)
        holder.append(job)
        batcher.admit(job)
        if prepared.adapter is not None:
            # Counted from admission to outcome, so unload and eviction wait for queued work too.
            name = prepared.adapter.name
            self._registry.acquire(name)
            handle.add_done_callback(lambda: self._registry.release(name))
        return handle

    # ---- adapter lifecycle (loop thread) ----
    def _adapters_root(self) -> Path:
        root = self._config.adapters_dir
        if root is None:
            raise AdapterStateError("the server has no adapters root (--adapters-dir)")
        return root

    async def load_adapter(self, name: str, path: str = "", pinned: bool = False) -> AdapterStatus:
        """Load ``path`` (relative to the adapters root; default ``name``) as ``name``.

        Idempotent for the same name and path (a ``pinned`` is applied). Raises
        ``InvalidRequestError`` (field ``name``/``path``), ``AdapterLoadError`` (the directory
        is unusable; the adapter is then FAILED), ``AdapterExistsError``,
        ``AdapterStateError`` (unloading) or ``AdapterBudgetError``.
        """
        if self._loop is None or self._closed:
            raise EngineUnavailableError("the engine is not running")
        check_adapter_name(name, "name")
        root = self._adapters_root()
        directory = resolve_adapter_dir(root, path or name, "path")
        relative = directory.relative_to(root.resolve()).as_posix()
        existing = self._registry.entry(name)
        if existing is not None and existing.state is not AdapterState.FAILED:
            if existing.path != relative:
                raise AdapterExistsError(
                    f"adapter {name!r} is already loaded from {existing.path!r}; unload it first"
                )
            if existing.state is AdapterState.UNLOADING:
                raise AdapterStateError(f"adapter {name!r} is being unloaded; retry afterwards")
            if existing.state is AdapterState.LOADING:
                status = await asyncio.shield(self._loads[name])
            else:
                status = existing
            if pinned and not status.pinned:
                status = self._registry.set_state(name, status.state, pinned=True)
            return status
        if not directory.is_dir():
            # Refused before anything is registered: a FAILED entry per missing path let any
            # caller grow the adapter list (and ListAdapters) without bound.
            raise AdapterPathNotFoundError(path or name)
        return await asyncio.shield(self._start_load(name, directory, relative, pinned))

    def _start_load(
        self, name: str, directory: Path, relative: str, pinned: bool
    ) -> asyncio.Future[AdapterStatus]:
        """Claim budget room and start loading in a task of its own (a caller that gives up
        does not leave a half-loaded adapter behind)."""
        assert self._loop is not None
        budget = self._config.max_loaded_adapters
        victim: str | None = None
        if budget and self._registry.occupying() >= budget:
            victim = self._registry.eviction_candidate()
            if victim is None:
                raise AdapterBudgetError(
                    f"the adapter budget ({budget}) is full of pinned or busy adapters; "
                    "unload one or retry when one is idle"
                )
            self._registry.set_state(victim, AdapterState.UNLOADING)
        future: asyncio.Future[AdapterStatus] = self._loop.create_future()
        self._loads[name] = future
        self._registry.set_state(name, AdapterState.LOADING, path=relative, pinned=pinned)
        task = asyncio.create_task(self._load(name, directory, victim, future))
        self._load_tasks.add(task)
        task.add_done_callback(self._load_tasks.discard)
        return future

    async def _load(
        self,
        name: str,
        directory: Path,
        victim: str | None,
        future: asyncio.Future[AdapterStatus],
    ) -> None:
        try:
            if victim is not None:
                logger.info("evicting adapter %s (least recently used) to load %s", victim, name)
                await self._detach(victim)
            root = self._adapters_root()
            info = await asyncio.to_thread(inspect_adapter, directory, name, root, "path")
            info = await asyncio.wrap_future(
                self._batcher.run_between_steps(lambda: self._registry.attach(info))
            )
        except AdapterLoadError as error:
            logger.error("%s", error.message)
            self._registry.load_errors[name] = error
            self._registry.set_state(name, AdapterState.FAILED, error=error.detail)
            self._forget_old_failures(name)
            future.set_exception(error)
            future.exception()  # retrieved: nobody may be waiting, and that is fine
        except BaseException as error:
            wrapped = AdapterLoadError(name, f"{type(error).__name__}: {error}")
            self._registry.set_state(name, AdapterState.FAILED, error=wrapped.detail)
            self._forget_old_failures(name)
            future.set_exception(wrapped)
            future.exception()
            if not isinstance(error, Exception):
                raise
        else:
            logger.info("loaded adapter %s (%s, sha256 %s)", name, info.peft_type, info.sha256)
            future.set_result(self._registry.set_state(name, AdapterState.READY, info=info))
        finally:
            self._loads.pop(name, None)

    def _forget_old_failures(self, name: str) -> None:
        """Keep the newest ``MAX_FAILED_ADAPTERS`` FAILED entries; forget older ones."""
        if name in self._failed:
            self._failed.remove(name)
        self._failed.append(name)
        while len(self._failed) > MAX_FAILED_ADAPTERS:
            oldest = self._failed.pop(0)
            entry = self._registry.entry(oldest)
            if entry is not None and entry.state is AdapterState.FAILED:
                self._registry.load_errors.pop(oldest, None)
                self._registry.remove(oldest)

    async def _detach(self, name: str) -> AdapterStatus | None:
        await asyncio.wrap_future(
            self._batcher.run_between_steps(lambda: self._registry.detach(name))
        )
        return self._registry.remove(name)

    async def unload_adapter(self, name: str, deadline: float | None = None) -> AdapterStatus:
        """Unload ``name``: refuse new requests for it, wait for admitted ones, remove it.

        ``deadline`` (``time.monotonic()``) bounds the wait; when it passes the adapter is
        READY again and ``DeadlineExceededError`` is raised, so an unload is all or nothing.
        """
        if not name:
            raise InvalidRequestError.single("name", "must not be empty")
        status = self._registry.entry(name)
        if status is None:
            raise AdapterNotFoundError(name, self._registry.names())
        if status.state is AdapterState.LOADING:
            raise AdapterStateError(f"adapter {name!r} is still loading; retry when it is READY")
        if status.state is AdapterState.UNLOADING:
            raise AdapterStateError(f"adapter {name!r} is already being unloaded")
        if status.state is AdapterState.FAILED:
            self._registry.load_errors.pop(name, None)
            return self._registry.remove(name) or status
        self._registry.set_state(name, AdapterState.UNLOADING)
        try:
            while (current := self._registry.entry(name)) is not None and current.in_flight > 0:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"adapter {name!r} still had {current.in_flight} request(s) in flight "
                        "at the deadline; it stays loaded"
                    )
                await asyncio.sleep(0.01)
        except BaseException:
            self._registry.set_state(name, AdapterState.READY)
            raise
        last = self._registry.entry(name) or status
        await self._detach(name)
        logger.info("unloaded adapter %s", name)
        return last

    async def await_adapter(self, name: str, deadline: float | None = None) -> None:
        """Before ``submit``: wait (within ``deadline``) for ``name`` if it is loading, and
        lazily start loading it when lazy loading is on and it is a subdirectory of the root.

        Anything else returns at once and ``submit`` decides (NOT_FOUND for unknown names).
        """
        if not name:
            return
        status = self._registry.entry(name)
        if status is None and self._lazy_loadable(name):
            root = self._adapters_root()
            self._start_load(name, resolve_adapter_dir(root, name), name, pinned=False)
            status = self._registry.entry(name)
        if status is None or status.state is not AdapterState.LOADING:
            return
        future = self._loads.get(name)
        if future is None:
            return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise DeadlineExceededError(
                f"the deadline passed while adapter {name!r} was loading"
            ) from None

    def _lazy_loadable(self, name: str) -> bool:
        """Fail closed: only plain names of existing adapter directories inside the root."""
        root = self._config.adapters_dir
        if not self._config.lazy_load_adapters or root is None:
            return False
        if not ADAPTER_NAME_PATTERN.fullmatch(name):
            return False
        candidate = root / name
        try:
            inside = candidate.resolve().is_relative_to(root.resolve())
        except OSError:
            return False
        return inside and (candidate / CONFIG_FILE).is_file()

    async def _wait_idle(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while self._batcher.outstanding() > 0:
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.01)
        return True

    async def drain(self, timeout_s: float) -> None:
        """Admit nothing more; let queued and running requests finish; cancel the rest."""
        self._batcher.stop_admitting()
        self._end_watches()
        if not await self._wait_idle(timeout_s):
            self._batcher.abort_all("the engine is draining")
            await self._wait_idle(CANCEL_GRACE_S)

    async def stop(self) -> None:
        """Cancel everything and join the worker thread."""
        self._closed = True
        self._batcher.stop_admitting()
        self._end_watches()
        self._batcher.abort_all("the engine is stopping")
        await self._wait_idle(CANCEL_GRACE_S)
        await self._batcher.join()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._compiler.close()

    def stats(self) -> EngineStats:
        return self._batcher.stats()

    @property
    def step_seconds(self) -> float:
        """Recent model step time, as the queue-full retry hint uses it (``retry_after_s``)."""
        return self._batcher.step_seconds

    def add_step_listener(self, listener: StepListener) -> Callable[[], None]:
        """Call ``listener(StepStats)`` on the worker thread after every model step (metrics).

        Returns the function that unsubscribes it. A listener must be quick and thread-safe.
        """
        return self._batcher.add_step_listener(listener)


class _WatchedRegistry(Protocol):
    def subscribe(self, listener: AdapterListener) -> Callable[[], None]: ...
    def statuses(self) -> list[AdapterStatus]: ...


@contextlib.contextmanager
def open_watch(
    registry: _WatchedRegistry,
    limit: int,
    draining: bool,
    watches: set[asyncio.Queue[AdapterEvent | None]],
) -> Iterator[AdapterWatch]:
    """``watch_adapters`` over any registry (the engine's, or the front's mirror of it)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[AdapterEvent | None] = asyncio.Queue()
    watch = AdapterWatch((), events)
    if draining:
        events.put_nowait(None)

    def put(event: AdapterEvent) -> None:
        if watch.dropped:
            return
        if events.qsize() >= limit:
            watch.dropped = True
            while not events.empty():
                events.get_nowait()
            events.put_nowait(None)
            logger.warning("dropped an adapter watcher %d changes behind", limit)
            return
        events.put_nowait(event)

    def feed(event: AdapterEvent) -> None:
        # Changes are made on the loop today; a thread-safe hand-off keeps a change made
        # on another thread from corrupting the queue.
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            put(event)
        else:
            loop.call_soon_threadsafe(put, event)

    # Subscribe, then snapshot, with nothing in between that could yield to the loop:
    # every change after the snapshot is in the queue, none before it.
    unsubscribe = registry.subscribe(feed)
    watch.snapshot = tuple(registry.statuses())
    watches.add(events)
    try:
        yield watch
    finally:
        watches.discard(events)
        unsubscribe()
