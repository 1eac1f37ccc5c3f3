"""--engine-process: the engine in a child process, what only that mode can show.

Refusals decided in the front (never sent to the engine process), the engine process killed
(in-flight calls end UNAVAILABLE naming its exit code, health NOT_SERVING, the CLI exits
non-zero), SIGTERM draining through it, and no engine process left behind by any way of
stopping. The RPC tests themselves run in this mode too: tests/server/test_process_mode.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread
from .status_details import details_of
from .test_errors import blocking_request, long_request, rpc_error, wait_for_stats
from .test_lifecycle import start_subprocess


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc; zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def serving_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        return int(response.status)


@pytest.fixture(scope="module")
def tight_process_server() -> Iterator[ServerThread]:
    server = ServerThread(engine_process=True, max_batch_size=1, max_queue_size=1, max_wait_ms=0.0)
    server.wait_ready()
    yield server
    server.stop()


def test_the_engine_runs_in_a_child_process(tight_process_server: ServerThread) -> None:
    engine = tight_process_server.server.engine()
    assert engine.pid != os.getpid() and engine.pid in children_of(os.getpid())
    with grpc.insecure_channel(tight_process_server.address) as channel:
        response = pb_grpc.GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(text="hello", adapter="upper"), timeout=60
        )
    assert response.sequences[0].text == "HELLO"


def test_a_full_queue_is_refused_in_the_front(tight_process_server: ServerThread) -> None:
    proxy = tight_process_server.server.engine()
    with grpc.insecure_channel(tight_process_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # The running request must hold the only row through every check below (a plain
        # 480-token row ended inside the twenty calls once the loop got faster), and the checks
        # stop should it end first anyway.
        running = stub.Generate.future(blocking_request(), timeout=120)
        wait_for_stats(tight_process_server, queued=0, running=1)
        queued = stub.Generate.future(long_request(), timeout=120)
        wait_for_stats(tight_process_server, queued=1, running=1)
        sent_before = proxy.sent_requests
        refused = 0
        for _ in range(20):
            if running.done():
                break
            error = rpc_error(stub.Generate, long_request(), timeout=30)
            refused += 1
            details = details_of(error)
            assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details.reason == "QUEUE_FULL"
            assert details.retry_delay_s is not None and details.retry_delay_s > 0
            metadata = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
            assert int(metadata["grpc-retry-pushback-ms"]) > 0
        assert refused >= 5, "the running request ended before the checks could run"
        # Not one of the refused calls reached the engine process.
        assert proxy.sent_requests == sent_before
        assert running.result().sequences[0].finish_reason == pb.FINISH_REASON_LENGTH
        assert queued.result().sequences[0].finish_reason == pb.FINISH_REASON_LENGTH


def test_killed_engine_process_ends_calls_unavailable_and_health_not_serving() -> None:
    server = ServerThread(engine_process=True)
    try:
        server.wait_ready()
        pid = server.server.engine().pid
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            stream = stub.StreamGenerate(long_request(), timeout=60)
            unary = stub.Generate.future(long_request(), timeout=60)
            assert next(stream).WhichOneof("event") == "delta"
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as streamed:
                list(stream)
            with pytest.raises(grpc.RpcError) as waited:
                unary.result()
            for error in (streamed.value, waited.value):
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "engine process exited with code -9" in (error.details() or "")
            later = rpc_error(stub.Generate, pb.GenerateRequest(text="late"), timeout=10)
            assert later.code() == grpc.StatusCode.UNAVAILABLE
            assert "code -9" in (later.details() or "")
        deadline = time.monotonic() + 10
        while serving_status(server.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health stayed SERVING"
            time.sleep(0.05)
        assert server.server.state == "lost"
    finally:
        server.stop(grace_s=1.0)
    assert not alive(pid)


def test_stop_leaves_no_engine_process() -> None:
    server = ServerThread(engine_process=True)
    server.wait_ready()
    pid = server.server.engine().pid
    assert alive(pid)
    server.stop(grace_s=1.0)
    assert not alive(pid)
    assert pid not in children_of(os.getpid())


def test_a_model_that_fails_to_load_fails_the_server(tmp_path: Path) -> None:
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    before = set(children_of(os.getpid()))
    server = ServerThread(engine_process=True, model_path=not_a_model)
    try:
        with pytest.raises(RuntimeError, match="failed to load"):
            server.wait_ready()
        assert server.server.state == "failed"
        assert all(wait_gone(pid, 30) for pid in set(children_of(os.getpid())) - before)
    finally:
        server.stop(grace_s=1.0)


def test_cli_exits_non_zero_when_the_engine_process_dies() -> None:
    process, address = start_subprocess("--engine-process", "true", "--log-level", "WARNING")
    try:
        (engine_pid,) = children_of(process.pid)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            assert stub.Generate(pb.GenerateRequest(text="ok"), timeout=60).sequences[0].text
            os.kill(engine_pid, signal.SIGKILL)
        assert process.wait(timeout=60) == 1
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read() if process.stderr else ""
    assert "engine process exited with code -9" in stderr


def test_sigterm_finishes_in_flight_work_then_nothing_is_left() -> None:
    process, address = start_subprocess("--engine-process", "true", "--shutdown-grace-s", "30")
    try:
        (engine_pid,) = children_of(process.pid)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateRequest(
                text="word",
                parameters=pb.GenerationParameters(max_new_tokens=300, min_new_tokens=300),
            )
            in_flight = [stub.Generate.future(request, timeout=120) for _ in range(2)]
            probe = stub.StreamGenerate(request, timeout=120)
            assert next(probe).WhichOneof("event") == "delta"
            process.send_signal(signal.SIGTERM)
            for future in in_flight:
                assert future.result().usage.completion_tokens == 300
            assert list(probe)[-1].summary.usage.completion_tokens == 300
        assert process.wait(timeout=60) == 0
        assert wait_gone(engine_pid, 10)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_killed_front_leaves_no_engine_process() -> None:
    process, _address = start_subprocess("--engine-process", "true", "--log-level", "WARNING")
    try:
        (engine_pid,) = children_of(process.pid)
        process.kill()
        process.wait(timeout=30)
        # The engine process sees its socket close and exits on its own.
        assert wait_gone(engine_pid, 60)
    finally:
        if process.poll() is None:
            process.kill()
