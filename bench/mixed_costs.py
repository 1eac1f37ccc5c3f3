"""What mixing adapters costs a routed step: decode steps and prefills per row mix and path.

Runs the engine's own pieces (``AdapterRegistry`` with the demo adapters, its routed tree,
``ModelStep``, ``SubBatch``, ``Sampler``) in process, greedy, on CPU unless CUDA is present,
for the row mixes of the benchmark's adapter cells at ``--rows`` rows (default 55, the rows of a
64-client step):

* ``single``: every row on the first LoRA adapter (``reverse``): no routing index at all;
* ``two-lora``: rows drawn at random from the two LoRA adapters (``reverse``, ``upper``);
* ``lora+loha``: rows drawn at random from the LoRA adapters and the LoHa one (``title``),
  the benchmark's ``uniform`` mix.

Each mix runs on each ``--paths`` kind, the kinds alternating repeat by repeat:
``gathered`` is the routed tree as it is (interleaved rows: each layer input gathered once,
every adapter's delta on its span, one ``index_add_`` per layer), ``per-group`` the path before
it (per adapter and layer an ``index_select`` of its rows and an ``index_add_`` of its delta),
still what contiguous rows take. Both give every row the same bits (tests/engine/test_routing.py).
With ``--against FILE`` (another ``routing.py``, e.g. main's: ``git show main:server/engine/
routing.py > /tmp/main_routing.py``) the kind ``against`` is the routed tree that file builds
over the same base and adapters, so a change to ``routing.py`` is measured before/after in one
process, under one load.

Per cell: the worker thread's CPU time (``time.thread_time``, less sensitive to the load of a
shared machine than the wall clock) of one decode step (forward + sampler) and of one prefill
of ``--joiners`` prompts of ``--prompt`` tokens, medians of ``--repeats``; and the torch calls
one decode step makes (functions and methods that run an operator, property reads excluded):
in a process whose other threads want the GIL (the engine process, the gRPC front), each such
call is a chance to lose it, so the count is what the server's step time follows most.
With ``--layer`` it times instead the 7 routed modules of one decoder layer (q/k/v/o on one
input, gate/up on one, down on another, as the model calls them) on a ``--rows``-row decode
input, best of ``--repeats`` x 10 runs of 10 (the best of many short runs is what a loaded
machine still measures steadily), for base-only rows, all rows on one adapter (LoRA, LoHa) and
the mixes. Usage: ``python bench/mixed_costs.py [--layer] [--rows 55] [--width 40]
[--joiners 2] [--prompt 16] [--repeats 15] [--paths gathered,per-group] [--against FILE]
[--threads 1]``.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peftserve.server.engine import kv_cache, routing
from peftserve.server.engine.registry import ROUTED_GROUP, AdapterRegistry, share_weights_copy
from peftserve.server.engine.running import SubBatch, SubBatchKey
from peftserve.server.engine.sampler import Sampler
from peftserve.server.engine.step import ModelStep, prefill_inputs
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
KEY = SubBatchKey(ROUTED_GROUP, None)
MIXES = {
    "single": ("reverse",),
    "two-lora": ("reverse", "upper"),
    "lora+loha": ("reverse", "upper", "title"),
}


def _row(adapter: str) -> Any:
    # What the sampler and the step read of a greedy row of ``adapter``.
    prepared = SimpleNamespace(adapter=SimpleNamespace(name=adapter))
    return SimpleNamespace(
        processors=[],
        samples=False,
        logprobs_top_n=None,
        constraint=None,
        job=SimpleNamespace(prepared=prepared),
    )


def _against_tree(registry: AdapterRegistry, path: Path) -> Any:
    """The routed tree the ``routing.py`` at ``path`` builds over the registry's base and with
    its routed adapters (read from their type groups' models, as the registry adds them)."""
    name = "peftserve.server.engine._against_routing"  # its relative imports: this package's
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    tree = module.RoutedTree(share_weights_copy(registry.base))
    for adapter in sorted(registry.routed.adapters):
        tree.add(registry.groups[registry.type_group(adapter)].model, adapter)
    return tree


@contextmanager
def _path(kind: str, registry: AdapterRegistry, against: Any) -> Iterator[None]:
    """The routed tree takes ``kind``'s path while this is open."""
    original = routing.Routing.assign
    tree = registry.routed
    if kind == "against":
        registry.routed = against
    elif kind == "per-group":

        def assign(self: routing.Routing, names: Any, device: torch.device) -> None:
            original(self, names, device)
            self.order = None  # every layer routes group by group

        routing.Routing.assign = assign  # type: ignore[method-assign]
    try:
        yield
    finally:
        routing.Routing.assign = original  # type: ignore[method-assign]
        registry.routed = tree


class _Counter(TorchFunctionMode):
    """Counts the torch calls made while it is active (property reads excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", str(func))
        if name != "__get__":
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _prompts(n: int, width: int, seed: int) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [max(1, width - (i * 7) % max(1, width // 2)) for i in range(n)]
    return [tuple(torch.randint(3, 250, (k,), generator=gen).tolist()) for k in lengths]


def _prefilled(
    step: ModelStep, sampler: Sampler, names: list[str], prompts: list[tuple[int, ...]]
) -> SubBatch:
    ids, mask, positions, pads = prefill_inputs(prompts, 0, step.device)
    cache = kv_cache.new_cache(step.model_config)
    rows = [_row(n) for n in names]
    logits = step.forward(KEY, rows, ids, mask if any(pads) else None, positions, cache)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=step.device)
    batch = SubBatch(KEY, rows, cache, mask, pads, lengths)  # type: ignore[arg-type]
    batch.next_tokens = sampler.choose(logits, rows).tokens  # type: ignore[arg-type]
    return batch


def _decode(step: ModelStep, sampler: Sampler, batch: SubBatch) -> None:
    ids, mask, positions = batch.decode_inputs()
    logits = step.forward(KEY, batch.rows, ids, mask, positions, batch.cache)
    batch.advance()
    batch.next_tokens = sampler.choose(logits, batch.rows).tokens  # type: ignore[arg-type]


def _cpu_ms(fn: Callable[[], object], times: int) -> float:
    started = time.thread_time()
    for _ in range(times):
        fn()
    return (time.thread_time() - started) * 1000.0 / times


def _layer_table(
    registry: AdapterRegistry, args: argparse.Namespace, paths: list[str], against: Any
) -> None:
    rng = random.Random(0)
    mixes = {
        "base only": [routing.BASE_ROW_MARKER] * args.rows,
        "all on reverse (LoRA)": ["reverse"] * args.rows,
        "all on title (LoHa)": ["title"] * args.rows,
        **{m: [rng.choice(a) for _ in range(args.rows)] for m, a in MIXES.items() if len(a) > 1},
    }
    config = registry.base.config
    hidden = torch.randn(args.rows, 1, int(config.hidden_size))
    inner = torch.randn(args.rows, 1, int(config.intermediate_size))

    def modules() -> None:
        layer: Any = registry.routed.model.get_submodule("model.layers.0")
        attention, mlp = layer.self_attn, layer.mlp
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            proj(hidden)
        mlp.gate_proj(hidden)
        mlp.up_proj(hidden)
        mlp.down_proj(inner)

    best: dict[tuple[str, str], float] = {}
    with torch.inference_mode():
        for repeat in range(2):
            for kind in paths if repeat % 2 == 0 else list(reversed(paths)):
                with _path(kind, registry, against):
                    for mix, names in mixes.items():
                        registry.routed.assign(names)
                        runs = [_cpu_ms(modules, 10) for _ in range(args.repeats * 5)]
                        us = min(runs) * 1000.0
                        best[kind, mix] = min(best.get((kind, mix), us), us)
    print(f"the 7 routed modules of decoder layer 0 on {args.rows} decode rows, best CPU us\n")
    print("| rows | " + " | ".join(paths) + " |")
    print("|---|" + "---|" * len(paths))
    for mix in mixes:
        print(f"| {mix} | " + " | ".join(f"{best[k, mix]:.0f} us" for k in paths) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=REPO / "models" / "demo" / "base")
    parser.add_argument("--rows", type=int, default=55)
    parser.add_argument("--width", type=int, default=40, help="cached tokens per decoding row")
    parser.add_argument("--joiners", type=int, default=2, help="prompts per prefill")
    parser.add_argument("--prompt", type=int, default=16, help="tokens per joining prompt")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--paths", default="gathered,per-group")
    parser.add_argument("--against", type=Path, help="a routing.py to compare with (kind against)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", action="store_true", help="time one decoder layer's modules")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    base: Any = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    base.to(device).eval()
    registry = AdapterRegistry(base, args.model_path.parent / "adapters")
    step = ModelStep(registry, device)
    sampler = Sampler(device, lambda t: str(t))
    paths = args.paths.split(",")
    against = None
    if args.against is not None:
        against = _against_tree(registry, args.against)
        paths.append("against")
    if args.layer:
        _layer_table(registry, args, paths, against)
        return
    rng = random.Random(0)
    rows = {m: [rng.choice(a) for _ in range(args.rows)] for m, a in MIXES.items()}
    joining = {m: [rng.choice(a) for _ in range(args.joiners)] for m, a in MIXES.items()}
    rows["single"] = ["reverse"] * args.rows
    joining["single"] = ["reverse"] * args.joiners
    decoding = _prompts(args.rows, args.width, 1)
    prompts = [p[: args.prompt] for p in _prompts(args.joiners, args.prompt, 2)]

    decode_ms: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    prefill_ms: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    calls: dict[tuple[str, str], collections.Counter[str]] = {}
    for repeat in range(args.repeats):
        for kind in paths if repeat % 2 == 0 else list(reversed(paths)):
            with _path(kind, registry, against):
                for mix in MIXES:
                    batch = _prefilled(step, sampler, rows[mix], decoding)
                    _decode(step, sampler, batch)  # warm-up
                    if (kind, mix) not in calls:
                        with _Counter() as counter:
                            _decode(step, sampler, batch)
                        calls[kind, mix] = counter.calls
                    decode_ms[kind, mix].append(
                        _cpu_ms(lambda b=batch: _decode(step, sampler, b), 10)
                    )
                    prefill_ms[kind, mix].append(
                        _cpu_ms(lambda m=mix: _prefilled(step, sampler, joining[m], prompts), 5)
                    )

    print(f"model {args.model_path.name}, device {device}, threads {args.threads}")
    print(
        f"{args.rows} decoding rows at width {args.width}; a prefill of {args.joiners} prompts "
        f"of {args.prompt} tokens; CPU ms of the worker thread, medians of {args.repeats}\n"
    )
    print("| mix | path | decode step | prefill | torch calls / decode step | of them |")
    print("|---|---|---|---|---|---|")
    for mix in MIXES:
        for kind in paths:
            counted = calls[kind, mix]
            top = ", ".join(f"{n} {c}" for n, c in counted.most_common(6))
            print(
                f"| {mix} | {kind} | {statistics.median(decode_ms[kind, mix]):.2f} ms "
                f"| {statistics.median(prefill_ms[kind, mix]):.2f} ms "
                f"| {sum(counted.values())} | {top} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
