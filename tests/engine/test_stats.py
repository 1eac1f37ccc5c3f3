"""Engine load statistics and step listeners: what metrics and admission read."""

from __future__ import annotations

import asyncio

from peftserve.server.engine import Engine, StepStats
from peftserve.server.engine.types import GenerationParams, GenerationRequest

from .conftest import ModelFiles


def test_stats_report_rows_kv_and_adapters_while_running(
    engine: Engine, model_files: ModelFiles, aio: asyncio.Runner
) -> None:
    adapter = sorted(a.name for a in engine.adapters())[0]
    steps: list[StepStats] = []
    unsubscribe = engine.add_step_listener(steps.append)
    request = GenerationRequest(
        "stats",
        text="watch me",
        adapter=adapter,
        parameters=GenerationParams(
            max_new_tokens=40, min_new_tokens=40, num_return_sequences=2, do_sample=True, seed=1
        ),
    )

    async def body() -> None:
        handle = engine.submit(request, stream=True)
        seen = None
        async for _ in handle:
            if seen is None:
                seen = engine.stats()
        await handle.result()
        assert seen is not None
        assert seen.running == 1
        assert seen.running_rows == 2
        assert seen.running_adapters == (adapter,)
        assert seen.waiting_adapters == ()
        assert 0 < seen.kv_tokens_used <= seen.kv_tokens_budget
        assert 0.0 < seen.kv_cache_utilization <= 1.0

    try:
        aio.run(body())
    finally:
        unsubscribe()
    after = engine.stats()
    assert after.running_rows == 0 and after.kv_tokens_used == 0
    assert after.kv_cache_utilization == 0.0
    # 40 tokens for each of 2 rows: the prompt goes through the model once, then decode steps.
    assert len(steps) >= 40
    assert steps[0].prefill_tokens > 0
    assert all(s.prefill_tokens == 0 for s in steps[1:])
    assert all(s.rows == 2 and s.decode_tokens <= s.rows and s.seconds >= 0 for s in steps)
    count = len(steps)
    aio.run(engine.submit(GenerationRequest("quiet", text="x"), stream=False).result())
    assert len(steps) == count  # unsubscribed: no more calls
