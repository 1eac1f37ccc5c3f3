"""The decode loop: requests join and leave at every step, and still get their solo tokens.

Each test compares greedy requests with a solo ``PeftModel.generate`` run token for token:
a request joining a batch that is already decoding, rows leaving (finished or cancelled)
while others continue, a prompt prefilled in chunks next to decoding rows, and a seeded
random stress of arrivals, lengths, adapters (LoRA and non-LoRA) and cancels.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from peftserve.server.engine import Engine, StepStats
from peftserve.server.engine.types import (
    FinishReason,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
)

from .conftest import Reference


def _text(n_chars: int, seed: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.!?"
    return "".join(alphabet[(seed * 11 + i * 7) % len(alphabet)] for i in range(n_chars))


def _greedy(
    rid: str, text: str, adapter: str, n: int, *, min_new: int | None = None
) -> GenerationRequest:
    params = GenerationParams(max_new_tokens=n, min_new_tokens=min_new, do_sample=False)
    return GenerationRequest(rid, text=text, adapter=adapter, parameters=params)


def _solo(engine: Engine, reference: Reference, request: GenerationRequest) -> tuple[int, ...]:
    prompt = list(engine.tokenize(request.text or "").token_ids)
    p = request.parameters
    kwargs: dict[str, object] = {"max_new_tokens": p.max_new_tokens, "do_sample": False}
    if p.min_new_tokens:
        kwargs["min_new_tokens"] = p.min_new_tokens
    row = reference.generate(request.adapter, prompt, **kwargs)[0]
    eos = engine.info.eos_token_id
    return tuple(row[: row.index(eos) + 1] if eos in row else row)


def _adapters(engine: Engine) -> tuple[str, str, str]:
    infos = engine.adapters()
    lora = sorted(a.name for a in infos if a.peft_type == "LORA")
    other = sorted(a.name for a in infos if a.peft_type != "LORA")
    return lora[0], lora[1], other[0]


def test_request_joining_a_running_batch_gets_its_solo_tokens(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    lora_a, lora_b, other = _adapters(engine)
    first = _greedy("first", _text(12, 1), lora_a, 40, min_new=40)
    joiners = [
        _greedy("join-base", _text(30, 2), "", 9),
        _greedy("join-lora", _text(5, 3), lora_b, 12),
        _greedy("join-same", _text(21, 4), lora_a, 7),
        _greedy("join-other", _text(17, 5), other, 8),
    ]

    async def body() -> tuple[GenerationResult, list[GenerationResult]]:
        running = engine.submit(first, stream=True)
        seen = 0
        handles = []
        async for event in running:
            seen += len(event.token_ids)
            if seen >= 5 and not handles:  # the first request is decoding: join it now
                handles = [engine.submit(r) for r in joiners]
        return await running.result(), [await h.result() for h in handles]

    head, joined = aio.run(body())
    assert head.sequences[0].token_ids == _solo(engine, reference, first)
    for request, result in zip(joiners, joined, strict=True):
        assert result.sequences[0].token_ids == _solo(engine, reference, request), (
            request.request_id
        )
    # The LoRA and base joiners decoded in the same forward as the running request.
    assert max(r.batch_size for r in joined) >= 3


def test_rows_leaving_while_others_continue(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    lora_a, lora_b, other = _adapters(engine)
    requests = [
        _greedy("short", _text(8, 6), lora_a, 2, min_new=2),
        _greedy("mid", _text(40, 7), "", 9, min_new=9),
        _greedy("long", _text(3, 8), lora_b, 24, min_new=24),
        _greedy("cancelled", _text(25, 9), lora_a, 60, min_new=60),
        _greedy("other-short", _text(9, 10), other, 3, min_new=3),
        _greedy("other-long", _text(33, 11), other, 14, min_new=14),
    ]

    async def body() -> list[GenerationResult]:
        handles = [engine.submit(r, stream=r.request_id == "cancelled") for r in requests]
        seen = 0
        async for event in handles[3]:
            seen += len(event.token_ids)
            if seen == 6:
                handles[3].cancel()
        return [await h.result() for h in handles]

    results = aio.run(body())
    for request, result in zip(requests, results, strict=True):
        got = result.sequences[0].token_ids
        solo = _solo(engine, reference, request)
        if request.request_id == "cancelled":
            assert result.sequences[0].finish_reason is FinishReason.CANCELLED
            assert 6 <= len(got) < 60 and got == solo[: len(got)]
        else:
            assert got == solo, request.request_id
    assert engine.stats().running_rows == 0


def test_chunk_prefilled_prompt_next_to_decoding_rows(
    chunked_engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    engine = chunked_engine
    lora_a, lora_b, _ = _adapters(engine)
    decoding = [
        _greedy("dec-a", _text(6, 12), lora_a, 30, min_new=30),
        _greedy("dec-base", _text(10, 13), "", 30, min_new=30),
    ]
    long_prompt = _greedy("long-prompt", _text(120, 14), lora_b, 10)
    steps: list[StepStats] = []
    unsubscribe = engine.add_step_listener(steps.append)

    async def body() -> list[GenerationResult]:
        handles = [engine.submit(r, stream=True) for r in decoding]
        async for _ in handles[0]:
            break
        handles.append(engine.submit(long_prompt))
        return [await h.result() for h in handles]

    try:
        results = aio.run(body())
    finally:
        unsubscribe()
    for request, result in zip([*decoding, long_prompt], results, strict=True):
        assert result.sequences[0].token_ids == _solo(engine, reference, request), (
            request.request_id
        )
    assert all(s.prefill_tokens <= 16 for s in steps)
    # The long prompt went in several chunks, each in a step that also decoded the others.
    chunked = [s for s in steps if s.prefill_tokens > 0 and s.decode_tokens > 0]
    assert len(chunked) >= 120 // 16


@pytest.mark.parametrize("seed", [0, 1])
def test_random_arrivals_lengths_adapters_and_cancels_equal_solo(
    engine: Engine, reference: Reference, aio: asyncio.Runner, seed: int
) -> None:
    rng = random.Random(seed)
    lora_a, lora_b, other = _adapters(engine)
    adapters = ["", lora_a, lora_b, other]
    requests = [
        _greedy(
            f"r{seed}-{i}",
            _text(rng.randint(1, 60), rng.randint(0, 999)),
            rng.choice(adapters),
            rng.randint(1, 14),
        )
        for i in range(24)
    ]
    cancel = {r.request_id for r in requests if rng.random() < 0.2}
    delays = [rng.choice([0.0, 0.0, 0.002, 0.01, 0.03]) for _ in requests]

    async def one(request: GenerationRequest, delay: float) -> GenerationResult:
        await asyncio.sleep(delay)
        handle = engine.submit(request, stream=True)
        async for _ in handle:
            if request.request_id in cancel:
                handle.cancel()
        return await handle.result()

    async def body() -> list[GenerationResult]:
        tasks = []
        for request, delay in zip(requests, delays, strict=True):
            tasks.append(asyncio.create_task(one(request, delay)))
            await asyncio.sleep(rng.choice([0.0, 0.003]))
        return list(await asyncio.gather(*tasks))

    results = aio.run(body())
    completed = 0
    for request, result in zip(requests, results, strict=True):
        got = result.sequences[0].token_ids
        solo = _solo(engine, reference, request)
        if result.sequences[0].finish_reason is FinishReason.CANCELLED:
            assert got == solo[: len(got)], request.request_id
        else:
            completed += 1
            assert got == solo, request.request_id
    assert completed >= len(requests) // 2
    assert max(r.batch_size for r in results) > 2, "the requests should have shared steps"
    assert engine._batcher.tracked() == 0


def test_beam_search_does_not_freeze_the_running_batch(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    lora_a, lora_b, _ = _adapters(engine)
    beam = GenerationRequest(
        "beam",
        text=_text(9, 15),
        adapter=lora_a,
        parameters=GenerationParams(max_new_tokens=100, min_new_tokens=100, num_beams=3),
    )
    streams = [_greedy("next-to-beam", _text(14, 16), lora_b, 10, min_new=10)]
    steps: list[StepStats] = []
    unsubscribe = engine.add_step_listener(steps.append)

    async def body() -> tuple[GenerationResult, GenerationResult, bool]:
        beam_handle = engine.submit(beam)
        while engine.stats().running == 0:
            await asyncio.sleep(0.001)
        stream = engine.submit(streams[0], stream=True)
        async for _ in stream:
            pass
        beam_still_running = not beam_handle.done
        return await stream.result(), await beam_handle.result(), beam_still_running

    try:
        streamed, beamed, beam_still_running = aio.run(body())
    finally:
        unsubscribe()
    # The stream decoded between the beam's steps and finished while the beam went on.
    assert beam_still_running
    assert streamed.sequences[0].token_ids == _solo(engine, reference, streams[0])
    prompt = list(engine.tokenize(beam.text or "").token_ids)
    solo_beam = reference.generate(
        lora_a, prompt, max_new_tokens=100, min_new_tokens=100, num_beams=3
    )[0]
    assert beamed.sequences[0].token_ids == tuple(solo_beam)
    # One StepStats per beam step, with the stream's rows added while it ran.
    assert sum(1 for s in steps if s.rows == 3) >= 50
    assert any(s.rows == 4 and s.decode_tokens == 4 for s in steps)
