"""The engine facade the servicer calls: load, validate, submit, drain, stop, stats.

``Engine.__init__`` loads synchronously (the server runs it in ``asyncio.to_thread``);
``start`` binds the engine to the running event loop and starts the worker thread. ``submit``
runs on the loop thread: it validates and enqueues without ever waiting on the model.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .batcher import Batcher, EngineStats
from .config import EngineConfig
from .detokenize import Decoder
from .errors import DeadlineExceededError, EngineUnavailableError
from .handle import Job, RequestHandle
from .registry import AdapterRegistry
from .runner import BatchKey, ModelRunner
from .types import AdapterInfo, EngineLimits, GenerationRequest, ModelInfo, TokenizeResult
from .validation import ValidationContext, prepare

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How long drain/stop wait for cancelled running rows to reach their next step.
CANCEL_GRACE_S = 10.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        self._registry = AdapterRegistry(base, config.adapters_dir)

        text_config = base.config.get_text_config()
        context_length = int(
            getattr(text_config, "max_position_embeddings", 0) or self._tokenizer.model_max_length
        )
        eos_ids = _as_ids(self._defaults.eos_token_id) or _as_ids(self._tokenizer.eos_token_id)
        pad_id = self._defaults.pad_token_id
        if pad_id is None:
            pad_id = (
                self._tokenizer.pad_token_id
                if self._tokenizer.pad_token_id is not None
                else eos_ids[0]
            )
        limits = EngineLimits(
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_queue_size=config.max_queue_size,
            max_prompt_tokens=min(config.max_prompt_tokens or context_length, context_length),
            max_new_tokens=min(config.max_new_tokens or context_length, context_length),
            default_max_new_tokens=config.default_max_new_tokens,
            max_beams_times_sequences=config.max_beams_times_sequences,
            max_stop_sequences=config.max_stop_sequences,
            max_stop_sequence_length=config.max_stop_sequence_length,
            max_top_logprobs=config.max_top_logprobs,
            max_constraints=config.max_constraints,
            max_constraint_length=config.max_constraint_length,
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
        )
        self._validation = ValidationContext(
            limits=limits,
            context_length=context_length,
            vocab_size=int(text_config.vocab_size),
            defaults=self._defaults,
            encode=self._encode,
            find_adapter=self._registry.get,
            adapter_names=self._registry.names,
        )
        self._runner = ModelRunner(
            self._registry, cast(Decoder, self._tokenizer), device, int(pad_id), eos_ids
        )
        self._batcher = Batcher(config, self._runner, self._key_for, model_id, context_length)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # ---- model facts ----
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def registry(self) -> AdapterRegistry:
        return self._registry

    def adapters(self) -> list[AdapterInfo]:
        return self._registry.infos()

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def tokenize(self, text: str, add_special_tokens: bool = True) -> TokenizeResult:
        ids = self._encode(text, add_special_tokens)
        return TokenizeResult(tuple(ids), tuple(self._runner.token_text(i) for i in ids))

    def _key_for(self, job: Job) -> BatchKey:
        prepared = job.prepared
        adapter = prepared.adapter
        if adapter is None:
            mixed = self._registry.mixed_group
            group, name = (mixed.peft_type, None) if mixed is not None else ("base", None)
        elif adapter.mixed_batching:
            group, name = adapter.peft_type, None
        else:
            group, name = adapter.peft_type, adapter.name
        e = prepared.effective
        beam = (
            (
                e.num_beams,
                e.num_return_sequences,
                e.length_penalty,
                e.early_stopping,
                e.max_new_tokens,
            )
            if prepared.beams
            else None
        )
        return BatchKey(group, name, beam)

    # ---- lifecycle ----
    async def start(self) -> None:
        if self._closed:
            raise EngineUnavailableError("the engine was stopped")
        self._loop = asyncio.get_running_loop()
        self._batcher.start()

    def submit(self, request: GenerationRequest, stream: bool = False) -> RequestHandle:
        loop = self._loop
        if loop is None or self._closed:
            raise EngineUnavailableError("the engine is not running")
        if request.deadline is not None and time.monotonic() >= request.deadline:
            raise DeadlineExceededError(
                f"request {request.request_id!r} arrived after its deadline"
            )
        prepared = prepare(request, self._validation)
        batcher = self._batcher
        holder: list[Job] = []
        handle = RequestHandle(request.request_id, stream, loop, lambda: batcher.cancel(holder[0]))
        job = Job(prepared, handle, loop)
        holder.append(job)
        batcher.admit(job)
        return handle

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
        if not await self._wait_idle(timeout_s):
            self._batcher.abort_all("the engine is draining")
            await self._wait_idle(CANCEL_GRACE_S)

    async def stop(self) -> None:
        """Cancel everything and join the worker thread."""
        self._closed = True
        self._batcher.stop_admitting()
        self._batcher.abort_all("the engine is stopping")
        await self._wait_idle(CANCEL_GRACE_S)
        await self._batcher.join()

    def stats(self) -> EngineStats:
        return self._batcher.stats()
