"""Cancellation, deadlines, the bounded queue, drain/stop and adapter loading."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from peftserve.server.engine import Engine
from peftserve.server.engine.errors import (
    DeadlineExceededError,
    EngineUnavailableError,
    QueueFullError,
)
from peftserve.server.engine.registry import shares_base_weights
from peftserve.server.engine.types import (
    FinishReason,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
)

from .conftest import PICKLE_ADAPTER, ModelFiles, engine_config

# min_new_tokens keeps EOS away so the request is still running when the test acts.
LONG = GenerationRequest(
    "long", text="go on", parameters=GenerationParams(max_new_tokens=150, min_new_tokens=150)
)
SHORT = GenerationRequest("short", text="hi", parameters=GenerationParams(max_new_tokens=3))


@pytest.fixture
def serial_engine(model_files: ModelFiles, aio: asyncio.Runner) -> Iterator[Engine]:
    """An engine that runs one request at a time with a tiny queue."""
    eng = Engine(engine_config(model_files, max_batch_size=1, max_queue_size=2, max_wait_ms=0.0))
    aio.run(eng.start())
    yield eng
    aio.run(eng.stop())
    assert eng.stats().running == 0


def _idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats.queued == 0 and stats.running == 0


def test_cancel_mid_generation_returns_partial_tokens(engine: Engine, aio: asyncio.Runner) -> None:
    async def body() -> GenerationResult:
        handle = engine.submit(LONG, stream=True)
        count = 0
        async for event in handle:
            count += len(event.token_ids)
            if count == 3:
                handle.cancel()
        return await handle.result()

    result = aio.run(body())
    seq = result.sequences[0]
    assert seq.finish_reason is FinishReason.CANCELLED
    assert 3 <= len(seq.token_ids) < 150
    assert _idle(engine)


def test_deadline_while_queued_raises_without_running(
    serial_engine: Engine, aio: asyncio.Runner
) -> None:
    async def body() -> None:
        long_handle = engine.submit(LONG, stream=True)
        await long_handle.__aiter__().__anext__()
        late = engine.submit(replace(SHORT, request_id="late", deadline=time.monotonic() + 0.05))
        with pytest.raises(DeadlineExceededError):
            await late.result()
        assert not long_handle.done  # expired while the long request was still running
        long_handle.cancel()
        await long_handle.result()

    engine = serial_engine
    aio.run(body())
    assert _idle(engine)


def test_deadline_already_passed_is_refused(engine: Engine) -> None:
    with pytest.raises(DeadlineExceededError):
        engine.submit(replace(SHORT, deadline=time.monotonic() - 1))


def test_deadline_while_running_ends_rows(engine: Engine, aio: asyncio.Runner) -> None:
    # Every step is held 20 ms on the worker (a step listener), so 240 tokens take at least
    # 4.8 s whatever the machine's speed: the 0.3 s deadline always passes while it runs.
    params = GenerationParams(max_new_tokens=240, min_new_tokens=240)
    request = replace(
        LONG, request_id="deadline", parameters=params, deadline=time.monotonic() + 0.3
    )
    unsubscribe = engine.add_step_listener(lambda stats: time.sleep(0.02))
    try:
        result = aio.run(engine.submit(request).result())
    finally:
        unsubscribe()
    assert result.sequences[0].finish_reason is FinishReason.DEADLINE_EXCEEDED
    assert len(result.sequences[0].token_ids) < 240
    assert _idle(engine)


def test_queue_full_and_cancel_while_queued(serial_engine: Engine, aio: asyncio.Runner) -> None:
    engine = serial_engine

    async def body() -> None:
        running = engine.submit(LONG, stream=True)
        await running.__aiter__().__anext__()
        queued = [engine.submit(replace(SHORT, request_id=f"q{i}")) for i in range(2)]
        assert engine.stats().queued == 2
        with pytest.raises(QueueFullError) as info:
            engine.submit(replace(SHORT, request_id="overflow"))
        assert info.value.retry_after_s > 0
        queued[0].cancel()
        cancelled = await queued[0].result()
        assert [s.finish_reason for s in cancelled.sequences] == [FinishReason.CANCELLED]
        assert cancelled.sequences[0].token_ids == ()
        running.cancel()
        assert (await running.result()).sequences[0].finish_reason is FinishReason.CANCELLED
        done = await queued[1].result()
        assert done.sequences[0].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)

    aio.run(body())
    assert _idle(engine)
    # A request cancelled while queued leaves no bookkeeping behind (it used to leak its key).
    assert engine._batcher.tracked() == 0


def test_drain_finishes_work_then_refuses(model_files: ModelFiles, aio: asyncio.Runner) -> None:
    eng = Engine(engine_config(model_files))

    async def body() -> None:
        with pytest.raises(EngineUnavailableError):
            eng.submit(SHORT)
        await eng.start()
        handles = [eng.submit(replace(SHORT, request_id=f"d{i}")) for i in range(3)]
        await eng.drain(timeout_s=30)
        for h in handles:
            reason = (await h.result()).sequences[0].finish_reason
            assert reason in (FinishReason.LENGTH, FinishReason.EOS)
        with pytest.raises(EngineUnavailableError):
            eng.submit(SHORT)
        await eng.stop()

    aio.run(body())
    assert _idle(eng)


def test_drain_timeout_cancels_running_work(model_files: ModelFiles, aio: asyncio.Runner) -> None:
    eng = Engine(engine_config(model_files))

    async def body() -> None:
        await eng.start()
        handle = eng.submit(LONG, stream=True)
        await handle.__aiter__().__anext__()
        await eng.drain(timeout_s=0)
        assert (await handle.result()).sequences[0].finish_reason is FinishReason.CANCELLED
        await eng.stop()

    aio.run(body())
    assert _idle(eng)


def test_adapters_loaded_with_shared_base_weights(engine: Engine, model_files: ModelFiles) -> None:
    infos = {a.name: a for a in engine.adapters()}
    assert len({a.peft_type for a in infos.values()}) >= 2
    assert all(len(a.sha256) == 64 for a in infos.values())
    registry = engine.registry
    for group in registry.groups.values():
        assert shares_base_weights(registry.base, group.model)
    # The routed tree holds the base tensors and no parameter of its own.
    tree = registry.routed.model
    assert shares_base_weights(registry.base, tree)
    assert {p.data_ptr() for p in tree.parameters()} == {
        p.data_ptr() for p in registry.base.parameters()
    }
    base_bytes = sum(p.numel() * p.element_size() for p in registry.base.parameters())
    distinct = {
        p.data_ptr(): p.numel() * p.element_size()
        for g in registry.groups.values()
        for p in g.model.parameters()
    }
    distinct.update(
        {p.data_ptr(): p.numel() * p.element_size() for p in registry.base.parameters()}
    )
    # Base weights once, plus the (small) adapter weights.
    assert sum(distinct.values()) < 1.5 * base_bytes
    assert torch.is_inference_mode_enabled() is False


def test_pickle_only_adapter_is_refused_and_skipped(
    engine: Engine, model_files: ModelFiles
) -> None:
    if model_files.demo:
        pytest.skip("the demo model ships no pickle-only adapter")
    assert PICKLE_ADAPTER not in {a.name for a in engine.adapters()}
    assert PICKLE_ADAPTER in engine.registry.load_errors
