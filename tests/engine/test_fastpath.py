"""The fast forward (``fastpath.py``) is bitwise the model's own forward, or is not taken.

Every check runs the same inputs twice, once through ``FastForwards.run`` and once through the
model's forward the way the step calls it, each on its own cache, and asserts after every
forward that the logits and every cache layer's keys and values are ``torch.equal``: prefill of
one prompt and of several left-padded prompts, then decode steps with padding (the 2-D mask)
and without (no mask), a chunked prefill into a non-empty cache, on the engine's slot cache and
on transformers' ``DynamicCache``; on the demo base model, on the routed tree with LoRA, LoHa
and base rows mixed in one forward, on a type group's ``PeftModel``, and on random tiny models
of each family it claims (Llama with grouped-query attention, Mistral without a sliding
window, Qwen2 with its q/k/v biases, a bfloat16 Llama). The mask it builds is compared with
``create_causal_mask``'s. And it refuses what it does not reproduce: the model's own forward
runs instead.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peftserve.server.engine import Engine, kv_cache
from peftserve.server.engine.fastpath import (
    FastForward,
    FastForwards,
    _causal_mask,
    enabled_by_environment,
)
from peftserve.server.engine.registry import BASE_ROW_MARKER, AdapterRegistry
from peftserve.server.engine.running import SubBatchKey
from peftserve.server.engine.step import ModelStep, prefill_inputs
from peftserve.server.engine.types import GenerationParams, GenerationRequest
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import create_causal_mask

from .conftest import ModelFiles, Reference

TINY: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.3,
    "pad_token_id": 0,
}
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama-mha-tied": ("LlamaConfig", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    # Biases on every projection and another activation: the modules' own, applied as theirs.
    "llama-bias-gelu": (
        "LlamaConfig",
        {"attention_bias": True, "mlp_bias": True, "hidden_act": "gelu_pytorch_tanh"},
    ),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
}
PROMPTS = [(5, 9, 17, 33, 2, 8, 40), (11, 3), (7, 7, 21, 60, 14), (19,)]


def _tiny(name: str, dtype: torch.dtype = torch.float32, **extra: Any) -> Any:
    cls_name, overrides = FAMILIES[name]
    config = getattr(transformers, cls_name)(**{**TINY, **overrides, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    return model.eval()


def _new_cache(kind: str, model: Any) -> DynamicCache:
    if kind == "slot":
        return kv_cache.new_cache(model.config)
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def _own_forward(model: Any, ids: Any, mask: Any, positions: Any, cache: Any) -> torch.Tensor:
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        return_dict=True,
        logits_to_keep=1,
    )
    logits: torch.Tensor = out.logits
    return logits


def _assert_caches_equal(fast: DynamicCache, own: DynamicCache) -> None:
    for a, b in zip(fast.layers, own.layers, strict=True):
        assert torch.equal(a.keys, b.keys)
        assert torch.equal(a.values, b.values)


class _Pair:
    """One forward sequence run both ways, compared after every forward."""

    def __init__(self, model: Any, kind: str) -> None:
        self.model = model
        self.fast = FastForwards()
        self.caches = (_new_cache(kind, model), _new_cache(kind, model))
        self.forwards = 0

    def forward(self, ids: Any, mask: Any, positions: Any) -> torch.Tensor:
        fast_cache, own_cache = self.caches
        with torch.inference_mode():
            fast = self.fast.run(self.model, ids, mask, positions, fast_cache)
            assert fast is not None, f"fast forward refused: {self.fast.fallbacks}"
            own = _own_forward(self.model, ids, mask, positions, own_cache)
        assert fast.dtype == own.dtype and fast.shape == own.shape
        assert torch.equal(fast, own), f"forward {self.forwards}: logits differ"
        _assert_caches_equal(fast_cache, own_cache)
        self.forwards += 1
        return own


def _run_prompts(pair: _Pair, prompts: list[tuple[int, ...]], steps: int) -> None:
    """Prefill ``prompts`` left-padded, then ``steps`` greedy decode steps (the mask while
    there is padding, none without, as the loop passes them)."""
    ids, mask, positions, pads = prefill_inputs(prompts, 0, torch.device("cpu"))
    padded = any(pads)
    logits = pair.forward(ids, mask if padded else None, positions)
    last = positions[:, -1:]
    for _ in range(steps):
        ids = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
        last = last + 1
        logits = pair.forward(ids, mask if padded else None, last)


@pytest.fixture(scope="module")
def demo_base(model_files: ModelFiles) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_files.base, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["slot", "dynamic"])
def test_demo_base_prefill_and_decode(demo_base: Any, kind: str) -> None:
    for prompts in ([PROMPTS[0]], PROMPTS, [PROMPTS[0], PROMPTS[0]]):
        pair = _Pair(demo_base, kind)
        _run_prompts(pair, list(prompts), steps=6)
        assert pair.forwards == 7


@pytest.mark.parametrize("kind", ["slot", "dynamic"])
def test_chunked_prefill_into_a_filled_cache(demo_base: Any, kind: str) -> None:
    prompt = list(range(3, 43))
    pair = _Pair(demo_base, kind)
    for start in range(0, len(prompt), 16):
        chunk = prompt[start : start + 16]
        ids = torch.tensor([chunk])
        positions = torch.arange(start, start + len(chunk)).unsqueeze(0)
        pair.forward(ids, None, positions)
    assert pair.forwards == 3


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["slot", "dynamic"])
def test_tiny_families(name: str, kind: str) -> None:
    model = _tiny(name)
    assert FastForward.load_why_not(model) == ""
    for prompts in ([PROMPTS[0]], PROMPTS):
        _run_prompts(_Pair(model, kind), list(prompts), steps=4)


def test_bfloat16_llama() -> None:
    model = _tiny("llama", torch.bfloat16)
    _run_prompts(_Pair(model, "slot"), list(PROMPTS), steps=4)


def _registry(model_files: ModelFiles) -> AdapterRegistry:
    base = AutoModelForCausalLM.from_pretrained(model_files.base, dtype=torch.float32).eval()
    return AdapterRegistry(base, model_files.adapters)


def test_routed_tree_mixes_adapters_and_base_rows(model_files: ModelFiles) -> None:
    registry = _registry(model_files)
    tree = registry.routed
    routed = sorted(tree.adapters)
    assert len(routed) >= 2, routed
    types = {registry.get(name).peft_type for name in routed}  # type: ignore[union-attr]
    names = [routed[0], BASE_ROW_MARKER, routed[-1], routed[0]]
    if model_files.demo:
        assert types == {"LORA", "LOHA"}
    for kind in ("slot", "dynamic"):
        tree.assign(names)
        _run_prompts(_Pair(tree.model, kind), list(PROMPTS), steps=5)
        tree.assign([routed[-1]])
        _run_prompts(_Pair(tree.model, kind), [PROMPTS[2]], steps=3)


def test_type_group_peft_model(model_files: ModelFiles) -> None:
    registry = _registry(model_files)
    for group in registry.groups.values():
        model: Any = group.model
        for name in list(group.adapters)[:1]:
            model.set_adapter(name)
            assert FastForward.load_why_not(model) == ""
            _run_prompts(_Pair(model, "slot"), list(PROMPTS), steps=4)


def test_model_step_uses_it_and_matches(demo_base: Any) -> None:
    step = ModelStep(AdapterRegistry(demo_base, None), torch.device("cpu"))
    key = SubBatchKey("base", None)
    ids, mask, positions, _ = prefill_inputs(list(PROMPTS), 0, torch.device("cpu"))
    cache = kv_cache.new_cache(demo_base.config)
    step.fast.enabled = True  # even under PEFTSERVE_FAST_FORWARD=0
    logits = step.forward(key, [], ids, mask, positions, cache)
    assert not step.fast.fallbacks and step.fast.taken == 1
    own_cache = kv_cache.new_cache(demo_base.config)
    with torch.inference_mode():
        own = _own_forward(demo_base, ids, mask, positions, own_cache)
    assert torch.equal(logits, own[:, -1].float())
    _assert_caches_equal(cache, own_cache)


@pytest.mark.parametrize(
    ("q_length", "past", "pads"),
    [
        (7, 0, [0, 5, 2, 6]),  # padded prefill
        (7, 0, [0, 0]),  # unpadded prefill: none
        (1, 9, [0, 3]),  # padded decode
        (1, 9, [0, 0]),  # unpadded decode: none
        (16, 16, [0]),  # a chunk after a chunk, all ones
        (1, 0, [0]),
    ],
)
def test_mask_is_create_causal_masks(q_length: int, past: int, pads: list[int]) -> None:
    model = _tiny("llama")
    rows = len(pads)
    kv = past + q_length
    attention_mask = torch.ones((rows, kv), dtype=torch.long)
    for row, pad in enumerate(pads):
        attention_mask[row, :pad] = 0
    cache = kv_cache.new_cache(model.config)
    if past:
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        for layer in cache.layers:
            filler = torch.zeros((rows, model.config.num_key_value_heads, past, head_dim))
            layer.update(filler, filler)
    embeds = torch.zeros((rows, q_length, model.config.hidden_size))
    for mask in (attention_mask, None):
        theirs = create_causal_mask(
            config=model.config,
            inputs_embeds=embeds,
            attention_mask=mask,
            cache=cache,
            position_ids=torch.arange(past, kv).expand(rows, -1),
        )
        ours = _causal_mask(mask, embeds, q_length, past)
        if theirs is None:
            assert ours is None
            continue
        assert ours is not None
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert ours.stride() == theirs.stride()
        assert torch.equal(ours, theirs)


def test_refuses_what_it_does_not_reproduce(tmp_path: Path) -> None:
    sliding = _tiny("mistral", sliding_window=6)
    assert "sliding window" in FastForward.load_why_not(sliding)
    eager = _tiny("llama", attn_implementation="eager")
    assert "eager" in FastForward.load_why_not(eager)
    gemma_config = transformers.Gemma2Config(**{**TINY, "head_dim": 8})
    assert "Gemma2ForCausalLM" in FastForward.load_why_not(
        AutoModelForCausalLM.from_config(gemma_config)
    )
    linear = _tiny("llama", rope_parameters={"rope_type": "linear", "factor": 2.0})
    assert "rope type" in FastForward.load_why_not(linear)

    # A hook registered after the first forward is seen at the next one: own forward.
    model = _tiny("llama")
    fast = FastForwards()
    ids, mask, positions, _ = prefill_inputs(list(PROMPTS), 0, torch.device("cpu"))
    with torch.inference_mode():
        assert fast.run(model, ids, mask, positions, kv_cache.new_cache(model.config)) is not None
        seen: list[int] = []
        handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: seen.append(1))
        assert fast.run(model, ids, mask, positions, kv_cache.new_cache(model.config)) is None
        assert "hooks on the model" in fast.fallbacks
        handle.remove()  # gone: fast again
        assert fast.run(model, ids, mask, positions, kv_cache.new_cache(model.config)) is not None
        # A cache transformers made some other way (no config: layers appear lazily).
        assert fast.run(model, ids, mask, positions, DynamicCache()) is None
        # Attention switched after the first forward.
        model.set_attn_implementation("eager")
        assert fast.run(model, ids, mask, positions, kv_cache.new_cache(model.config)) is None
        assert "attention 'eager', not sdpa" in fast.fallbacks

    # Through the step: the refused model runs its own forward and still gives its logits.
    step = ModelStep(AdapterRegistry(sliding, None), torch.device("cpu"))
    step.fast.enabled = True  # even under PEFTSERVE_FAST_FORWARD=0: the refusal is tested
    cache = kv_cache.new_cache(sliding.config)
    logits = step.forward(SubBatchKey("base", None), [], ids, mask, positions, cache)
    assert step.fast.fallbacks and not seen
    with torch.inference_mode():
        own = _own_forward(sliding, ids, mask, positions, kv_cache.new_cache(sliding.config))
    assert torch.equal(logits, own[:, -1].float())


def test_the_engine_takes_it_for_every_forward(
    chunked_engine: Engine, reference: Reference, aio: asyncio.Runner
) -> None:
    """Through the loop (padded prefills, chunks, joins, base and every adapter mixed), no
    forward of the served models falls back, and every request still gets its solo tokens."""
    if not enabled_by_environment():
        pytest.skip("PEFTSERVE_FAST_FORWARD=0")
    eng = chunked_engine
    names = ["", *sorted(a.name for a in eng.adapters())]
    requests = [
        GenerationRequest(
            f"r{i}",
            text="the quick brown fox jumps over the lazy dog"[: 5 + 9 * i],
            adapter=names[i % len(names)],
            parameters=GenerationParams(max_new_tokens=6, min_new_tokens=6, do_sample=False),
        )
        for i in range(2 * len(names))
    ]

    async def body() -> list[Any]:
        handles = [eng.submit(r) for r in requests]
        return [await h.result() for h in handles]

    results = aio.run(body())
    for request, result in zip(requests, results, strict=True):
        prompt = list(eng.tokenize(request.text or "").token_ids)
        solo = reference.generate(
            request.adapter, prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False
        )[0]
        assert list(result.sequences[0].token_ids) == solo, request.request_id
    step: Any = eng._batcher._step_model  # type: ignore[attr-defined]
    assert step.fast.fallbacks == {} and step.fast.taken > len(requests)
