"""Health, reflection, the entrypoint and graceful shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import DEMO_ADAPTERS, DEMO_MODEL, ServerThread

SERVICE = "peftserve.v1.GenerationService"


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_goes_serving_then_not_serving_on_drain() -> None:
    server = ServerThread()
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=60
        )
        seen = [next(watch).status]
        server.wait_ready()
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        server.stop(grace_s=1.0)
        for message in watch:
            seen.append(message.status)
            if message.status == health_pb2.HealthCheckResponse.NOT_SERVING and len(seen) > 1:
                break
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    # Loading (NOT_SERVING, unless loading beat the watch) -> SERVING -> NOT_SERVING.
    assert serving in seen and seen[-1] == not_serving
    assert seen.index(serving) < len(seen) - 1


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for s in next(responses).list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


def test_help_lists_every_setting_with_its_env_var() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peftserve.server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for flag in (
        "--address",
        "--model-path",
        "--adapters-dir",
        "--device",
        "--dtype",
        "--max-batch-size",
        "--max-batch-tokens",
        "--max-wait-ms",
        "--max-queue-size",
        "--max-receive-message-bytes",
        "--log-level",
        "--log-format",
    ):
        assert flag in result.stdout
    assert "PEFTSERVE_MAX_BATCH_SIZE" in result.stdout


def test_bad_flag_value_is_a_clear_startup_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peftserve.server", "--model-path", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--model-path /nonexistent is not a directory" in result.stderr


def test_environment_variables_configure_the_server() -> None:
    from peftserve.server.config import config_from_args

    config = config_from_args(
        [], env={"PEFTSERVE_MAX_BATCH_SIZE": "3", "PEFTSERVE_ADDRESS": "127.0.0.1:0"}
    )
    assert config.engine.max_batch_size == 3
    assert config.address == "127.0.0.1:0"
    flag_wins = config_from_args(["--max-batch-size", "5"], env={"PEFTSERVE_MAX_BATCH_SIZE": "3"})
    assert flag_wins.engine.max_batch_size == 5


def start_subprocess(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peftserve.server",
            "--address",
            "127.0.0.1:0",
            "--model-path",
            str(DEMO_MODEL),
            "--adapters-dir",
            str(DEMO_ADAPTERS),
            "--log-format",
            "json",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r'ready on ([^\s"]+)', line)
    if match is None:
        process.kill()
        raise AssertionError(
            f"server did not start: {line!r} {process.stderr.read() if process.stderr else ''}"
        )
    return process, match.group(1)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones() -> None:
    process, address = start_subprocess("--shutdown-grace-s", "30")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            in_flight = [
                stub.Generate.future(
                    pb.GenerateRequest(
                        text=f"word {i}",
                        parameters=pb.GenerationParameters(max_new_tokens=450, min_new_tokens=450),
                    ),
                    timeout=60,
                )
                for i in range(3)
            ]
            probe = stub.StreamGenerate(
                pb.GenerateRequest(
                    text="probe",
                    parameters=pb.GenerationParameters(max_new_tokens=450, min_new_tokens=450),
                ),
                timeout=60,
            )
            # Wait until all three are being served, then ask the server to stop.
            assert next(probe).WhichOneof("event") == "delta"
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(pb.GenerateRequest(text="late"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            for future in in_flight:
                response = future.result()
                assert response.usage.completion_tokens == 450
            probe_rest = list(probe)
            assert probe_rest[-1].summary.usage.completion_tokens == 450
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read() if process.stderr else ""
    request_lines = [line for line in stderr.splitlines() if '"message": "request"' in line]
    assert len(request_lines) >= 4  # three completed + one refused, one structured line each


def test_request_log_line_has_the_fields(capfd: Any) -> None:
    process, address = start_subprocess()
    try:
        with grpc.insecure_channel(address) as channel:
            pb_grpc.GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(text="hello", adapter="upper", request_id="log-me"), timeout=30
            )
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    import json

    stderr = process.stderr.read() if process.stderr else ""
    entries = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    entry = next(e for e in entries if e.get("request_id") == "log-me")
    assert entry["adapter"] == "upper"
    assert entry["status"] == "OK"
    assert entry["prompt_tokens"] == 7
    assert entry["completion_tokens"] > 0
    for key in ("queue_wait_ms", "inference_ms", "rpc"):
        assert key in entry
