"""What does Ray Serve's gRPC proxy add to a call? The same calls, direct and through Ray, one run.

Starts a plain peftserve server (its own process) and a local Ray head with one peftserve
replica (``serve_ray/serve_config.yaml``, one fixed replica), both on 127.0.0.1 with the demo
model, then sends the same sequential calls to each, alternating between the two so machine
noise hits both alike:

- ``GetModelInfo``: no model work, so its latency is the transport alone;
- ``Generate`` with ``max_new_tokens=1``: the shortest real generation.

Prints p50/p99 per path and the difference (the proxy's overhead per call). Speed targets are
ratios measured within one run (machines are noisy); the absolute numbers only describe this
machine at the time of the run.

Usage: ``python -m bench.ray_overhead [--calls 200]``
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _start_plain_server(port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "peftserve.server", "--address", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_serving(stub: Any, timeout_s: float = 120.0) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            return
        except grpc.RpcError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def measure(calls: int) -> dict[str, dict[str, float]]:
    from peftserve.ray import local

    plain_port = _free_port()
    plain = _start_plain_server(plain_port)
    local.start_head(num_cpus=2)
    try:
        config = local.with_overrides(
            local.load_config(),
            grpc_port=_free_port(),
            http_port=_free_port(),
            deployment={"num_replicas": 1},
        )
        ray_address = local.deploy(config)
        stubs = {
            "direct": pb_grpc.GenerationServiceStub(
                grpc.insecure_channel(f"127.0.0.1:{plain_port}")
            ),
            "ray": pb_grpc.GenerationServiceStub(grpc.insecure_channel(ray_address)),
        }
        for stub in stubs.values():
            _wait_serving(stub)
        generate = pb.GenerateRequest(
            text="hello", parameters=pb.GenerationParameters(max_new_tokens=1)
        )
        rpcs: dict[str, Callable[[Any], Any]] = {
            "GetModelInfo": lambda s: s.GetModelInfo(pb.GetModelInfoRequest(), timeout=30),
            "Generate(1 token)": lambda s: s.Generate(generate, timeout=30),
        }
        results: dict[str, dict[str, float]] = {}
        for rpc, call in rpcs.items():
            samples: dict[str, list[float]] = {path: [] for path in stubs}
            for stub in stubs.values():  # warm-up: connections, first batch, caches
                for _ in range(10):
                    call(stub)
            for _ in range(calls):
                for path, stub in stubs.items():
                    started = time.perf_counter()
                    call(stub)
                    samples[path].append((time.perf_counter() - started) * 1000)
            for path, values in samples.items():
                results[f"{rpc} {path}"] = {
                    "p50_ms": _percentile(values, 0.50),
                    "p99_ms": _percentile(values, 0.99),
                    "mean_ms": statistics.fmean(values),
                }
        return results
    finally:
        local.stop()
        plain.terminate()
        plain.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per RPC and path")
    args = parser.parse_args()
    results = measure(args.calls)
    print(f"{'call':<28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, row in results.items():
        print(f"{name:<28}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}{row['mean_ms']:>10.2f}")
    for rpc in ("GetModelInfo", "Generate(1 token)"):
        direct, ray = results[f"{rpc} direct"], results[f"{rpc} ray"]
        print(
            f"{rpc}: the proxy adds {ray['p50_ms'] - direct['p50_ms']:.2f} ms at p50, "
            f"{ray['p99_ms'] - direct['p99_ms']:.2f} ms at p99 "
            f"({ray['p50_ms'] / direct['p50_ms']:.1f}x the direct p50)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
