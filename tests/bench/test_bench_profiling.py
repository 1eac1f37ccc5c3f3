"""Folding py-spy's collapsed stacks into the profile summary."""

from __future__ import annotations

from pathlib import Path

from bench.profiling import categorize, summarize_collapsed, worker_breakdown


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


def test_worker_breakdown_splits_the_engine_thread_at_the_model_forward(tmp_path: Path) -> None:
    raw = tmp_path / "threads.txt"
    module = "/x/torch/nn/modules/module.py"
    raw.write_text(
        # The engine thread: 80 samples in a module call (the forward), 15 sampling, 5 in the
        # detokenizer's tokenizer call; the event loop thread is not the worker.
        f"thread (0x1): peftserve-engine;run (/repo/server/engine/step.py:3);"
        f"_call_impl ({module}:1);forward (/x/transformers/models/llama/modeling_llama.py:9) 80\n"
        "thread (0x1): peftserve-engine;run (/repo/server/engine/step.py:3);"
        "choose (/repo/server/engine/sampler.py:7) 15\n"
        "thread (0x1): peftserve-engine;emit (/repo/server/engine/detokenize.py:5);"
        "decode (/x/tokenizers/implementations/base.py:2) 5\n"
        "thread (0x2): MainThread;_run_once (/usr/lib/python3.11/asyncio/base_events.py:9) 50\n"
    )
    worker = worker_breakdown(raw)
    assert worker is not None
    assert worker["thread"] == "peftserve-engine"
    assert worker["samples"] == 100
    assert worker["forward_percent"] == 80.0
    assert worker["engine_python_percent"] == 20.0
    files = {e["name"]: e["percent"] for e in worker["engine_python_by_file"]}
    assert files == {
        "server/engine/sampler.py": 15.0,
        "/x/tokenizers/implementations/base.py": 5.0,
    }
    # The thread frame is not a function: summaries see the same stacks without it.
    summary = summarize_collapsed(raw)
    assert summary["samples"] == 150
    assert not any(e["name"].startswith("thread") for e in summary["top_inclusive"])


def test_worker_without_thread_names_is_the_thread_running_the_forward(tmp_path: Path) -> None:
    raw = tmp_path / "plain.txt"
    raw.write_text(
        "Thread.run (threading.py:1);_call_impl (/x/torch/nn/modules/module.py:1) 9\n"
        "Thread.run (threading.py:1);choose (/repo/server/engine/sampler.py:7) 1\n"
    )
    worker = worker_breakdown(raw)
    assert worker is not None and worker["samples"] == 10 and worker["forward_samples"] == 9
    assert worker_breakdown(tmp_path / "plain.txt") == worker
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert worker_breakdown(empty) is None


def test_the_fast_forward_counts_as_the_model_forward(tmp_path: Path) -> None:
    """The engine's fast forward runs the model's modules without ``nn.Module.__call__``: its
    samples (and the routed adapters' layers it calls) are inside the forward all the same; its
    helpers outside ``FastForward.__call__`` and ``FastForward.fused`` (the per-step checks)
    are not."""
    raw = tmp_path / "fast.txt"
    fast = "/repo/server/engine/fastpath.py"
    raw.write_text(
        "thread (0x1): peftserve-engine;forward (/repo/server/engine/step.py:3);"
        f"FastForward.__call__ ({fast}:330);_sdpa ({fast}:510) 60\n"
        "thread (0x1): peftserve-engine;forward (/repo/server/engine/step.py:3);"
        f"FastForward.__call__ ({fast}:330);"
        "RoutedLayer.forward (/repo/server/engine/routing.py:170) 20\n"
        "thread (0x1): peftserve-engine;_prefill (/repo/server/engine/batcher.py:9);"
        f"forward_fused (/repo/server/engine/step.py:150);FastForward.fused ({fast}:380);"
        f"_sdpa ({fast}:510) 40\n"
        "thread (0x1): peftserve-engine;forward (/repo/server/engine/step.py:3);"
        f"why_not ({fast}:200) 5\n"
        "thread (0x1): peftserve-engine;choose (/repo/server/engine/sampler.py:7) 15\n"
    )
    worker = worker_breakdown(raw)
    assert worker is not None
    assert worker["forward_samples"] == 120  # a fused pass is a forward too
    assert worker["engine_python_percent"] == 14.3
    assert categorize(fast) == "model forward (python)"
    assert categorize("/repo/server/engine/routing.py") == "adapter routing (in the forward)"
