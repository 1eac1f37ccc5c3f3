"""The slot cache: in-place KV buffers that give the model exactly what ``DynamicCache`` gives.

Three kinds of checks, all on real models:

* the running batch's verbs (prefill, decode across buffer growth, joins wider and narrower
  than the batch, leaves that fill their slots from the end, joins into the freed slots), run
  once on the engine's cache and once on transformers' plain ``DynamicCache`` (what the loop
  used before): every step's logits of every row must be bitwise equal, for a full-attention
  model, an all-sliding-window one and one that alternates both (windows of 6, so rows pass
  their window and stay cohorts of their own), and a buffer that shrinks when most of its rows
  left;
* with every buffer NaN-filled instead of uninitialised, the same equality (a verb that
  exposed a cell it did not write would turn logits into NaN);
* through the real loop: a row that grows past its buffer, rows that leave without moving the
  others, then joiners that take the freed slots without a copy of the whole cache, all equal
  to their solo ``generate`` runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
import transformers
from peftserve.server.engine import Engine, StepStats, kv_cache
from peftserve.server.engine.registry import AdapterRegistry
from peftserve.server.engine.running import RunningBatch, SubBatch, SubBatchKey
from peftserve.server.engine.step import ModelStep, prefill_inputs
from peftserve.server.engine.types import GenerationParams, GenerationRequest, GenerationResult
from transformers import DynamicCache

from .conftest import Reference

KEY = SubBatchKey("base", None)

TINY: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.3,
}
CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 6}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 6, "query_pre_attn_scalar": 8}),
}


def _model(name: str) -> Any:
    cls_name, extra = CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**TINY, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


class _Row:
    """What the step reads of a base row; ``id`` follows the row through reorders."""

    def __init__(self, ident: str) -> None:
        self.id = ident
        self.job = None


def _slot_layers(batch: SubBatch) -> list[kv_cache.SlotLayer]:
    return [layer for layer in batch.cache.layers if isinstance(layer, kv_cache.SlotLayer)]


class _Driver:
    """Runs the running batch's verbs on one cache kind and records every row's logits."""

    def __init__(self, model: Any, kind: str) -> None:
        self.step = ModelStep(AdapterRegistry(model, None), torch.device("cpu"))
        self.kind = kind
        self.batch = RunningBatch()
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.grew = False  # a slot buffer was replaced by a larger one while decoding

    def _cache(self) -> DynamicCache:
        if self.kind == "slot":
            return kv_cache.new_cache(self.step.model_config)
        return DynamicCache(config=self.step.model_config.get_text_config(decoder=True))

    def _record(self, rows: list[Any], logits: torch.Tensor) -> torch.Tensor:
        for row, lg in zip(rows, logits, strict=True):
            self.logits.setdefault(row.id, []).append(lg.clone())
        return logits.argmax(-1)

    def join(self, prompts: dict[str, list[int]]) -> None:
        ids, mask, positions, pads = prefill_inputs(
            list(map(tuple, prompts.values())), 0, torch.device("cpu")
        )
        rows = [_Row(name) for name in prompts]
        cache = self._cache()
        logits = self.step.forward(KEY, rows, ids, mask, positions, cache)  # type: ignore[arg-type]
        lengths = torch.tensor([len(p) for p in prompts.values()])
        batch = SubBatch(KEY, rows, cache, mask, pads, lengths)  # type: ignore[arg-type]
        batch.next_tokens = self._record(rows, logits)
        self.batch.add([batch])

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            for batch in self.batch:
                before = [layer.capacity for layer in _slot_layers(batch)]
                ids, mask, positions = batch.decode_inputs()
                logits = self.step.forward(KEY, batch.rows, ids, mask, positions, batch.cache)
                batch.advance()
                batch.next_tokens = self._record(batch.rows, logits)
                if [layer.capacity for layer in _slot_layers(batch)] != before:
                    self.grew = True

    def leave(self, names: set[str]) -> None:
        for batch in self.batch:
            batch.filter([i for i, row in enumerate(batch.rows) if row.id not in names])
        self.batch.drop_empty()


def _script(driver: _Driver) -> list[tuple[int, ...]]:
    """Joins, leaves and long decodes; returns the slot buffers' (rows, columns) after each."""
    gen = torch.Generator().manual_seed(1)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, 64, (n,), generator=gen).tolist()

    shapes: list[tuple[int, ...]] = []

    def shape() -> None:
        shapes.append(
            tuple(c for b in driver.batch for layer in _slot_layers(b) for c in layer.capacity)
        )

    driver.join({"a": prompt(12), "b": prompt(5), "c": prompt(9)})
    driver.decode(4)
    driver.join({"d": prompt(30), "e": prompt(3)})  # d is wider than the batch
    driver.decode(3)
    driver.leave({"a", "b"})  # the first and a middle row leave; e and d fill their slots
    shape()
    driver.join({"f": prompt(7)})  # into a freed slot
    shape()
    driver.decode(130)  # past the first buffer's columns
    driver.leave({"d"})
    driver.join({"g": prompt(4), "h": prompt(11)})
    driver.decode(5)
    crowd = {f"x{i}": prompt(2 + i) for i in range(8)}
    driver.join(crowd)
    driver.decode(2)
    shape()
    driver.leave(set(crowd) | {"c", "e", "f"})  # 2 of 13 rows stay: the buffer shrinks
    shape()
    driver.decode(5)
    return shapes


def _poison(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Slot buffers come NaN-filled instead of uninitialised: a cell read before it is written
    turns its row's logits into NaN. Returns the buffers made, to check the poison took."""
    made: list[torch.Tensor] = []

    def alloc(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        made.append(like.new_full(shape, float("nan")))
        return made[-1]

    monkeypatch.setattr(kv_cache, "_alloc", alloc)
    return made


def _assert_same_logits(slot: _Driver, dynamic: _Driver) -> None:
    assert slot.logits.keys() == dynamic.logits.keys()
    for name in slot.logits:
        assert len(slot.logits[name]) == len(dynamic.logits[name]), name
        for step, (x, y) in enumerate(zip(slot.logits[name], dynamic.logits[name], strict=True)):
            assert torch.equal(x, y), f"row {name}, step {step}"


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_slot_cache_gives_the_model_what_dynamic_cache_gives(family: str) -> None:
    model = _model(family)
    slot, dynamic = _Driver(model, "slot"), _Driver(model, "dynamic")
    shapes = _script(slot)
    _script(dynamic)
    _assert_same_logits(slot, dynamic)
    if family != "mistral":  # full-attention layers are slot layers
        assert slot.grew, "decoding should have outgrown the first buffer"
        # f joined into a slot a leaver freed: no layer's buffer changed shape for it.
        assert shapes[0] == shapes[1] or len(shapes[1]) > len(shapes[0])
        if family == "llama":  # one cohort throughout: its 13 row slots shrink to 4 for 2 rows
            assert shapes[2][0] == 13 and shapes[3][0] == 4
    else:
        assert not any(_slot_layers(b) for b in slot.batch), "sliding layers stay transformers'"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_no_verb_reads_a_buffer_cell_it_did_not_write(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Buffers are allocated uninitialised (kv_cache._alloc): growth, wider and narrower joins,
    # leaves, joins into freed slots and shrinking must each write what they expose.
    model = _model(family)
    dynamic = _Driver(model, "dynamic")
    _script(dynamic)
    made = _poison(monkeypatch)
    slot = _Driver(model, "slot")
    _script(slot)
    _assert_same_logits(slot, dynamic)
    assert len(made) > 8, "the script should have made and grown slot buffers"
    live = [layer for b in slot.batch for layer in _slot_layers(b)]
    assert live and all(bool(layer._k.isnan().any()) for layer in live), (
        "the poison should still sit in the cells nobody wrote"
    )


def test_unknown_layer_types_stay_what_transformers_made() -> None:
    model = _model("gemma2")
    cache = kv_cache.new_cache(model.config)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "SlotLayer"]


def _greedy(rid: str, text: str, n: int) -> GenerationRequest:
    params = GenerationParams(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return GenerationRequest(rid, text=text, adapter="", parameters=params)


def _solo(engine: Engine, reference: Reference, request: GenerationRequest) -> tuple[int, ...]:
    prompt = list(engine.tokenize(request.text or "").token_ids)
    n = request.parameters.max_new_tokens
    return tuple(reference.generate("", prompt, max_new_tokens=n, min_new_tokens=n)[0])


@pytest.mark.parametrize("poisoned", [False, True], ids=["plain", "nan-buffers"])
def test_growth_leaves_and_joins_into_freed_slots_through_the_loop(
    engine: Engine,
    reference: Reference,
    aio: asyncio.Runner,
    poisoned: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if poisoned:
        _poison(monkeypatch)
    long = _greedy("long", "the quick brown fox", 150)
    shorts = [_greedy(f"short-{i}", f"row {i} of a burst", 8 + i) for i in range(5)]
    joiners = [_greedy(f"join-{i}", f"late {i}", 6) for i in range(3)]
    seen: list[tuple[int, tuple[int, int], int]] = []  # rows, buffer (rows, columns), address

    def look(_: StepStats) -> None:  # on the worker thread, between steps
        for batch in engine._batcher._batch:
            layers = _slot_layers(batch)
            if layers and layers[0]._k is not None:
                seen.append((len(batch), layers[0].capacity, layers[0]._k.data_ptr()))

    async def body() -> tuple[GenerationResult, list[GenerationResult], list[GenerationResult]]:
        running = engine.submit(long, stream=True)
        short_handles = [engine.submit(r) for r in shorts]
        short_results = [await h.result() for h in short_handles]
        marker = len(seen)
        joined = [engine.submit(r) for r in joiners]
        joined_results = [await h.result() for h in joined]
        seen.append((-1, (marker, 0), 0))
        return await running.result(), short_results, joined_results

    unsubscribe = engine.add_step_listener(look)
    try:
        head, short_results, joined_results = aio.run(body())
    finally:
        unsubscribe()
    assert head.sequences[0].token_ids == _solo(engine, reference, long)
    for request, result in zip(shorts + joiners, short_results + joined_results, strict=True):
        assert result.sequences[0].token_ids == _solo(engine, reference, request)
    marker = next(m for rows, (m, _), _ in seen if rows == -1)
    before, after = seen[:marker], [s for s in seen[marker:] if s[0] != -1]
    # The burst ran as one sub-batch of 6 rows; the shorts then left without a new buffer.
    full = next(i for i, (rows, _, _) in enumerate(before) if rows == 6)
    assert len({(cap, ptr) for _, cap, ptr in before[full:]}) == 1
    assert before[-1][0] == 1
    # The joiners took the freed slots of that same buffer: no copy of the whole cache.
    joined = next(s for s in after if s[0] == 4)
    assert joined[1:] == before[-1][1:]
    # The long row grew past its first buffer's columns.
    assert max(cap[1] for _, cap, _ in after) > before[-1][1][1]
