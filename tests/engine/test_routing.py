"""Per-row adapter routing (server/engine/routing.py): many adapters and base rows, one forward.

On the demo model plus random extra adapters (two more LoRA, a LoKr, an IA3 and a DoRA LoRA),
built once:

* the routed tree alone: rows of four LoRA adapters, a LoHa, a LoKr, an IA3 and base rows
  interleaved (and contiguous, and all of one adapter) in one forward give each row exactly
  (``torch.equal``) the logits of its solo forward; in a prefill and the decode steps after it,
  interleaved rows (the gathered path, ``Routing.order``) get exactly the logits of the same
  rows with each adapter's rows contiguous (each adapter's layer on a slice of its rows);
* the engine: concurrent requests on every adapter and on base, interleaved, return the tokens
  of a solo ``PeftModel.generate``, and the rows of routed adapters (LoRA, LoHa, LoKr, IA3)
  shared their forwards;
* what cannot be routed (DoRA here) is refused by ``RoutedTree.why_not`` and served alone;
* the gathered path's other branches: LoHa/LoKr deltas rebuilt per forward (no cache budget) and
  an adapter of another dtype than the base (bfloat16 LoRA weights on the float32 model), whose
  sums are cast, interleaved with the others, still give solo bits; plans kept per assignment
  stay right when assignments alternate and when old ones are dropped; a hook on a base module
  still runs (the plain ``nn.Linear`` bases are applied without ``__call__`` only while no
  hook asks for it); LoRA's scaling as a 0-dim tensor multiplies to the Python number's bits.
"""

from __future__ import annotations

import asyncio
import copy
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import IA3Config, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from peftserve.server.engine import Engine, routing
from peftserve.server.engine.registry import share_weights_copy
from peftserve.server.engine.routing import BASE_ROW_MARKER, RoutedTree
from peftserve.server.engine.types import GenerationParams, GenerationRequest
from transformers import AutoModelForCausalLM

from .conftest import DEMO, ModelFiles, Reference, engine_config

LORA = ("upper", "reverse", "lora3", "lora4")
OTHER_ROUTED = ("title", "kron", "scale")  # LoHa, LoKr, IA3 (scales the MLP input and k/v)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _extra_configs() -> dict[str, Any]:
    return {
        "lora3": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
        # Another rank and a subset of modules: layers the other adapters do not all target.
        "lora4": LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False
        ),
        "kron": LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
        "dora": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, init_lora_weights=False
        ),
        "scale": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        ),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    if not (DEMO / "base" / "config.json").is_file():
        pytest.skip("models/demo is not present")
    adapters = tmp_path_factory.mktemp("routing") / "adapters"
    for name in ("upper", "reverse", "title"):
        shutil.copytree(DEMO / "adapters" / name, adapters / name)
    base = AutoModelForCausalLM.from_pretrained(DEMO / "base", dtype=torch.float32).eval()
    for index, (name, config) in enumerate(_extra_configs().items()):
        torch.manual_seed(500 + index)
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "ia3_l" in param_name:
                    param.copy_(1.0 + 0.5 * torch.randn_like(param))
                elif "lokr" in param_name:
                    param.copy_(0.3 * torch.randn_like(param))
        model.save_pretrained(str(adapters / name))
    return ModelFiles(DEMO / "base", adapters, demo=True)


@dataclass
class Trees:
    base: Any
    tree: RoutedTree
    solo: dict[str, Any]  # adapter -> a PeftModel holding only it


@pytest.fixture(scope="module")
def trees(files: ModelFiles) -> Trees:
    base = AutoModelForCausalLM.from_pretrained(files.base, dtype=torch.float32).eval()
    tree = RoutedTree(share_weights_copy(base))
    solo: dict[str, Any] = {}
    # The LoRA adapters live in one PeftModel, as in a type group.
    group: Any = None
    for name in LORA:
        if group is None:
            group = PeftModel.from_pretrained(
                share_weights_copy(base), files.adapters / name, adapter_name=name
            )
        else:
            group.load_adapter(str(files.adapters / name), adapter_name=name)
        solo[name] = PeftModel.from_pretrained(
            share_weights_copy(base), files.adapters / name
        ).eval()
    group.eval()
    for name in LORA:
        assert RoutedTree.why_not(group, name) == ""
        tree.add(group, name)
    for name in OTHER_ROUTED:  # a PeftModel per type, as in the registry
        model = PeftModel.from_pretrained(
            share_weights_copy(base), files.adapters / name, adapter_name=name
        ).eval()
        assert RoutedTree.why_not(model, name) == ""
        tree.add(model, name)
        solo[name] = PeftModel.from_pretrained(
            share_weights_copy(base), files.adapters / name
        ).eval()
    return Trees(base, tree, solo)


def _solo_logits(trees: Trees, name: str, ids: torch.Tensor) -> torch.Tensor:
    model = trees.base if name == BASE_ROW_MARKER else trees.solo[name]
    return model(input_ids=ids).logits[0]


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(
            [
                "upper",
                BASE_ROW_MARKER,
                "title",
                "reverse",
                "lora3",
                "kron",
                "upper",
                "scale",
                "lora4",
                BASE_ROW_MARKER,
                "title",
                "lora3",
                "reverse",
                "kron",
                "scale",
                "lora4",
            ],
            id="interleaved",
        ),
        pytest.param(
            ["upper", "upper", "title", "title", "scale", "scale", BASE_ROW_MARKER, "kron"],
            id="contiguous",
        ),
        pytest.param(["lora4"] * 3, id="one-adapter"),
        pytest.param(["kron"] * 3, id="one-lokr-adapter"),
        pytest.param(["scale"] * 3, id="one-ia3-adapter"),
    ],
)
def test_each_routed_row_gets_its_solo_logits(trees: Trees, names: list[str]) -> None:
    torch.manual_seed(7)
    ids = torch.randint(3, 250, (len(names), 6))
    with torch.inference_mode():
        trees.tree.assign(names)
        routed = trees.tree.model(input_ids=ids).logits
        for i, name in enumerate(names):
            expected = _solo_logits(trees, name, ids[i : i + 1])
            assert torch.equal(routed[i], expected), name
        # Every adapter changes its rows: a routing mix-up could not pass unseen.
        for name in set(names) - {BASE_ROW_MARKER}:
            i = names.index(name)
            base = _solo_logits(trees, BASE_ROW_MARKER, ids[i : i + 1])
            assert not torch.allclose(routed[i], base), name


def _prefill_and_decode(
    tree: RoutedTree, names: list[str], ids: torch.Tensor, tokens: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Last-position logits of a prefill of ``ids`` and of a decode step per ``tokens``."""
    tree.assign(names)
    out = tree.model(input_ids=ids, use_cache=True)
    logits = [out.logits[:, -1]]
    for token in tokens:
        tree.assign(names)
        out = tree.model(input_ids=token, past_key_values=out.past_key_values)
        logits.append(out.logits[:, -1])
    return logits


def _grouped(names: list[str]) -> tuple[list[int], list[str]]:
    """The row order that makes each adapter's rows contiguous (groups in order of first
    appearance), and the names in that order."""
    first = {name: names.index(name) for name in names}
    perm = sorted(range(len(names)), key=lambda i: first[names[i]])
    return perm, [names[i] for i in perm]


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(["reverse", "title", "upper"] * 6 + ["title"], id="lora-and-loha"),
        pytest.param(["upper", "reverse", "reverse", "upper", "upper"] * 3, id="two-lora"),
        pytest.param(
            ["title", BASE_ROW_MARKER, "lora4", "kron", "scale", "reverse", "title"] * 2,
            id="every-type",
        ),
    ],
)
def test_interleaved_steps_equal_contiguous_steps(trees: Trees, names: list[str]) -> None:
    """A prefill and decode steps with the KV cache: interleaved rows (the gathered path) get
    exactly the logits the same rows get when each adapter's rows are contiguous (each
    adapter's own layer on a slice of the rows, as peft computes it for them)."""
    torch.manual_seed(11)
    ids = torch.randint(3, 250, (len(names), 5))
    tokens = [torch.randint(3, 250, (len(names), 1)) for _ in range(3)]
    perm, grouped = _grouped(names)
    with torch.inference_mode():
        trees.tree.assign(names)
        assert trees.tree.routing.order is not None  # the gathered path
        trees.tree.assign(grouped)
        assert trees.tree.routing.order is None  # slices, each adapter's layer on its rows
        interleaved = _prefill_and_decode(trees.tree, names, ids, tokens)
        contiguous = _prefill_and_decode(trees.tree, grouped, ids[perm], [t[perm] for t in tokens])
    for step, (mixed, reference) in enumerate(zip(interleaved, contiguous, strict=True)):
        for j, i in enumerate(perm):
            assert torch.equal(mixed[i], reference[j]), (names[i], i, step)


def test_dora_is_not_routable_and_a_removed_adapter_unwraps(files: ModelFiles) -> None:
    base = AutoModelForCausalLM.from_pretrained(files.base, dtype=torch.float32).eval()
    dora = PeftModel.from_pretrained(share_weights_copy(base), files.adapters / "dora").eval()
    assert "cannot be routed" in RoutedTree.why_not(dora, "default")
    lora = PeftModel.from_pretrained(share_weights_copy(base), files.adapters / "lora4").eval()
    tree = RoutedTree(share_weights_copy(base))
    tree.add(lora, "default")
    assert len(tree.layers) == 2 * 4  # q_proj and down_proj of each of the 4 decoder layers
    tree.remove("default")
    assert not tree.layers and not tree.adapters
    assert {type(m) for m in tree.model.modules()} == {type(m) for m in base.modules()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_multiplier_tensor_multiplies_to_the_bits_of_the_python_number(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(3)
    x = (torch.randn(64, 1, 96) * 10).to(dtype)
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, 6e-5, 6e4, 1e-8]
    x.view(-1)[: len(specials)] = torch.tensor(specials).to(dtype)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    for value in (2.0, 8 / 3, 0.1, 1 / math.sqrt(7), 16 / math.sqrt(3), 1e-3, 0.5, 3.0e38):
        scale = routing.multiplier(value, dtype)
        assert isinstance(scale, torch.Tensor) and scale.ndim == 0
        expected = (x * value).view(bits)
        assert torch.equal((x * scale).view(bits), expected), value
        assert torch.equal(x.clone().mul_(scale).view(bits), expected), value


@dataclass
class OtherTree:
    tree: RoutedTree
    solo: dict[str, Any]


@pytest.fixture(scope="module")
def other_tree(files: ModelFiles) -> OtherTree:
    """A tree with no delta cache (LoHa/LoKr rebuilt per forward, as peft does) and ``lowp``,
    a LoRA adapter whose weights are bfloat16 on the float32 base (peft casts the input to
    them; the sum is float32)."""
    base = AutoModelForCausalLM.from_pretrained(files.base, dtype=torch.float32).eval()
    tree = RoutedTree(share_weights_copy(base), delta_cache_bytes=0)
    solo: dict[str, Any] = {}
    for name in ("upper", "title", "kron", "scale", "lora3"):
        model = PeftModel.from_pretrained(
            share_weights_copy(base), files.adapters / name, adapter_name=name
        ).eval()
        solo[name] = model
    lowp = PeftModel.from_pretrained(
        share_weights_copy(base), files.adapters / "reverse", adapter_name="lowp"
    ).eval()
    with torch.no_grad():
        for param_name, param in lowp.named_parameters():
            if "lora_" in param_name:
                param.data = param.data.to(torch.bfloat16)
    solo["lowp"] = lowp
    for name, model in solo.items():
        assert RoutedTree.why_not(model, name) == ""
        tree.add(model, name)
    assert tree.cached_bytes() == 0
    solo[BASE_ROW_MARKER] = base
    return OtherTree(tree, solo)


def test_uncached_and_other_dtype_adapters_on_the_gathered_path_get_solo_bits(
    other_tree: OtherTree,
) -> None:
    names = ["lowp", "title", BASE_ROW_MARKER, "upper", "kron", "lowp", "scale", "title"]
    names += ["lora3", "upper", "kron", "lowp"]
    torch.manual_seed(13)
    ids = torch.randint(3, 250, (len(names), 6))
    tokens = [torch.randint(3, 250, (len(names), 1)) for _ in range(2)]
    perm, grouped = _grouped(names)
    tree = other_tree.tree
    with torch.inference_mode():
        tree.assign(names)
        assert tree.routing.order is not None  # the gathered path
        routed = tree.model(input_ids=ids).logits
        for i, name in enumerate(names):
            expected = other_tree.solo[name](input_ids=ids[i : i + 1]).logits[0]
            assert torch.equal(routed[i], expected), name
        interleaved = _prefill_and_decode(tree, names, ids, tokens)
        contiguous = _prefill_and_decode(tree, grouped, ids[perm], [t[perm] for t in tokens])
    for step, (mixed, reference) in enumerate(zip(interleaved, contiguous, strict=True)):
        for j, i in enumerate(perm):
            assert torch.equal(mixed[i], reference[j]), (names[i], i, step)


def test_alternating_and_dropped_assignments_keep_every_row_exact(trees: Trees) -> None:
    """A step's decode forward and its joiners' prefill alternate between assignments (each
    kept with its layers' plans); more assignments than are kept drop the oldest. Each forward
    equals the same forward on a tree that saw no other assignment (cleared first)."""
    tree = trees.tree
    assignments = [
        ["upper", "title", "reverse", "upper", "kron", "title"],
        ["reverse", "lora3", "reverse", BASE_ROW_MARKER, "lora3"],
        ["title", "upper", "title", "scale", "lora4", "upper", "kron"],
    ]
    assignments += [
        [name for name in reversed(a)] for a in assignments[: routing.KEPT_ASSIGNMENTS - 1]
    ]
    torch.manual_seed(17)
    inputs = [torch.randint(3, 250, (len(a), 4)) for a in assignments]
    with torch.inference_mode():
        fresh = []
        for names, ids in zip(assignments, inputs, strict=True):
            tree.routing.clear()
            tree.assign(names)
            fresh.append(tree.model(input_ids=ids).logits)
        plans = None
        for _ in range(2):  # alternating, then after more than KEPT_ASSIGNMENTS others
            for k in (0, 1, 0, 1, 2, 0):
                tree.assign(assignments[k])
                if k == 0 and plans is not None:
                    assert tree.routing.plans is plans  # kept, not rebuilt
                assert torch.equal(tree.model(input_ids=inputs[k]).logits, fresh[k]), k
                if k == 0:
                    plans = tree.routing.plans
                    assert plans  # the layers made their plans for it
            for names, ids, expected in zip(assignments, inputs, fresh, strict=True):
                tree.assign(names)
                assert torch.equal(tree.model(input_ids=ids).logits, expected), names
            plans = None  # assignment 0 was dropped meanwhile: rebuilt next time


def test_a_hook_on_a_routed_base_module_still_runs(trees: Trees) -> None:
    tree = trees.tree
    base_layer = tree.layers["model.layers.1.self_attn.v_proj"].base_layer
    names = ["upper", "title", "reverse", "upper"]
    ids = torch.randint(3, 250, (len(names), 4))
    seen: list[str] = []

    def zero(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        seen.append("module")
        return torch.zeros_like(output)

    def count(module: Any, args: Any, output: torch.Tensor) -> None:
        if module is base_layer:
            seen.append("global")

    with torch.inference_mode():
        tree.assign(names)
        plain = tree.model(input_ids=ids).logits
        handle = base_layer.register_forward_hook(zero)
        try:
            hooked = tree.model(input_ids=ids).logits
        finally:
            handle.remove()
        assert seen == ["module"]
        assert not torch.equal(hooked, plain)  # the hook's zeros reached the logits
        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            assert torch.equal(tree.model(input_ids=ids).logits, plain)
        finally:
            handle.remove()
        assert seen == ["module", "global"]
        assert torch.equal(tree.model(input_ids=ids).logits, plain)  # and after removal
    assert seen == ["module", "global"]


@pytest.fixture(scope="module")
def engine(files: ModelFiles) -> Iterator[Engine]:
    # A long wait: the concurrent requests start as one batch.
    eng = Engine(engine_config(files, max_wait_ms=300.0))
    with asyncio.Runner() as runner:
        runner.run(eng.start())
        eng.runner = runner  # type: ignore[attr-defined]
        yield eng
        runner.run(eng.stop())


def test_interleaved_requests_of_many_adapters_equal_solo_and_share_forwards(
    engine: Engine, files: ModelFiles
) -> None:
    infos = {a.name: a for a in engine.adapters()}
    routed = sorted(n for n, a in infos.items() if a.mixed_batching)
    assert set(routed) == {*LORA, *OTHER_ROUTED}
    assert not infos["dora"].mixed_batching
    order = ["upper", "", "reverse", "lora3", "title", "upper", "lora4", "", "kron", "scale"]
    order += ["dora", "scale"]
    order += ["lora3", "reverse", "", "lora4"]
    requests = [
        GenerationRequest(
            f"routed-{i}",
            token_ids=tuple(10 + (i * 7 + j * 11) % 200 for j in range(2 + i % 5)),
            adapter=adapter,
            parameters=GenerationParams(max_new_tokens=6, min_new_tokens=6, do_sample=False),
        )
        for i, adapter in enumerate(order)
    ]

    async def run() -> list[Any]:
        handles = [engine.submit(r) for r in requests]
        return list(await asyncio.gather(*(h.result() for h in handles)))

    results = engine.runner.run(run())  # type: ignore[attr-defined]
    reference = Reference(files)
    for request, result in zip(requests, results, strict=True):
        expected = reference.generate(
            request.adapter, list(request.token_ids or ()), max_new_tokens=6, min_new_tokens=6
        )
        assert list(result.sequences[0].token_ids) == expected[0], request.adapter or "base"
    shared = [r for r, q in zip(results, requests, strict=True) if q.adapter in {"", *routed}]
    assert {r.batch_size for r in shared} == {len(shared)}, "routed rows must share forwards"
