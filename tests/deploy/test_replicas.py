"""Three real peftserve processes behind one client, as in a Kubernetes Deployment.

The client uses the very service config docs/deploy.md gives (``channel.service_config``):
round_robin over ``ipv4:127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3``, health-checked subchannels,
retries of UNAVAILABLE. Each replica runs with its own ``--model-id``, so every response's
provenance says which replica served it; the replicas' own metrics must agree.

Phases (bounded by call counts, every process stopped by the test itself):
1. steady load: every replica serves a fair share;
2. SIGTERM one replica mid-load (streams running on it, unary calls in flight): no unary call
   fails, started streams finish, the replica exits 0 after draining;
3. restart it on the same port: it takes its share again.
The measured figures are printed (``-s``) and quoted in docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from peftserve.client import AsyncPeftServeClient, PeftServeClientError, StreamSummary
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import DEMO_ADAPTERS, DEMO_MODEL

REPLICAS = 3
CONCURRENCY = 6
PROMPT = "the quick brown fox"
# Short unary calls keep the load steady and the test quick; streams are long enough to be
# still running on the replica when it gets SIGTERM.
UNARY_TOKENS = 8
STREAM_TOKENS = 400
STEADY_CALLS = 90
DRAIN_CALLS_AFTER_EXIT = 30
RESTART_CALLS = 60
SHUTDOWN_GRACE_S = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Replica:
    """One ``python -m peftserve.server`` process on fixed loopback ports."""

    name: str
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = None
    log: IO[str] | None = None

    def start(self, log_dir: Path) -> None:
        if self.log is not None:
            self.log.close()
        self.log = (log_dir / f"{self.name}.log").open("a")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peftserve.server",
                f"--address=127.0.0.1:{self.port}",
                f"--metrics-address=127.0.0.1:{self.metrics_port}",
                f"--model-path={DEMO_MODEL}",
                f"--adapters-dir={DEMO_ADAPTERS}",
                f"--model-id={self.name}",
                f"--shutdown-grace-s={SHUTDOWN_GRACE_S}",
                "--log-level=WARNING",
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )

    def wait_ready(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()  # the server prints one line once ready
        assert "ready on" in line, f"{self.name} did not start: {line!r}; see {self.log}"

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.log is not None:
            self.log.close()

    def served(self) -> float:
        """Generate calls this process finished with OK, by its own metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        wanted = {"rpc": "Generate", "status": "OK", "adapter": ""}
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "peftserve_requests_total" and sample.labels == wanted
        )


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    started = [Replica(f"replica-{i}") for i in range(REPLICAS)]
    try:
        for replica in started:  # all three load at once
            replica.start(tmp_path)
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


@dataclass
class Load:
    """Unary calls from CONCURRENCY workers; every outcome is recorded with its replica."""

    client: AsyncPeftServeClient
    served: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    done: int = 0
    # (start, end, replica) of every successful call, monotonic seconds.
    calls: list[tuple[float, float, str]] = field(default_factory=list)

    async def run(self, calls: int) -> None:
        """Make exactly ``calls`` calls (spread over the workers), then return."""
        remaining = [calls]

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                start = time.monotonic()
                try:
                    output = await self.client.generate(
                        PROMPT, max_new_tokens=UNARY_TOKENS, min_new_tokens=UNARY_TOKENS
                    )
                except PeftServeClientError as error:
                    self.failures.append(f"{error.code.name}: {error.message}")
                else:
                    self.served[output.model_id] += 1
                    self.calls.append((start, time.monotonic(), output.model_id))
                self.done += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def until(done: object, traffic: asyncio.Task[None], timeout_s: float = 60) -> None:
    """Wait for ``done()`` while the background traffic runs (its failure surfaces at once)."""
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        if traffic.done():
            traffic.result()
            raise AssertionError("the traffic ended early")
        assert time.monotonic() < deadline, "timed out waiting for the traffic"
        await asyncio.sleep(0.01)


def shares(counts: Counter[str], names: list[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {name: round(counts[name] / total, 3) for name in names}


async def stream_to_end(client: AsyncPeftServeClient, started: asyncio.Event) -> tuple[str, float]:
    """One long stream: the replica that served it and when it ended (a failure raises)."""
    async for event in client.stream_events(
        PROMPT, max_new_tokens=STREAM_TOKENS, min_new_tokens=STREAM_TOKENS
    ):
        started.set()
        if isinstance(event, StreamSummary):
            assert event.output.completion_tokens == STREAM_TOKENS
            return event.output.model_id, time.monotonic()
    raise AssertionError("the stream ended without a summary")


def test_three_replicas_share_load_and_survive_a_drain(replicas: list[Replica]) -> None:
    names = [r.name for r in replicas]
    victim = replicas[1]
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)

    async def scenario() -> dict[str, object]:
        async with AsyncPeftServeClient(target, timeout_s=60) as client:
            load = Load(client)
            # Warm-up: round_robin adds each subchannel once connected and SERVING.
            deadline = time.monotonic() + 30
            while len(load.served) < REPLICAS:
                assert time.monotonic() < deadline, f"only {set(load.served)} answered"
                await load.run(CONCURRENCY)
            before = {r.name: r.served() for r in replicas}

            # 1. Steady load.
            load.served.clear()
            await load.run(STEADY_CALLS)
            steady = Counter(load.served)
            by_metrics = {r.name: r.served() - before[r.name] for r in replicas}
            assert not load.failures, load.failures

            # 2. Drain. Streams start first, on every replica (consecutive round_robin picks).
            starts = [asyncio.Event() for _ in range(REPLICAS * 2)]
            streams = [asyncio.create_task(stream_to_end(client, s)) for s in starts]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 60)
            load.served.clear()
            first_call = load.done
            # Background traffic until cancelled below (10 000 calls at most).
            traffic = asyncio.create_task(load.run(10_000))
            # SIGTERM while the streams run and the workers' first calls are on their way (a
            # pause for pacing only: whatever was in flight, nothing may fail).
            await asyncio.sleep(0.2)
            sigterm_at = time.monotonic()
            victim.terminate()
            assert victim.process is not None
            exit_code = await asyncio.to_thread(victim.process.wait, SHUTDOWN_GRACE_S + 30)
            drain_s = time.monotonic() - sigterm_at
            stream_ends = await asyncio.gather(*streams)
            stream_outcomes = Counter(name for name, _ in stream_ends)
            victim_streams_after = sum(
                1 for name, end in stream_ends if name == victim.name and end > sigterm_at
            )
            after_exit = load.done
            await until(lambda: load.done >= after_exit + DRAIN_CALLS_AFTER_EXIT, traffic)
            calls_during_drain = load.done - first_call
            traffic.cancel()
            victim_calls = [c for c in load.calls if c[2] == victim.name]
            in_flight_finished = sum(1 for a, b, _ in victim_calls if a < sigterm_at < b)
            picked_after = sum(1 for a, _, _ in victim_calls if a > sigterm_at)
            drain_served = Counter(load.served)
            drain_failures = list(load.failures)

            # 3. Restart on the same port: it comes back into the rotation by itself.
            victim.start(victim_log_dir)
            await asyncio.to_thread(victim.wait_ready)
            load.served.clear()
            deadline = time.monotonic() + 60
            while load.served[victim.name] == 0:
                assert time.monotonic() < deadline, "the restarted replica got no calls"
                await load.run(CONCURRENCY)
            load.served.clear()
            await load.run(RESTART_CALLS)
            restarted = Counter(load.served)
            assert not load.failures[len(drain_failures) :], load.failures
        return {
            "steady": steady,
            "by_metrics": by_metrics,
            "exit_code": exit_code,
            "drain_s": drain_s,
            "streams": stream_outcomes,
            "victim_streams_after": victim_streams_after,
            "in_flight_finished": in_flight_finished,
            "picked_after": picked_after,
            "calls_during_drain": calls_during_drain,
            "drain_served": drain_served,
            "drain_failures": drain_failures,
            "restarted": restarted,
        }

    assert victim.log is not None
    victim_log_dir = Path(victim.log.name).parent
    started = time.monotonic()
    result = asyncio.run(scenario())
    print(
        f"\nsteady {STEADY_CALLS} calls, share per replica: {shares(result['steady'], names)}"
        f"\n  the replicas' own metrics counted {result['by_metrics']}"
        f"\ndrain of {victim.name}: exit {result['exit_code']} after {result['drain_s']:.1f} s;"
        f" {result['calls_during_drain']} unary calls in the phase, failed:"
        f" {len(result['drain_failures'])}, served by {dict(result['drain_served'])};"
        f"\n  its unary calls in flight at SIGTERM that finished OK:"
        f" {result['in_flight_finished']},"
        f" its calls started after SIGTERM: {result['picked_after']};"
        f"\n  streams started before SIGTERM, by replica: {dict(result['streams'])}"
        f" ({result['victim_streams_after']} of the drained replica's ended after SIGTERM)"
        f"\nafter restart, share per replica: {shares(result['restarted'], names)}"
        f"\n(whole scenario {time.monotonic() - started:.1f} s)"
    )
    steady, restarted = result["steady"], result["restarted"]
    assert isinstance(steady, Counter) and isinstance(restarted, Counter)
    # Fair shares: round_robin rotates over the SERVING subchannels, a third each.
    for counts in (steady, restarted):
        assert set(counts) == set(names), counts
        assert all(0.25 <= share <= 0.42 for share in shares(counts, names).values()), counts
    # Provenance and the replicas' own counters tell the same story.
    assert result["by_metrics"] == {name: float(steady[name]) for name in names}
    # The drain: nothing failed, the draining replica finished its streams and exited cleanly.
    assert result["drain_failures"] == []
    assert result["exit_code"] == 0
    streams = result["streams"]
    assert isinstance(streams, Counter)
    assert sum(streams.values()) == REPLICAS * 2 and set(streams) == set(names), streams
