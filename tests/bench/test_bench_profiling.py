"""Folding py-spy's collapsed stacks into the profile summary."""

from __future__ import annotations

from pathlib import Path

from bench.profiling import categorize, summarize_collapsed


def test_categories_follow_the_innermost_frame() -> None:
    assert categorize("/x/site-packages/torch/nn/modules/linear.py").startswith("model forward")
    assert categorize("/repo/server/engine/rows.py").startswith("peftserve engine")
    assert categorize("/x/site-packages/grpc/aio/_server.py") == "gRPC"
    assert categorize("/x/lib/python3.11/asyncio/base_events.py") == "asyncio event loop"
    assert categorize("/somewhere/else.py") == "other python"


def test_summary_of_collapsed_stacks(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "<module> (run.py:1);generate (/x/transformers/generation/utils.py:10);"
        "forward (/x/torch/nn/modules/linear.py:5) 60\n"
        "<module> (run.py:1);__call__ (/repo/server/engine/rows.py:40) 30\n"
        "<module> (run.py:1);_run_once (/usr/lib/python3.11/asyncio/base_events.py:9) 10\n"
        "garbage line\n"
    )
    summary = summarize_collapsed(raw, top=5)
    assert summary["samples"] == 100
    categories = {e["name"]: e["percent"] for e in summary["self_by_category"]}
    assert categories["model forward (python)"] == 60.0
    assert categories["peftserve engine (batcher, rows, detokenizer)"] == 30.0
    inclusive = {e["name"]: e["percent"] for e in summary["top_inclusive"]}
    assert inclusive["<module> (run.py)"] == 100.0
    assert inclusive["generate (utils.py)"] == 60.0
