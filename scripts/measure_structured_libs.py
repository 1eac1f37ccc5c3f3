"""Measure llguidance against xgrammar on the demo tokenizer (the evidence in docs/engine.md).

For an 11-field JSON schema: the time to build a matcher (llguidance) or compile the grammar
(xgrammar), and the time to compute one token mask along a valid 154-token output. xgrammar
is not a project dependency (it pulls triton); install it aside, e.g.
``pip install --no-deps --target /tmp/xg xgrammar apache-tvm-ffi``, and pass ``--xgrammar-path``.

    python scripts/measure_structured_libs.py [--xgrammar-path /tmp/xg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "city": {"type": "string"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "kind": {"enum": ["a", "b", "c"]},
        "note": {"type": ["string", "null"]},
        "count": {"type": "integer", "minimum": 0},
    },
    "required": [
        "name", "age", "email", "active", "score", "tags", "city", "zip", "kind", "note", "count"
    ],
    "additionalProperties": False,
}  # fmt: skip
VALUE = {
    "name": "ann",
    "age": 3,
    "email": "a@b",
    "active": True,
    "score": 1.5,
    "tags": ["x"],
    "city": "c",
    "zip": "12345",
    "kind": "a",
    "note": None,
    "count": 2,
}


def percentiles(seconds: list[float]) -> str:
    xs = sorted(seconds)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return f"p50 {statistics.median(xs) * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us"


def timed(fn: Callable[[], Any], runs: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def measure_llguidance(tokenizer: Any, vocab: int, ids: list[int]) -> None:
    import llguidance
    import llguidance.hf

    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    builds, matcher = timed(lambda: llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0), 30)
    masks = []
    for token in ids:
        start = time.perf_counter()
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:vocab]
        masks.append(time.perf_counter() - start)
        assert allowed[token] and matcher.consume_token(token)
    print(f"llguidance {llguidance.__version__}: build {percentiles(builds)}; ", end="")
    print(f"mask {percentiles(masks)}; complete={matcher.is_accepting()}")


def measure_xgrammar(tokenizer: Any, vocab: int, ids: list[int]) -> None:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    text = json.dumps(SCHEMA)
    compiles, compiled = timed(
        lambda: xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(text), 30
    )
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    masks = []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        masks.append(time.perf_counter() - start)
        assert matcher.accept_token(token)
    print(f"xgrammar: compile {percentiles(compiles)}; ", end="")
    print(f"mask {percentiles(masks)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo" / "base")
    parser.add_argument("--xgrammar-path", type=Path, default=None)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = len(tokenizer)
    ids = tokenizer(json.dumps(VALUE, separators=(",", ":")), add_special_tokens=False)
    measure_llguidance(tokenizer, vocab, ids["input_ids"])
    if args.xgrammar_path is not None:
        sys.path.insert(0, str(args.xgrammar_path))
        measure_xgrammar(tokenizer, vocab, ids["input_ids"])


if __name__ == "__main__":
    main()
