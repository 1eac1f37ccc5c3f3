"""Where one model step's time goes: the parts of a decode or prefill step, from py-spy stacks.

``fold(path)`` reads py-spy's ``--format raw`` stacks (of a server, or of this script's own
loop) and attributes every worker-thread sample inside a step to one part, walking the stack
from the innermost frame outwards until a rule matches:

mask building (``masking_utils``), RoPE positions, the KV cache update (``cache_utils``), the
attention kernel, peft layers, the linear layers (the LM head separately), norms and the rest
of the model's own Python, transformers' call wrappers and output dataclasses, module-call
overhead (``torch.nn.Module.__call__``), our step (``step.py``: kwargs, guard, logits copy),
the decode inputs (``running.py``) and the sampler.

Run it on the engine's own pieces (``ModelStep``, ``SubBatch``, ``Sampler``, as
``bench/loop_costs.py``), under py-spy::

    python -m bench.step_profile --rows 1,64 --seconds 8        # decode and prefill, demo base
    python -m bench.step_profile --fold server.pyspy.txt        # a server's py-spy output

Shares are of the samples inside a step (setup and model loading are left out). py-spy sees
Python frames only: a torch op's time is its caller's line.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.profiling import _read_stacks

REPO = Path(__file__).resolve().parents[1]
# A sample is "in a step" when one of these frames is on its stack.
STEP_FRAMES = (
    ("ModelStep.forward", "engine/step.py"),
    ("forward", "engine/step.py"),
    ("choose", "engine/sampler.py"),
    ("Sampler.choose", "engine/sampler.py"),
    ("decode_inputs", "engine/running.py"),
    ("SubBatch.decode_inputs", "engine/running.py"),
    ("advance", "engine/running.py"),
    ("SubBatch.advance", "engine/running.py"),
    ("prefill_inputs", "engine/step.py"),
)
# (function name fragment or "", file fragment, part): innermost match wins.
RULES: tuple[tuple[str, str, str], ...] = (
    # The fast forward (server/engine/fastpath.py): its helpers are named after the parts.
    ("_causal_mask", "engine/fastpath.py", "mask building"),
    ("_fast_all", "engine/fastpath.py", "mask building"),
    ("_apply_rope", "engine/fastpath.py", "RoPE apply"),
    ("_rotate_half", "engine/fastpath.py", "RoPE apply"),
    ("_rope", "engine/fastpath.py", "RoPE positions (cos/sin)"),
    ("_sdpa", "engine/fastpath.py", "attention kernel"),
    ("_linear", "engine/fastpath.py", "linear layers"),
    ("_embed", "engine/fastpath.py", "embedding"),
    ("_rms_norm", "engine/fastpath.py", "norms"),
    ("_act", "engine/fastpath.py", "MLP activation"),
    ("update", "engine/kv_cache.py", "KV cache update"),
    ("", "engine/fastpath.py", "model Python (layers, attention, heads)"),
    ("", "masking_utils.py", "mask building"),
    ("RotaryEmbedding", "", "RoPE positions (cos/sin)"),
    ("rope", "modeling_rope_utils.py", "RoPE positions (cos/sin)"),
    ("apply_rotary_pos_emb", "", "RoPE apply"),
    ("rotate_half", "", "RoPE apply"),
    ("", "cache_utils.py", "KV cache update"),
    ("", "sdpa_attention.py", "attention kernel"),
    ("", "peft/", "peft layers"),
    ("", "engine/sampler.py", "sampler"),
    ("", "engine/running.py", "decode inputs (mask, positions)"),
    ("prefill_inputs", "engine/step.py", "prefill inputs"),
    ("", "engine/peft_guard.py", "guard"),
    ("", "engine/step.py", "our step (kwargs, logits copy)"),
    ("", "torch/nn/modules/linear.py", "linear layers"),
    ("", "torch/nn/modules/sparse.py", "embedding"),
    ("RMSNorm", "", "norms"),
    ("", "activations.py", "MLP activation"),
    ("", "utils/generic.py", "transformers wrappers, outputs"),
    ("", "utils/output_capturing.py", "transformers wrappers, outputs"),
    ("", "utils/deprecation.py", "transformers wrappers, outputs"),
    ("", "configuration_utils.py", "transformers wrappers, outputs"),
    ("", "modeling_layers.py", "transformers wrappers, outputs"),
    ("", "transformers/models/", "model Python (layers, attention, heads)"),
    ("", "torch/nn/modules/", "module-call overhead"),
)


def _part(frames: list[tuple[str, str]]) -> str:
    for index in range(len(frames) - 1, -1, -1):
        func, file = frames[index]
        for name, fragment, part in RULES:
            if (not name or name in func) and (not fragment or fragment in file):
                if part == "linear layers" and _is_head(frames, index):
                    return "LM head"
                return part
    return "other"


def _is_head(frames: list[tuple[str, str]], linear: int) -> bool:
    """Whether the linear layer at ``frames[linear]`` is called by a ``*ForCausalLM``."""
    for func, file in reversed(frames[:linear]):
        if "torch/nn/modules/" in file:
            continue
        return "ForCausalLM" in func or "lm_head" in func
    return False


def _in_step(frames: list[tuple[str, str]]) -> bool:
    return any(
        func.endswith(name) and fragment in file
        for func, file in frames
        for name, fragment in STEP_FRAMES
    )


def fold(path: Path, thread: str | None = None) -> dict[str, Any]:
    """Step samples by part (see the module docstring); only ``thread``'s when given."""
    parts: Counter[str] = Counter()
    for name, frames, count in _read_stacks(path):
        if thread is not None and name != thread:
            continue
        if _in_step(frames):
            parts[_part(frames)] += count
    total = sum(parts.values())
    return {
        "samples": total,
        "parts": [
            {"part": p, "samples": c, "percent": round(100.0 * c / total, 1)}
            for p, c in parts.most_common()
        ]
        if total
        else [],
    }


def print_fold(title: str, folded: dict[str, Any]) -> None:
    print(f"\n{title}: {folded['samples']} samples in steps")
    print("| part | share |")
    print("|---|---|")
    for item in folded["parts"]:
        print(f"| {item['part']} | {item['percent']:.1f}% |")


def _loop(mode: str, rows: int, seconds: float, width: int, model_path: Path, cache: str) -> None:
    """Decode (or prefill) steps for ``seconds``; what py-spy samples."""
    import torch
    from peftserve.server.engine.registry import AdapterRegistry
    from peftserve.server.engine.sampler import Sampler
    from peftserve.server.engine.step import ModelStep
    from transformers import AutoModelForCausalLM

    from bench.loop_costs import KEY, _sub_batch

    torch.set_num_threads(1)
    base: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    step = ModelStep(AdapterRegistry(base, None), torch.device("cpu"))
    sampler = Sampler(torch.device("cpu"), lambda t: str(t))
    vocab = int(base.config.get_text_config().vocab_size)
    end = time.monotonic() + seconds
    steps = 0
    spent = 0.0
    while time.monotonic() < end:
        if mode == "prefill":
            started = time.perf_counter()
            _sub_batch(step, sampler, rows, width, vocab, cache)
            spent += time.perf_counter() - started
            steps += 1
            continue
        batch = _sub_batch(step, sampler, rows, width, vocab, cache)  # widths width..2*width
        started = time.perf_counter()
        for _ in range(width):
            ids, mask, positions = batch.decode_inputs()
            logits = step.forward(KEY, batch.rows, ids, mask, positions, batch.cache)
            batch.advance()
            batch.next_tokens = sampler.choose(logits, batch.rows).tokens
        spent += time.perf_counter() - started
        steps += width
    print(f"{mode} {rows} rows: {1000.0 * spent / max(1, steps):.3f} ms per step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=Path, help="fold this py-spy raw file and exit")
    parser.add_argument("--thread", default=None, help="with --fold: only this thread")
    parser.add_argument("--rows", default="1,64")
    parser.add_argument("--modes", default="decode,prefill")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--width", type=int, default=64, help="decode: cached width at start")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--cache", default="slot", help="the loop's cache kind (bench/loop_costs.py): slot, dynamic"
    )
    parser.add_argument("--model-path", type=Path, default=REPO / "models" / "demo" / "base")
    parser.add_argument("--loop", nargs=2, metavar=("MODE", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fold is not None:
        print_fold(str(args.fold), fold(args.fold, args.thread))
        return
    if args.loop is not None:
        _loop(
            args.loop[0], int(args.loop[1]), args.seconds, args.width, args.model_path, args.cache
        )
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for rows in (int(r) for r in args.rows.split(",")):
                out = Path(tmp) / f"{mode}-{rows}.txt"
                command = [py_spy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(out)]
                command += ["--", sys.executable, "-m", "bench.step_profile", "--loop", mode]
                command += [str(rows), "--seconds", str(args.seconds)]
                command += ["--width", str(args.width), "--model-path", str(args.model_path)]
                command += ["--cache", args.cache]
                subprocess.run(command, check=True, cwd=REPO, stderr=subprocess.DEVNULL)
                print_fold(f"{mode}, {rows} rows, {args.cache} cache", fold(out))


if __name__ == "__main__":
    main()
