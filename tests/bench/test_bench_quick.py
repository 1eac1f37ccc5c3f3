"""Smoke check of the benchmark harness: ``python -m bench.run --quick`` end to end.

It asserts that the harness works — servers start and stop, every cell completes, the report
files exist with sane fields — and nothing about speed: timing on a shared CI machine is noise.
The quick run is sized to take well under a minute on an idle 2-core machine; the timeout only
stops a hung run (a loaded machine can make it several times slower).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "models" / "demo" / "base"

HANG_TIMEOUT_S = 600.0


def test_quick_benchmark_writes_a_sane_report(tmp_path: Path) -> None:
    assert (DEMO_MODEL / "config.json").is_file(), "the demo model is part of the repository"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

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
        if cell["workload"] != "natural":
            # Every request generates exactly its drawn length, within the quick range.
            low = results["meta"]["min_output_tokens"]
            high = results["meta"]["max_output_tokens"]
            assert low * metrics["ok"] <= metrics["output_tokens"] <= high * metrics["ok"]
        if cell["stream"]:
            assert metrics["ttft_ms"]["p50"] > 0 and metrics["itl_ms"]["count"] > 0
        if cell["system"].startswith("peftserve"):
            # Batch sizes come back from the server's request log for every request.
            assert sum(metrics["batch_size_histogram"].values()) == metrics["ok"]
            assert max(int(size) for size in metrics["batch_size_histogram"]) <= max(
                results["meta"]["concurrency"]
            )
            # The server's step histograms were scraped around the cell.
            steps = cell["server_steps"]
            assert steps["steps"] > 0 and steps["mean_step_ms"] > 0, cell["id"]
            assert steps["decode_tokens"] > 0 and steps["prefill_tokens"] > 0
            assert metrics["queue_wait_steps"]["p50"] >= 0
        if cell["system"] == "peftserve-b1":
            assert metrics["batch_size_histogram"] == {"1": metrics["ok"]}

    # Every quick scenario produced its cells or record.
    scenarios = {cell["scenario"] for cell in cells.values()}
    assert {"natural", "poisson", "beams"} <= scenarios
    natural = results["scenarios"]["natural"]
    # Greedy and natural lengths: batched and one-by-one requests end at the same token.
    assert natural["compared"] > 0
    assert natural["same_token_counts"] == natural["compared"]
    with_beams = cells[next(i for i in cells if i.endswith("-with-beams"))]
    assert with_beams["background"]["ok"] > 0
    reuse = results["scenarios"]["cancel-reuse"]
    # A trial can be invalid (a loaded machine may split a static batch); it is still recorded.
    assert len(reuse["trials"]) == 1 and len(reuse["engine"]["trials"]) == 1
    for trial in [*reuse["trials"], *reuse["engine"]["trials"]]:
        assert trial["steps"] >= 0 if trial["valid"] else trial["reason"]

    targets = {row["name"]: row for row in results["targets"]}
    for name in (
        "natural lengths vs one by one",
        "StreamGenerate vs Generate",
        "mixed adapters vs single adapter",
        "queue wait p50 in steps",
        "cancel -> queued request starts",
        "c/b (issue 6)",
        "b/a (issue 6)",
    ):
        assert targets[name]["value"] is not None and targets[name]["value"] >= 0, name
        assert targets[name]["met"] in (True, False)
    # Quick mode runs neither transformers serve nor the profile.
    assert targets["vs transformers serve, 64 clients"]["value"] is None
    assert targets["engine Python share of worker time"]["value"] is None

    markdown = (tmp_path / "results.md").read_text()
    assert "## Targets" in markdown
    for section in ("## Natural lengths", "## Poisson arrivals", "## A cancelled row's place"):
        assert section in markdown
    assert all(cell_id in markdown for cell_id in cells)
    for name in results["plots"]:
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(results["plots"]) == 3
