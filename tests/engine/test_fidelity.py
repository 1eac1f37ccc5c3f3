"""Batching must not change any request's output.

A mixed workload (greedy, seeded sampling, beams; base and every adapter; prompts of 1 to
100+ tokens; different max_new_tokens and stop sequences) is submitted concurrently. Every
greedy/beam request must return exactly the tokens of a solo ``PeftModel.generate``; every
sampled request exactly the tokens of the same request run alone through the engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from peftserve.server.engine import Engine
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.types import (
    FinishReason,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    ResponseOptions,
    TokenEvent,
)

from .conftest import DEMO, Reference

REPO_DEMO_BASE = DEMO / "base"


@dataclass(frozen=True)
class Case:
    request: GenerationRequest
    # generate() kwargs of the equivalent solo run; None = compare with a solo engine run.
    solo: dict[str, Any] | None = field(default=None)


def _prompt(n_chars: int, seed: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.!?"
    return "".join(alphabet[(seed * 7 + i * 13) % len(alphabet)] for i in range(n_chars))


def _adapters(engine: Engine) -> tuple[list[str], list[str]]:
    """(LoRA adapters, the others): LoHa rows share LoRA rows' forwards, IA3 rows do not."""
    infos = engine.adapters()
    lora = sorted(a.name for a in infos if a.peft_type == "LORA")
    other = sorted(a.name for a in infos if a.peft_type != "LORA")
    assert len(lora) >= 2 and other, "fixture must provide two LoRA and one non-LoRA adapter"
    return lora, other


def workload(engine: Engine) -> list[Case]:
    (lora_a, lora_b, *_), (other, *_) = _adapters(engine)
    cases: list[Case] = []
    adapters = ["", lora_a, lora_b, other]
    lengths = [1, 3, 17, 40, 110]
    for i in range(10):
        adapter = adapters[i % len(adapters)]
        n = 3 + (i * 5) % 9
        params = GenerationParams(max_new_tokens=n, do_sample=False)
        request = GenerationRequest(
            f"greedy-{i}", text=_prompt(lengths[i % 5], i), adapter=adapter, parameters=params
        )
        cases.append(Case(request, {"max_new_tokens": n, "do_sample": False}))
    # One token of prompt, given as ids (no special tokens around it).
    cases.append(
        Case(
            GenerationRequest(
                "ids-1",
                token_ids=(70,),
                adapter=lora_b,
                parameters=GenerationParams(max_new_tokens=5),
            ),
            {"max_new_tokens": 5},
        )
    )
    # Per-row processors in transformers' order: penalties, n-gram ban, bad words.
    penalised = GenerationParams(
        max_new_tokens=10,
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        bad_words=("e",),
        min_new_tokens=4,
    )
    bad_ids = [engine.tokenize("e", add_special_tokens=False).token_ids]
    cases.append(
        Case(
            GenerationRequest(
                "penalised", text=_prompt(20, 3), adapter=lora_a, parameters=penalised
            ),
            {
                "max_new_tokens": 10,
                "repetition_penalty": 1.5,
                "no_repeat_ngram_size": 2,
                "bad_words_ids": [list(bad_ids[0])],
                "min_new_tokens": 4,
            },
        )
    )
    for i, adapter in enumerate(["", lora_a, other]):
        beams = GenerationParams(max_new_tokens=6, num_beams=3, num_return_sequences=2)
        request = GenerationRequest(
            f"beam-{i}", text=_prompt(5 + 20 * i, i), adapter=adapter, parameters=beams
        )
        cases.append(
            Case(request, {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2})
        )
    for i, adapter in enumerate(["", lora_a, lora_b, other]):
        sampled = GenerationParams(
            max_new_tokens=4 + i,
            do_sample=True,
            seed=100 + i,
            # Hot enough that the confident demo model still samples distinct sequences.
            temperature=3.0,
            top_p=0.99,
            top_k=40,
            num_return_sequences=1 + i % 2,
        )
        request = GenerationRequest(
            f"sample-{i}", text=_prompt(2 + 30 * i, i), adapter=adapter, parameters=sampled
        )
        cases.append(Case(request))
    return cases


async def _submit_all(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    handles = [engine.submit(r) for r in requests]
    return list(await asyncio.gather(*(h.result() for h in handles)))


def _solo_tokens(engine: Engine, reference: Reference, case: Case) -> list[tuple[int, ...]]:
    request = case.request
    assert case.solo is not None
    prompt = list(request.token_ids or engine.tokenize(request.text or "").token_ids)
    return [
        tuple(t)
        for t in _cut_after_eos(engine, reference.generate(request.adapter, prompt, **case.solo))
    ]


def _cut_after_eos(engine: Engine, rows: list[list[int]]) -> list[list[int]]:
    eos = engine.info.eos_token_id
    out = []
    for row in rows:
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def test_concurrent_mixed_workload_equals_solo_runs(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    cases = workload(engine)
    results = aio.run(_submit_all(engine, [c.request for c in cases]))
    assert max(r.batch_size for r in results) > 4, "the workload should actually have been batched"
    for case, result in zip(cases, results, strict=True):
        got = [s.token_ids for s in result.sequences]
        if case.solo is not None:
            assert got == _solo_tokens(engine, reference, case), case.request.request_id
        else:
            alone = aio.run(_submit_all(engine, [case.request]))[0]
            assert alone.batch_size == 1
            assert got == [s.token_ids for s in alone.sequences], case.request.request_id
            assert len(set(got)) == len(got) or len(got) == 1, "sequences of one request differ"
        if case.request.parameters.num_beams:
            assert all(s.beam_score is not None for s in result.sequences)
    assert engine.stats().queued == 0 and engine.stats().running == 0


def test_stop_sequence_across_token_boundaries(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    (lora_a, _, *_), _ = _adapters(engine)
    base = GenerationRequest(
        "free", text="stop me", adapter=lora_a, parameters=GenerationParams(max_new_tokens=16)
    )
    free = aio.run(_submit_all(engine, [base]))[0].sequences[0]
    text = free.text
    # A stop string of two complete characters starting after the first: it spans tokens.
    k = next(
        (
            k
            for k in range(1, len(text) - 1)
            if "\ufffd" not in text[k : k + 2] and text.find(text[k : k + 2]) == k
        ),
        None,
    )
    assert k is not None, f"no usable stop string in {text!r}"
    stop = text[k : k + 2]
    params = replace(base.parameters, stop_sequences=(stop, "never-appears"))
    handle = engine.submit(replace(base, request_id="stopped", parameters=params), stream=True)

    async def consume() -> tuple[list[TokenEvent], GenerationResult]:
        return [e async for e in handle], await handle.result()

    events, result = aio.run(consume())
    seq = result.sequences[0]
    assert seq.finish_reason is FinishReason.STOP_SEQUENCE
    assert seq.text == text[:k]
    assert "".join(e.text_delta for e in events) == seq.text
    assert free.token_ids[: len(seq.token_ids)] == seq.token_ids
    assert len(seq.token_ids) < len(free.token_ids)


@pytest.mark.parametrize("adapter_kind", ["base", "lora", "other"])
def test_stream_deltas_concatenate_to_final_text(
    engine: Engine, aio: asyncio.Runner, adapter_kind: str
) -> None:
    (lora_a, *_), (other, *_) = _adapters(engine)
    adapter = {"base": "", "lora": lora_a, "other": other}[adapter_kind]
    request = GenerationRequest(
        f"stream-{adapter_kind}",
        text="é日本🙂 et encore é日本🙂",
        adapter=adapter,
        parameters=GenerationParams(max_new_tokens=24),
        options=ResponseOptions(return_token_ids=True, return_logprobs=True, top_logprobs=2),
    )
    handle = engine.submit(request, stream=True)

    async def consume() -> tuple[list[TokenEvent], GenerationResult]:
        return [e async for e in handle], await handle.result()

    events, result = aio.run(consume())
    seq = result.sequences[0]
    deltas = [e.text_delta for e in events]
    assert "".join(deltas).encode() == seq.text.encode()
    assert tuple(t for e in events for t in e.token_ids) == seq.token_ids
    tokenizer_text = engine._tokenizer.decode(list(seq.token_ids), skip_special_tokens=True)
    assert seq.text == tokenizer_text
    # No delta but the very last may end inside a character.
    assert not any(d.endswith("\ufffd") for d in deltas[:-1] if d)
    assert len(seq.logprobs) == len(seq.token_ids)
    for lp, tok in zip(seq.logprobs, seq.token_ids, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 2
        assert lp.top[0].logprob >= lp.logprob - 1e-5  # greedy picks the top raw token here


def test_non_lora_adapter_rows_equal_solo(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    _, (other, *_) = _adapters(engine)
    requests = [
        GenerationRequest(
            f"other-{i}",
            text=_prompt(4 + 9 * i, i),
            adapter=other,
            parameters=GenerationParams(max_new_tokens=7),
        )
        for i in range(4)
    ]
    results = aio.run(_submit_all(engine, requests))
    assert max(r.batch_size for r in results) > 1
    for request, result in zip(requests, results, strict=True):
        case = Case(request, {"max_new_tokens": 7})
        assert [s.token_ids for s in result.sequences] == _solo_tokens(engine, reference, case)
    # The adapter really changes the output: otherwise this test could not fail.
    base = aio.run(_submit_all(engine, [replace(requests[0], adapter="", request_id="b")]))[0]
    assert base.sequences[0].token_ids != results[0].sequences[0].token_ids


@pytest.mark.skipif(
    not (REPO_DEMO_BASE / "model.safetensors").is_file(), reason="demo model not committed yet"
)
@pytest.mark.parametrize("text", ["the quick brown fox", "é日本🙂", "café 日本 🙂 fin"])
def test_demo_repeat_model_streams_multibyte_text_exactly(aio: asyncio.Runner, text: str) -> None:
    """The trained base repeats (lowercase English) prompts; streamed text is exact either way.

    Multi-byte prompts are outside its training data, so only the streaming invariants are
    asserted for them: deltas concatenate to the final text and never split a character.
    """
    demo = Engine(EngineConfig(model_path=REPO_DEMO_BASE, default_max_new_tokens=64))

    async def body() -> tuple[list[TokenEvent], GenerationResult]:
        await demo.start()
        handle = demo.submit(GenerationRequest("repeat", text=text), stream=True)
        events = [e async for e in handle]
        result = await handle.result()
        await demo.stop()
        return events, result

    events, result = aio.run(body())
    seq = result.sequences[0]
    if text.isascii():
        assert seq.finish_reason is FinishReason.EOS
        assert seq.text == text
    assert "".join(e.text_delta for e in events).encode() == seq.text.encode()
    assert not any(e.text_delta.endswith("\ufffd") for e in events[:-1])


@pytest.mark.parametrize("which", ["base", "lora", "lora-beams"])
def test_single_adapter_batches_equal_solo_runs(
    engine: Engine, reference: Reference, aio: asyncio.Runner, which: str
) -> None:
    """Batches of one adapter (or base rows only) take the plain forward, not peft's per-row
    routing; their rows must still equal solo runs."""
    (lora, *_), _ = _adapters(engine)
    adapter = "" if which == "base" else lora
    beams = which == "lora-beams"
    params = GenerationParams(max_new_tokens=6, num_beams=2 if beams else None)
    requests = [
        GenerationRequest(
            f"{which}-{i}", text=_prompt(3 + 9 * i, i), adapter=adapter, parameters=params
        )
        for i in range(5)
    ]
    results = aio.run(_submit_all(engine, requests))
    assert max(r.batch_size for r in results) > 1, "the requests should have shared a batch"
    solo_kwargs: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False}
    if beams:
        solo_kwargs["num_beams"] = 2
    for request, result in zip(requests, results, strict=True):
        case = Case(request, solo_kwargs)
        assert [s.token_ids for s in result.sequences] == _solo_tokens(engine, reference, case)


def _ids(engine: Engine, text: str) -> list[int]:
    return list(engine.tokenize(text, add_special_tokens=False).token_ids)


def test_mixed_processor_configs_in_one_batch_equal_solo(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    """Rows with different processors share the batched processors (same kind, different
    parameters; batched and per-row kinds in one row): each greedy row equals its solo
    ``generate``, each seeded sampled row its solo engine run."""
    (lora_a, lora_b, *_), _ = _adapters(engine)
    single, multi = _ids(engine, "e"), _ids(engine, "th")
    assert len(single) == 1 and len(multi) > 1, "one single- and one multi-token word"
    greedy: list[tuple[GenerationParams, dict[str, Any]]] = [
        (GenerationParams(min_new_tokens=9), {"min_new_tokens": 9}),
        (GenerationParams(min_new_tokens=3), {"min_new_tokens": 3}),
        (GenerationParams(repetition_penalty=1.4), {"repetition_penalty": 1.4}),
        (
            GenerationParams(repetition_penalty=0.8, min_new_tokens=5),
            {
                "repetition_penalty": 0.8,
                "min_new_tokens": 5,
            },
        ),
        (GenerationParams(bad_words=("e",)), {"bad_words_ids": [single]}),
        (GenerationParams(bad_words=("e", "th")), {"bad_words_ids": [single, multi]}),
        (
            GenerationParams(sequence_bias=(("a", 4.0), ("o", -2.5))),
            {
                "sequence_bias": [[_ids(engine, "a"), 4.0], [_ids(engine, "o"), -2.5]],
            },
        ),
        (
            GenerationParams(sequence_bias=(("th", 6.0),), repetition_penalty=1.4),
            {
                "sequence_bias": [[multi, 6.0]],
                "repetition_penalty": 1.4,
            },
        ),
        (
            GenerationParams(no_repeat_ngram_size=2, min_new_tokens=9),
            {
                "no_repeat_ngram_size": 2,
                "min_new_tokens": 9,
            },
        ),
    ]
    cases: list[Case] = []
    adapters = ["", lora_a, lora_b]
    for i, (params, solo) in enumerate(greedy):
        request = GenerationRequest(
            f"proc-{i}",
            text=_prompt(4 + 7 * i, i),
            adapter=adapters[i % 3],
            parameters=replace(params, max_new_tokens=10, do_sample=False),
        )
        cases.append(Case(request, {"max_new_tokens": 10, "do_sample": False, **solo}))
    sampled = [
        GenerationParams(temperature=3.0, top_k=40),
        GenerationParams(temperature=3.0, top_k=40, min_new_tokens=8),
        GenerationParams(temperature=2.0, top_p=0.95, repetition_penalty=1.3),
        GenerationParams(temperature=3.0, min_p=0.02, bad_words=("e",)),
        GenerationParams(temperature=3.0, typical_p=0.9),
    ]
    for i, params in enumerate(sampled):
        request = GenerationRequest(
            f"proc-sample-{i}",
            text=_prompt(3 + 11 * i, 20 + i),
            adapter=adapters[i % 3],
            parameters=replace(params, max_new_tokens=9, do_sample=True, seed=40 + i),
        )
        cases.append(Case(request))
    results = aio.run(_submit_all(engine, [c.request for c in cases]))
    assert max(r.batch_size for r in results) > 4, "the workload should actually have been batched"
    for case, result in zip(cases, results, strict=True):
        got = [s.token_ids for s in result.sequences]
        if case.solo is not None:
            assert got == _solo_tokens(engine, reference, case), case.request.request_id
        else:
            alone = aio.run(_submit_all(engine, [case.request]))[0]
            assert alone.batch_size == 1
            assert got == [s.token_ids for s in alone.sequences], case.request.request_id
