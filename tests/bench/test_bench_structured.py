"""The structured-output bench cell: compile timing and the report, without a server."""

from __future__ import annotations

import random

from bench.structured import MIXED_CONSTRAINTS, compile_times, random_schema, report


def test_compile_times_cover_every_constraint() -> None:
    result = compile_times(generated=3)
    assert result["constraints"] == 4 + 3 + 5
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    text = report({"compile": result, "throughput": []})
    assert f"p50 {result['p50_ms']} ms" in text


def test_generated_schemas_are_objects_with_every_property_required() -> None:
    rng = random.Random(1)
    for _ in range(20):
        schema = random_schema(rng)
        assert schema["type"] == "object"
        assert schema["required"] == sorted(schema["properties"])


def test_mixed_constraints_cannot_complete_within_the_run_length() -> None:
    # Each needs at least 64 characters: rows run their full 32 tokens, as the ratio assumes.
    for constraint in MIXED_CONSTRAINTS:
        assert "64" in str(constraint)
