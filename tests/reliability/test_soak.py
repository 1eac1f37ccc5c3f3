"""Quick soak: a few hundred mixed requests with cancels and deadlines leave nothing behind."""

from __future__ import annotations

import asyncio

from ..conftest import ServerThread
from .soak import EXPECTED_OUTCOMES, leftover_bookkeeping, rss_bytes, run_soak, wait_idle


def test_quick_soak_leaves_no_state_and_no_growth() -> None:
    server = ServerThread(engine_process=False)  # reads the batcher's bookkeeping
    server.wait_ready()
    try:
        asyncio.run(run_soak(server.address, requests=150, concurrency=32, seed=1))  # warm-up
        before = rss_bytes()
        report = asyncio.run(run_soak(server.address, requests=300, concurrency=32, seed=2))
        after = rss_bytes()
        stats = wait_idle(server)
        leftovers = leftover_bookkeeping(server)
    finally:
        server.stop()
    growth = (after - before) / before
    print(f"\nquick soak: {dict(report.outcomes)} in {report.wall_s:.1f}s, RSS {growth:+.1%}")
    assert report.requests == 300
    assert report.hung == 0
    assert stats.queued == 0 and stats.running == 0
    assert leftovers == 0
    assert report.outcomes["OK"] > 150
    # Only these outcomes are legitimate under client cancels and short deadlines.
    assert set(report.outcomes) <= EXPECTED_OUTCOMES, report.outcomes
    assert growth <= 0.05
