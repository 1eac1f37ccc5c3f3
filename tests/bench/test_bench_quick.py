"""Smoke check of the benchmark harness: ``python -m bench.run --quick`` end to end.

It asserts that the harness works — servers start and stop, every cell completes, the report
files exist with sane fields — and nothing about speed: timing on a shared CI machine is noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "models" / "demo" / "base"

QUICK_BUDGET_S = 90.0


def test_quick_benchmark_writes_a_sane_report(tmp_path: Path) -> None:
    assert (DEMO_MODEL / "config.json").is_file(), "the demo model is part of the repository"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_BUDGET_S + 60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert elapsed < QUICK_BUDGET_S, f"--quick took {elapsed:.0f}s"

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["mode_name"] == "quick"
    assert results["meta"]["environment"]["nproc"] >= 1
    cells = {cell["id"]: cell for cell in results["cells"]}
    systems = {cell["system"] for cell in cells.values()}
    assert {"inprocess", "peftserve", "peftserve-b1"} <= systems
    assert "transformers-serve" not in systems  # quick mode never needs transformers serve
    assert {"baseline": "d", "reason": "quick mode"} in results["skipped"]
    for cell in cells.values():
        metrics = cell["metrics"]
        assert metrics["requests"] > 0, cell["id"]
        assert metrics["ok"] == metrics["requests"], (cell["id"], metrics["errors"])
        assert metrics["output_tokens_per_s"] > 0
        assert metrics["e2e_ms"]["p50"] > 0
        assert len(cell["e2e_ms_values"]) == metrics["ok"]
        # Every request generates exactly its drawn length, within the quick range.
        low, high = results["meta"]["min_output_tokens"], results["meta"]["max_output_tokens"]
        assert low * metrics["ok"] <= metrics["output_tokens"] <= high * metrics["ok"]
        if cell["stream"]:
            assert metrics["ttft_ms"]["p50"] > 0 and metrics["itl_ms"]["count"] > 0
        if cell["system"].startswith("peftserve"):
            # Batch sizes come back from the server's request log for every request.
            assert sum(metrics["batch_size_histogram"].values()) == metrics["ok"]
            assert max(int(size) for size in metrics["batch_size_histogram"]) <= max(
                results["meta"]["concurrency"]
            )
        if cell["system"] == "peftserve-b1":
            assert metrics["batch_size_histogram"] == {"1": metrics["ok"]}

    ratios = {ratio["name"]: ratio for ratio in results["ratios"]}
    for name in ("c/b", "b/a", "stream/unary"):
        assert ratios[name]["value"] is not None and ratios[name]["value"] > 0, name
    assert ratios["c/d"]["value"] is None

    markdown = (tmp_path / "results.md").read_text()
    assert "## Ratios against the targets" in markdown
    assert all(cell_id in markdown for cell_id in cells)
    for name in results["plots"]:
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(results["plots"]) == 3
