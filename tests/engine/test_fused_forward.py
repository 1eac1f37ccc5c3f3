"""Fused forwards: a joiner's prefill and a running sub-batch's decode in one pass.

``FastForward.fused`` runs several forwards of one model as one pass (every part's tokens
through the same projections, each part's own attention and cache); the batcher fuses a
prefill of whole prompts with the decode of a running sub-batch of the same key when both feed
the matmuls at least ``FUSE_MIN_ROWS`` rows. Checked here:

* the pass is bitwise the parts' own forwards (logits and every cache layer, then further
  decode steps on the caches it wrote), on the demo model, random tiny models of every family
  the fast forward claims, a bfloat16 Llama, and the routed tree with LoRA, LoHa and base rows
  interleaved in both parts;
* a chunk of a long prompt into a cache that already holds the first one, fused with a decode
  step, against the two forwards;
* through the loop: joiners arriving while rows decode take fused passes, and so do the chunks
  of a long prompt next to decoding rows, and every request equals its solo ``generate``;
  with fusing turned off, and with a hook on the model (the fast forward refuses itself, so
  the fused pass is not taken and the step runs both forwards one by one), the same tokens.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peftserve.server.engine import Engine, kv_cache
from peftserve.server.engine.batcher import FUSE_MIN_ROWS
from peftserve.server.engine.fastpath import FastForwards, fusing_by_environment
from peftserve.server.engine.registry import BASE_ROW_MARKER, ROUTED_GROUP, AdapterRegistry
from peftserve.server.engine.running import SubBatchKey
from peftserve.server.engine.step import ModelStep, prefill_inputs
from peftserve.server.engine.types import GenerationParams, GenerationRequest, GenerationResult
from transformers import AutoModelForCausalLM, DynamicCache

from .conftest import ModelFiles, Reference
from .test_fastpath import FAMILIES, _assert_caches_equal, _tiny

CPU = torch.device("cpu")
RUNNING = [(5, 9, 17, 33, 2, 8, 40), (11, 3, 4, 4), (7, 7, 21, 60, 14), (19, 2, 2, 2, 2, 2)] * 2
JOINING = [(12, 30, 41, 7, 7, 9, 3, 3, 1), (8, 8, 16, 2), (21, 5, 6, 7, 8)]


def _copy_cache(cache: DynamicCache) -> DynamicCache:
    import copy

    return copy.deepcopy(cache)


class _Running:
    """A decoding sub-batch of ``RUNNING`` prompts (left-padded), ``steps`` decoded."""

    def __init__(self, fast: FastForwards, model: Any, kind: str, steps: int) -> None:
        ids, mask, positions, pads = prefill_inputs(RUNNING, 0, CPU)
        self.padded = any(pads)
        self.mask = mask
        self.cache = (
            kv_cache.new_cache(model.config)
            if kind == "slot"
            else DynamicCache(config=model.config.get_text_config(decoder=True))
        )
        with torch.inference_mode():
            logits = fast.run(model, ids, mask if self.padded else None, positions, self.cache)
        assert logits is not None
        self.next = logits[:, -1].argmax(-1, keepdim=True)
        self.last = positions[:, -1:]
        for _ in range(steps):
            ids, mask, positions = self.inputs()
            with torch.inference_mode():
                logits = fast.run(model, ids, mask, positions, self.cache)
            assert logits is not None
            self.advance(logits)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        self.mask = torch.cat([self.mask, torch.ones_like(self.next)], dim=-1)
        return self.next, self.mask if self.padded else None, self.last + 1

    def advance(self, logits: torch.Tensor) -> None:
        self.next = logits[:, -1].argmax(-1, keepdim=True)
        self.last = self.last + 1


def _fused_against_separate(model: Any, kind: str, joiners: list[list[tuple[int, ...]]]) -> None:
    """One fused pass (decode + one prefill part per group of ``joiners``) against the same
    forwards one by one; then two more decode steps on each side's caches."""
    fast = FastForwards()
    running = _Running(fast, model, kind, steps=3)
    twin = _Running(fast, model, kind, steps=3)
    d_ids, d_mask, d_positions = running.inputs()
    twin.inputs()
    prompts = [prefill_inputs(group, 0, CPU) for group in joiners]
    fused_caches = [kv_cache.new_cache(model.config) for _ in joiners]
    own_caches = [kv_cache.new_cache(model.config) for _ in joiners]
    parts = [(d_ids, d_mask, d_positions, running.cache)]
    parts += [
        (ids, mask if any(pads) else None, positions, cache)
        for (ids, mask, positions, pads), cache in zip(prompts, fused_caches, strict=True)
    ]
    with torch.inference_mode():
        fused = fast.run_fused(model, parts)
        assert fused is not None, fast.fallbacks
        own = [fast.run(model, d_ids, d_mask, d_positions, twin.cache)]
        for (ids, mask, positions, pads), cache in zip(prompts, own_caches, strict=True):
            own.append(fast.run(model, ids, mask if any(pads) else None, positions, cache))
    assert len(fused) == len(own) == 1 + len(joiners)
    for i, (a, b) in enumerate(zip(fused, own, strict=True)):
        assert b is not None
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), f"part {i}: logits differ"
    _assert_caches_equal(running.cache, twin.cache)
    for a, b in zip(fused_caches, own_caches, strict=True):
        _assert_caches_equal(a, b)
    running.advance(fused[0])
    twin.advance(own[0])  # type: ignore[arg-type]
    for _ in range(2):  # the caches the fused pass wrote serve later steps alike
        ids, mask, positions = running.inputs()
        twin.inputs()
        with torch.inference_mode():
            a = fast.run(model, ids, mask, positions, running.cache)
            b = fast.run(model, ids, mask, positions, twin.cache)
        assert a is not None and b is not None and torch.equal(a, b)
        running.advance(a)
        twin.advance(b)
    assert fast.fused_passes == 1


@pytest.fixture(scope="module")
def demo_base(model_files: ModelFiles) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_files.base, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["slot", "dynamic"])
def test_demo_base_fused_pass_is_the_forwards_one_by_one(demo_base: Any, kind: str) -> None:
    _fused_against_separate(demo_base, kind, [JOINING])
    _fused_against_separate(demo_base, kind, [JOINING[:1], JOINING[1:]])  # three parts


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tiny_families_fused_pass(name: str) -> None:
    _fused_against_separate(_tiny(name), "slot", [JOINING])


def test_bfloat16_llama_fused_pass() -> None:
    _fused_against_separate(_tiny("llama", torch.bfloat16), "slot", [JOINING])


@pytest.mark.parametrize("kind", ["slot", "dynamic"])
def test_a_chunk_into_a_filled_cache_fuses_like_its_own_forward(demo_base: Any, kind: str) -> None:
    # A long prompt's second chunk (its cache already holds the first) next to a decode step.
    fast = FastForwards()
    running, twin = (_Running(fast, demo_base, kind, steps=2) for _ in range(2))
    prompt = list(range(3, 43))
    caches = [kv_cache.new_cache(demo_base.config) for _ in range(2)]
    first = torch.tensor([prompt[:16]])
    with torch.inference_mode():
        for cache in caches:
            assert fast.run(demo_base, first, None, torch.arange(16)[None], cache) is not None
        chunk, positions = torch.tensor([prompt[16:32]]), torch.arange(16, 32)[None]
        d_ids, d_mask, d_positions = running.inputs()
        twin.inputs()
        fused = fast.run_fused(
            demo_base,
            [(d_ids, d_mask, d_positions, running.cache), (chunk, None, positions, caches[0])],
        )
        assert fused is not None
        own = [
            fast.run(demo_base, d_ids, d_mask, d_positions, twin.cache),
            fast.run(demo_base, chunk, None, positions, caches[1]),
        ]
    for a, b in zip(fused, own, strict=True):
        assert b is not None and torch.equal(a, b)
    _assert_caches_equal(running.cache, twin.cache)
    _assert_caches_equal(caches[0], caches[1])


def _row(adapter: str) -> Any:
    prepared = SimpleNamespace(
        adapter=None if adapter == BASE_ROW_MARKER else SimpleNamespace(name=adapter)
    )
    return SimpleNamespace(job=SimpleNamespace(prepared=prepared))


def test_routed_tree_fused_pass_routes_every_token(model_files: ModelFiles) -> None:
    # LoRA, LoHa (or IA3 on the random model) and base rows interleaved in the decode part and
    # in the prompts; every adapter has 4+ rows in the decode part and 4+ tokens in the prefill.
    base = AutoModelForCausalLM.from_pretrained(model_files.base, dtype=torch.float32).eval()
    registry = AdapterRegistry(base, model_files.adapters)
    routed = sorted(registry.routed.adapters)
    assert len(routed) >= 2
    # (A routed matmul of 1-3 rows takes another kernel: an adapter with fewer than 4 rows
    # in a part may get other bits fused, as with any other crowd; tokens stay solo's.)
    names = [routed[0], BASE_ROW_MARKER, routed[-1]] * FUSE_MIN_ROWS
    prompts = (RUNNING * 2)[: len(names)]
    joining = [routed[-1], routed[0], BASE_ROW_MARKER]
    key = SubBatchKey(ROUTED_GROUP, None)
    results = []
    for fused in (True, False):
        step = ModelStep(registry, CPU)
        step.fast.enabled = step.fast.fuse = True
        rows = [_row(n) for n in names]
        ids, mask, positions, _ = prefill_inputs(prompts, 0, CPU)
        cache = kv_cache.new_cache(base.config)
        logits = step.forward(key, rows, ids, mask, positions, cache)
        d_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        d_ids, d_positions = logits.argmax(-1, keepdim=True), positions[:, -1:] + 1
        p_ids, p_mask, p_positions, _ = prefill_inputs(JOINING, 0, CPU)
        p_rows = [_row(n) for n in joining]
        p_cache = kv_cache.new_cache(base.config)
        if fused:
            out = step.forward_fused(
                key,
                [
                    (rows, d_ids, d_mask, d_positions, cache),
                    (p_rows, p_ids, p_mask, p_positions, p_cache),
                ],
            )
            assert out is not None and step.fast.fused_passes == 1, step.fast.fallbacks
        else:
            out = [
                step.forward(key, rows, d_ids, d_mask, d_positions, cache),
                step.forward(key, p_rows, p_ids, p_mask, p_positions, p_cache),
            ]
        results.append((out, cache, p_cache))
    (fused_out, *fused_caches), (own_out, *own_caches) = results
    for a, b in zip(fused_out, own_out, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(fused_caches, own_caches, strict=True):
        _assert_caches_equal(a, b)


def test_it_is_on_unless_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEFTSERVE_FUSED_FORWARD", raising=False)
    assert fusing_by_environment() and FastForwards().fuse
    monkeypatch.setenv("PEFTSERVE_FUSED_FORWARD", "0")
    assert not fusing_by_environment() and not FastForwards().fuse


# ---- through the loop ----


def _greedy(rid: str, text: str, n: int, adapter: str = "") -> GenerationRequest:
    params = GenerationParams(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return GenerationRequest(rid, text=text, adapter=adapter, parameters=params)


def _joiners_while_running(engine: Engine, reference: Reference, aio: asyncio.Runner) -> None:
    """Rows of the base model and two adapters decode while more requests arrive one after
    another: every result equals its solo ``generate``."""
    adapters = ["", *sorted(a.name for a in engine.adapters() if a.mixed_batching)][:3]
    running = [
        _greedy(f"run-{i}", f"the running row {i}", 40, adapters[i % len(adapters)])
        for i in range(2 * FUSE_MIN_ROWS)
    ]
    joiners = [
        _greedy(f"join-{i}", f"a joiner {i} of the crowd", 6, adapters[(i + 1) % len(adapters)])
        for i in range(6)
    ]

    async def body() -> list[tuple[GenerationRequest, GenerationResult]]:
        handles = [(r, engine.submit(r)) for r in running]
        done = []
        for request in joiners:
            await asyncio.sleep(0.02)  # arrive while the running rows decode
            done.append((request, await engine.submit(request).result()))
        return done + [(r, await h.result()) for r, h in handles]

    for request, result in aio.run(body()):
        prompt = list(engine.tokenize(request.text or "").token_ids)
        n = request.parameters.max_new_tokens
        solo = reference.generate(request.adapter, prompt, max_new_tokens=n, min_new_tokens=n)
        assert result.sequences[0].token_ids == tuple(solo[0]), request.request_id


def test_joiners_take_fused_passes_and_get_their_solo_tokens(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    fast = engine._batcher._step_model.fast
    if not fast.enabled or not fast.fuse:
        pytest.skip("the fast forward or fusing is turned off in this environment")
    before = fast.fused_passes
    _joiners_while_running(engine, reference, aio)
    assert fast.fused_passes > before, "joiners next to 4+ decoding rows should have fused"


def test_the_same_tokens_without_fusing(
    engine: Engine, reference: Reference, aio: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = engine._batcher._step_model.fast
    monkeypatch.setattr(fast, "fuse", False)
    before = fast.fused_passes
    _joiners_while_running(engine, reference, aio)
    assert fast.fused_passes == before


def test_a_refused_fused_pass_runs_the_forwards_one_by_one(
    engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    # A hook on the base model: the fast forward refuses every forward (the model's own runs),
    # so the step tries to fuse, is refused, and decodes with the inputs it already made.
    fast = engine._batcher._step_model.fast
    registry = engine._batcher._step_model.registry
    handles = [model.register_forward_hook(lambda *a: None) for model in registry.models()]
    before = fast.fused_passes
    try:
        _joiners_while_running(engine, reference, aio)
    finally:
        for handle in handles:
            handle.remove()
    assert fast.fused_passes == before


def test_chunks_of_a_long_prompt_fuse_with_the_decoding_rows(
    chunked_engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    engine = chunked_engine
    fast = engine._batcher._step_model.fast
    if not fast.enabled or not fast.fuse:
        pytest.skip("the fast forward or fusing is turned off in this environment")
    adapters = ["", *sorted(a.name for a in engine.adapters() if a.mixed_batching)][:3]
    decoding = [
        _greedy(f"dec-{i}", f"row {i}", 40, adapters[i % len(adapters)])
        for i in range(FUSE_MIN_ROWS + 1)
    ]
    long_prompt = _greedy("long", "the quick brown fox jumps over the lazy dog " * 3, 6)

    async def body() -> list[GenerationResult]:
        handles = [engine.submit(r, stream=True) for r in decoding]
        async for _ in handles[0]:
            break  # the rows decode: the long prompt's chunks come next to them
        handles.append(engine.submit(long_prompt))
        return [await h.result() for h in handles]

    before = fast.fused_passes
    results = aio.run(body())
    for request, result in zip([*decoding, long_prompt], results, strict=True):
        prompt = list(engine.tokenize(request.text or "").token_ids)
        n = request.parameters.max_new_tokens
        solo = reference.generate(request.adapter, prompt, max_new_tokens=n, min_new_tokens=n)
        assert result.sequences[0].token_ids == tuple(solo[0]), request.request_id
    assert len(engine.tokenize(long_prompt.text or "").token_ids) > 16 * 4
    # Each 16-token chunk (the 5 decoding rows' prompts are a few tokens each) rode a pass.
    assert fast.fused_passes - before >= 4
