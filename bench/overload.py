"""How fast a server says no: a burst of Generate calls far beyond ``--max-queue-size``.

Starts ``python -m peftserve.server`` (its own process, demo model) and sends ``--flood``
calls at once on one channel, as ``tests/reliability/test_overload.py`` does, in two modes:

* ``busy``: ``--max-batch-size 4``; the admitted requests run while the rest are refused, so the
  rejections share the server with the model worker (the test's setting);
* ``idle``: ``--max-batch-size 64 --max-wait-ms 8000``; the admitted requests wait for
  companions that never come, so nothing runs while the flood is refused: what the rejection
  path costs by itself;
* ``floor``: not peftserve but a bare ``grpc.aio`` server of the same service whose Generate
  aborts at once with a prebuilt RESOURCE_EXHAUSTED status (``--serve-floor``): what grpc
  itself costs per refusal on this machine, the least any Python gRPC server can do.

Per run: time to first rejection, rejection p50/p99 (from the call's start in the client), how
long until the last rejection, and the server's CPU time (all threads, from /proc) from the
flood's start to its last rejection divided by the number of rejections (in ``idle`` mode: the
CPU one rejection costs the server, admission of the queue's few requests included); the
client's CPU per call likewise. ``--rate R`` sends the calls open-loop at R calls/s instead
of all at once (a sustained overload: how long one refusal waits). ``--baseline DIR`` repeats
every run, back to back, against the ``peftserve`` package found in DIR (a copy of another
checkout's ``client/generated/peftserve`` with its ``server/`` inside), for before/after in
one run. ``--profile DIR`` samples the server with ``py-spy --gil`` during each run (raw
stacks, one file per run). Extra server flags go after ``--`` (``-- --log-level INFO``).

Usage: ``python bench/overload.py [--modes floor,idle,busy] [--runs 2] [--flood 1000] [--queue 16]
[--rate 0] [--baseline DIR] [--profile DIR] [-- SERVER_ARGS...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.servers import ServerProcess, child_env, peftserve_command  # noqa: E402

DEMO_MODEL = REPO / "models" / "demo" / "base"
DEMO_ADAPTERS = REPO / "models" / "demo" / "adapters"
MODES = {
    "floor": [],
    "busy": ["--max-batch-size", "4"],
    "idle": ["--max-batch-size", "64", "--max-wait-ms", "8000"],
}
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuSampler(threading.Thread):
    """Samples a process's CPU time every 10 ms, to read it back at any instant of the run."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.perf_counter(), _cpu_s(self.pid)))
            self._done.wait(0.01)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def at(self, instant: float) -> float:
        """CPU seconds at the first sample at or after ``instant``."""
        for sampled, cpu in self.samples:
            if sampled >= instant:
                return cpu
        return self.samples[-1][1]


@dataclass
class Flood:
    admitted: int = 0
    rejection_ms: list[float] = field(default_factory=list)
    first_ms: float = 0.0
    last_s: float = 0.0
    started_s: float = 0.0
    client_cpu_s: float = 0.0
    other: dict[str, int] = field(default_factory=dict)


async def flood(address: str, calls: int, rate: float = 0.0, timeout_s: float = 120.0) -> Flood:
    request = pb.GenerateRequest(
        text="the quick brown fox",
        parameters=pb.GenerationParameters(max_new_tokens=40, min_new_tokens=40),
    )
    result = Flood()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await stub.Tokenize(pb.TokenizeRequest(text="warm up"), timeout=30)

        async def one(index: int) -> None:
            if rate > 0:
                # Open loop: call ``index`` leaves at its slot whatever happened to the others.
                await asyncio.sleep(result.started_s + index / rate - time.perf_counter())
            started = time.perf_counter()
            try:
                await stub.Generate(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as error:
                now = time.perf_counter()
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    result.other[error.code().name] = result.other.get(error.code().name, 0) + 1
                    return
                result.rejection_ms.append((now - started) * 1000)
                if not result.first_ms:
                    result.first_ms = (now - result.started_s) * 1000
                result.last_s = max(result.last_s, now)
                return
            result.admitted += 1

        cpu_before = time.process_time()
        result.started_s = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(calls))), 300)
        result.client_cpu_s = time.process_time() - cpu_before
    return result


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    executable = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [
            str(executable),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "1000",
            "--format",
            "raw",
            # Sampling without pausing the server keeps the profiled run's timing honest;
            # --gil keeps only samples of the thread holding the GIL (who the loop waits for).
            "--nonblocking",
            "--threads",
            "--gil",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def serve_floor() -> None:
    """The ``floor`` server: every Generate refused at once, no model, no interceptor."""
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="peftserve.v1"))
    status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="full", details=[info])
    )

    class Refusing(pb_grpc.GenerationServiceServicer):
        async def Generate(self, request: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
            await context.abort_with_status(status)

        async def Tokenize(  # noqa: N802
            self, request: object, context: grpc.aio.ServicerContext
        ) -> pb.TokenizeResponse:
            return pb.TokenizeResponse()

    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 2048)])
    pb_grpc.add_GenerationServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"peftserve ready on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def run_once(
    mode: str,
    calls: int,
    queue: int,
    server_args: list[str],
    profile: Path | None,
    index: int,
    rate: float = 0.0,
    pythonpath: str = "",
) -> str:
    # The bench's own server command; the flags after it win (argparse keeps the last value).
    command = (
        [sys.executable, __file__, "--serve-floor"]
        if mode == "floor"
        else peftserve_command(
            DEMO_MODEL,
            DEMO_ADAPTERS,
            max_batch_size=4,
            extra_args=[
                "--log-level",
                "WARNING",
                "--max-queue-size",
                str(queue),
                *MODES[mode],
                *server_args,
            ],
        )
    )
    log = (
        Path(tempfile.gettempdir())
        / f"overload-{os.getpid()}-{mode}-{index}{'-b' if pythonpath else ''}.log"
    )
    # ``pythonpath``: a directory holding another ``peftserve`` package (a baseline checkout's
    # server), found before the installed one.
    env = child_env(1, {"PYTHONPATH": pythonpath} if pythonpath else None)
    server = ServerProcess(f"peftserve-{mode}", command, env, log)
    address = server.start()
    spy = None
    try:
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = _py_spy(server.pid, profile / f"{mode}-{index}.txt")
            time.sleep(1.0)
        sampler = CpuSampler(server.pid)
        sampler.start()
        result = asyncio.run(flood(address, calls, rate))
        sampler.stop()
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        server.stop()
    rejected = len(result.rejection_ms)
    server_cpu = sampler.at(result.last_s) - sampler.at(result.started_s)
    cuts = statistics.quantiles(result.rejection_ms, n=100, method="inclusive")
    return (
        f"{'baseline ' if pythonpath else ''}{mode:4s} run {index}: "
        f"{result.admitted} admitted, {rejected} rejected"
        f"{' ' + str(result.other) if result.other else ''}; first {result.first_ms:.0f} ms, "
        f"p50 {cuts[49]:.0f} ms, p99 {cuts[98]:.0f} ms, last after "
        f"{(result.last_s - result.started_s) * 1000:.0f} ms; server CPU "
        f"{server_cpu * 1e6 / max(1, rejected):.0f} us/rejection; client CPU "
        f"{result.client_cpu_s * 1e6 / calls:.0f} us/call"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="floor,idle,busy")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--flood", type=int, default=1000)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--rate", type=float, default=0.0, help="calls/s (0: all at once)")
    parser.add_argument(
        "--baseline",
        default="",
        help="a directory with another peftserve package: each run is repeated against it",
    )
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("server_args", nargs="*", help="extra server flags, after --")
    args = parser.parse_args()
    if args.serve_floor:
        asyncio.run(serve_floor())
        return
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for index in range(args.runs):
        for mode in args.modes.split(","):
            for pythonpath in ("", args.baseline) if args.baseline and mode != "floor" else ("",):
                line = run_once(
                    mode,
                    args.flood,
                    args.queue,
                    args.server_args,
                    args.profile,
                    index,
                    args.rate,
                    pythonpath,
                )
                print(line, flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
