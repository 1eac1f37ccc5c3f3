"""A bounded soak: many mixed requests with random cancels and deadlines, then invariants.

Quick form: ``tests/reliability/test_soak.py`` (in ``make test``). Full form: ``make soak``
(``python -m tests.reliability.soak --requests 5000``). Traffic goes only to 127.0.0.1; every
call is bounded by a deadline and the run by a request count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread

if TYPE_CHECKING:
    from peftserve.server.engine import EngineStats

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog")
WORDS += ("red", "moon", "hello", "world")
ADAPTERS = ["", "upper", "reverse", "title"]
# Longest any single call may take before it counts as hung.
CALL_BOUND_S = 60.0


# What a healthy server may answer this traffic: completions, the client's own cancels and
# short deadlines. Anything else (INTERNAL, SERVER_CANCELLED, "BAD: ...", HUNG) is a failure.
EXPECTED_OUTCOMES = {"OK", "CLIENT_CANCELLED", "DEADLINE_EXCEEDED"}


@dataclass
class SoakReport:
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    hung: int = 0
    wall_s: float = 0.0


def _request(rng: random.Random, i: int) -> pb.GenerateRequest:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
    kind = rng.random()
    params = pb.GenerationParameters(max_new_tokens=rng.randint(1, 24))
    if kind < 0.3:
        params.do_sample = True
        params.temperature = rng.choice([0.5, 1.0, 2.0])
        params.seed = rng.randint(0, 2**32)
        if rng.random() < 0.3:
            params.num_return_sequences = 2
    elif kind < 0.4:
        params.num_beams = 2
    if rng.random() < 0.2:
        params.stop_sequences.append(rng.choice(["o", " ", "e"]))
    return pb.GenerateRequest(
        request_id=f"soak-{i}", text=text, adapter=rng.choice(ADAPTERS), parameters=params
    )


# Finish reasons a successful call may carry: anything else on an OK response would be a
# partial result the client was not told about (CANCELLED / DEADLINE_EXCEEDED rows are only
# legitimate behind a non-OK status).
COMPLETE = {
    pb.FINISH_REASON_LENGTH,
    pb.FINISH_REASON_EOS,
    pb.FINISH_REASON_STOP_SEQUENCE,
    pb.FINISH_REASON_CONTEXT_LENGTH,
}


def _incomplete(sequences: Sequence[pb.Sequence], short_deadline: bool) -> str | None:
    if not sequences:
        return "OK without sequences"
    reasons = [s.finish_reason for s in sequences]
    # The engine may see a short deadline pass a moment before gRPC does; it then answers OK
    # with the tokens so far, marked DEADLINE_EXCEEDED: partial, but said so.
    allowed = COMPLETE | {pb.FINISH_REASON_DEADLINE_EXCEEDED} if short_deadline else COMPLETE
    if any(r not in allowed for r in reasons):
        return f"OK with finish reasons {[pb.FinishReason.Name(r) for r in reasons]}"
    return None


async def _one(stub: pb_grpc.GenerationServiceStub, seed: int, i: int, report: SoakReport) -> None:
    # One generator per request: the traffic does not depend on completion order.
    rng = random.Random(seed * 1_000_003 + i)
    request = _request(rng, i)
    streaming = rng.random() < 0.5
    # 10% get a deadline short enough to expire queued or mid-generation.
    timeout = rng.choice([0.01, 0.05, 0.2]) if rng.random() < 0.1 else CALL_BOUND_S
    cancel_after = rng.uniform(0.0, 0.2) if rng.random() < 0.1 else None
    call = (stub.StreamGenerate if streaming else stub.Generate)(request, timeout=timeout)
    cancelled_by_us = False

    async def consume() -> str:
        if streaming:
            # The summary carries finish reasons only (the deltas carried the text).
            summary = None
            async for message in call:  # type: ignore[union-attr]
                if message.WhichOneof("event") == "summary":
                    summary = message.summary
            if summary is None:
                return "BAD: stream ended OK without a summary"
            problem = _incomplete(summary.sequences, timeout < CALL_BOUND_S)
        else:
            response = await call
            problem = _incomplete(response.sequences, timeout < CALL_BOUND_S)
        return f"BAD: {problem}" if problem else "OK"

    task = asyncio.ensure_future(consume())
    try:
        if cancel_after is not None:
            done, _ = await asyncio.wait({task}, timeout=cancel_after)
            if not done:
                cancelled_by_us = True
                call.cancel()
        outcome = await asyncio.wait_for(task, CALL_BOUND_S + 5)
    except asyncio.CancelledError:
        outcome = "CLIENT_CANCELLED" if cancelled_by_us else "BAD: cancelled, not by the client"
    except grpc.aio.AioRpcError as error:
        outcome = error.code().name
        if error.code() == grpc.StatusCode.CANCELLED:
            # CANCELLED is only ever the client's own doing; from the server it is a bug.
            outcome = "CLIENT_CANCELLED" if cancelled_by_us else "SERVER_CANCELLED"
    except TimeoutError:
        report.hung += 1
        outcome = "HUNG"
    report.outcomes[outcome] += 1
    report.requests += 1


async def run_soak(address: str, requests: int, concurrency: int, seed: int) -> SoakReport:
    """Send ``requests`` mixed calls, at most ``concurrency`` at a time."""
    report = SoakReport()
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        limiter = asyncio.Semaphore(concurrency)

        async def guarded(i: int) -> None:
            async with limiter:
                await _one(stub, seed, i, report)

        await asyncio.gather(*(guarded(i) for i in range(requests)))
    report.wall_s = time.perf_counter() - started
    return report


def rss_bytes() -> int:
    """Resident set size of this process (which hosts the in-process server)."""
    gc.collect()
    # glibc keeps freed heap pages mapped; returning them first makes RSS track live memory,
    # so the growth bound measures leaks rather than allocator caching (a few MiB either way).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


def wait_idle(server: ServerThread, timeout_s: float = 10.0) -> EngineStats:
    """Engine stats once nothing is queued or running (cancelled rows end within a step)."""
    engine = server.server.engine()
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.run_in_loop(engine.stats)
        if (stats.queued == 0 and stats.running == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def leftover_bookkeeping(server: ServerThread) -> int:
    """Per-request entries the batcher still tracks once idle; anything but 0 is a leak.

    The RSS bound is far too coarse for a leak of one small object per request (a cancelled
    queued request's batch key leaked that way: ~150 per 1000 requests, +0 MiB visible).
    """
    return int(server.server.engine()._batcher.tracked())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = ServerThread(engine_process=False)  # leftover_bookkeeping reads the batcher
    server.wait_ready()
    try:
        # Warm-up long enough for allocator pools and caches to settle, so growth after it
        # means a leak rather than first-use allocations.
        asyncio.run(run_soak(server.address, 1000, args.concurrency, args.seed + 1))
        before = rss_bytes()
        report = asyncio.run(run_soak(server.address, args.requests, args.concurrency, args.seed))
        after = rss_bytes()
        stats = wait_idle(server)
        leftovers = leftover_bookkeeping(server)
    finally:
        server.stop()
    growth = (after - before) / before
    print(
        f"{report.requests} requests in {report.wall_s:.1f}s: {dict(report.outcomes)}; "
        f"hung {report.hung}; engine queued {stats.queued} running {stats.running}; "
        f"leftover bookkeeping {leftovers}; "
        f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({growth:+.1%})"
    )
    unexpected = set(report.outcomes) - EXPECTED_OUTCOMES
    ok = (
        not unexpected
        and report.hung == 0
        and stats.queued == 0
        and stats.running == 0
        and leftovers == 0
        and growth <= 0.05
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
