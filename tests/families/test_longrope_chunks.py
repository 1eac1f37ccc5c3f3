"""Phi-3 LongRoPE with chunked prefill: a long prompt fed in chunks must still equal solo.

transformers picks the LongRoPE factors per forward from its largest position, and a solo
``generate`` prefills a prompt longer than the switch in one forward, with the long factors
for every position. A prompt prefilled in chunks would give its first chunks (all below the
switch) the short factors. Runs where the engine has a per-step prefill budget
(``max_prefill_tokens``, the iteration-level loop); skipped on the static batcher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from peftserve.server.engine.config import EngineConfig

from .conftest import Served, serving
from .models import FAMILIES, LONGROPE_SWITCH
from .test_matrix import _check, _request, _together

HAS_PREFILL_BUDGET = "max_prefill_tokens" in {f.name for f in dataclasses.fields(EngineConfig)}
LONG = "the quick brown fox jumps over the lazy dog and the cat sat on the mat again and again"
SHORT = "the fox"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if not HAS_PREFILL_BUDGET:
        pytest.skip("the engine has no per-step prefill budget (no chunked prefill)")
    family = FAMILIES["phi3-longrope"]
    out = tmp_path_factory.mktemp("longrope-chunks")
    overrides: dict[str, Any] = {"max_prefill_tokens": 8}
    with serving(family, {"lora": "lora"}, out, **overrides) as served:
        yield served


def test_a_chunk_prefilled_long_prompt_equals_solo(served: Served) -> None:
    assert len(served.encode(LONG)) > LONGROPE_SWITCH > 8
    cases = [("", LONG), ("lora", LONG), ("", SHORT), ("lora", SHORT)]
    for adapter, text in cases:
        response = served.stub.Generate(_request(adapter, text), timeout=60)
        _check(served, adapter, text, response)
    for (adapter, text), response in zip(cases, _together(served, cases), strict=True):
        _check(served, adapter, text, response)
