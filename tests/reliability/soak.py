"""A bounded soak: many mixed requests with random cancels and deadlines, then invariants.

Quick form: ``tests/reliability/test_soak.py`` (in ``make test``). Full form: ``make soak``
(``python -m tests.reliability.soak --requests 5000``). Traffic goes only to 127.0.0.1; every
call is bounded by a deadline and the run by a request count.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
from collections import Counter
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
    elif kind < 0.4:
        params.num_beams = 2
    if rng.random() < 0.2:
        params.stop_sequences.append(rng.choice(["o", " ", "e"]))
    return pb.GenerateRequest(
        request_id=f"soak-{i}", text=text, adapter=rng.choice(ADAPTERS), parameters=params
    )


async def _one(
    stub: pb_grpc.GenerationServiceStub, rng: random.Random, i: int, report: SoakReport
) -> None:
    request = _request(rng, i)
    streaming = rng.random() < 0.5
    # 10% get a deadline short enough to expire queued or mid-generation.
    timeout = rng.choice([0.01, 0.05, 0.2]) if rng.random() < 0.1 else CALL_BOUND_S
    cancel_after = rng.uniform(0.0, 0.2) if rng.random() < 0.1 else None
    call = (stub.StreamGenerate if streaming else stub.Generate)(request, timeout=timeout)

    async def consume() -> str:
        if streaming:
            last = None
            async for message in call:  # type: ignore[union-attr]
                last = message
            assert last is not None and last.WhichOneof("event") == "summary", "stream ended early"
            return "OK"
        response = await call
        assert response.sequences and response.sequences[0].finish_reason, "no finish reason"
        return "OK"

    task = asyncio.ensure_future(consume())
    try:
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            call.cancel()
        outcome = await asyncio.wait_for(task, CALL_BOUND_S + 5)
    except asyncio.CancelledError:
        outcome = "CLIENT_CANCELLED"
    except grpc.aio.AioRpcError as error:
        outcome = error.code().name
    except TimeoutError:
        report.hung += 1
        outcome = "HUNG"
    report.outcomes[outcome] += 1
    report.requests += 1


async def run_soak(address: str, requests: int, concurrency: int, seed: int) -> SoakReport:
    """Send ``requests`` mixed calls, at most ``concurrency`` at a time."""
    rng = random.Random(seed)
    report = SoakReport()
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        limiter = asyncio.Semaphore(concurrency)

        async def guarded(i: int) -> None:
            async with limiter:
                await _one(stub, rng, i, report)

        await asyncio.gather(*(guarded(i) for i in range(requests)))
    report.wall_s = time.perf_counter() - started
    return report


def rss_bytes() -> int:
    """Resident set size of this process (which hosts the in-process server)."""
    gc.collect()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = ServerThread()
    server.wait_ready()
    try:
        asyncio.run(run_soak(server.address, 300, args.concurrency, args.seed + 1))  # warm-up
        before = rss_bytes()
        report = asyncio.run(run_soak(server.address, args.requests, args.concurrency, args.seed))
        after = rss_bytes()
        stats = wait_idle(server)
    finally:
        server.stop()
    growth = (after - before) / before
    print(
        f"{report.requests} requests in {report.wall_s:.1f}s: {dict(report.outcomes)}; "
        f"hung {report.hung}; engine queued {stats.queued} running {stats.running}; "
        f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({growth:+.1%})"
    )
    ok = report.hung == 0 and stats.queued == 0 and stats.running == 0 and growth <= 0.05
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
