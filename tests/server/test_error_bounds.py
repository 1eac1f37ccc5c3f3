"""Errors stay small whatever the caller sent, and failing loads cannot grow the adapter list."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import DEMO_ADAPTERS, ServerThread
from .status_details import details_of

# Well below grpc's default (16 KiB hard, 8 KiB soft): past its limit a client sees
# RESOURCE_EXHAUSTED "received metadata size exceeds ..." instead of the real status.
METADATA_LIMIT = 4 * 1024
# 12 names of 127 characters put the old NOT_FOUND (its message listed every name, and twice
# more in its details) past 4 KiB, as 80 of ~100 put it past 16 KiB; loading 80 takes minutes
# on 2 shared cores.
MANY_ADAPTERS = 12


@pytest.fixture(scope="module")
def crowded() -> Iterator[ServerThread]:
    """A server with many adapters of 120-character names (copies of ``upper``)."""
    server = ServerThread()
    server.wait_ready()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for i in range(MANY_ADAPTERS):
            name = f"team-{i:03d}-" + "x" * 118
            stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path="upper"), timeout=60)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(crowded: ServerThread) -> Iterator[Any]:
    options = [
        ("grpc.max_metadata_size", METADATA_LIMIT),
        ("grpc.absolute_max_metadata_size", METADATA_LIMIT),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]
    with grpc.insecure_channel(crowded.address, options=options) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _refused(call: Any) -> Any:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return details_of(caught.value)


def test_unknown_adapter_among_many_is_not_found(stub: Any) -> None:
    details = _refused(
        lambda: stub.Generate(pb.GenerateRequest(text="hi", adapter="nope" * 32), timeout=30)
    )
    assert details.code == grpc.StatusCode.NOT_FOUND, details
    assert "ListAdapters" in details.message
    details = _refused(
        lambda: stub.UnloadAdapter(pb.UnloadAdapterRequest(name="n" * 100_000), timeout=30)
    )
    assert details.code == grpc.StatusCode.NOT_FOUND, details


def test_many_violations_stay_within_the_client_limit(stub: Any) -> None:
    params = pb.GenerationParameters(
        stop_sequences=["s" * 300] * 5000, bad_words=["w" * 300] * 2000, top_p=7
    )
    details = _refused(
        lambda: stub.Generate(pb.GenerateRequest(text="hi", parameters=params), timeout=30)
    )
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert len(details.field_violations) <= 8


@pytest.mark.parametrize("text", ["i" * 200_000, "\u00e9" * 100_000, "\U0001f600" * 50_000])
def test_echoed_values_are_clipped(stub: Any, text: str) -> None:
    details = _refused(
        lambda: stub.Generate(
            pb.GenerateRequest(
                text="hi", request_id=text, parameters=pb.GenerationParameters(top_p=7)
            ),
            timeout=30,
        )
    )
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    details = _refused(
        lambda: stub.LoadAdapter(pb.LoadAdapterRequest(name="ok", path=text), timeout=30)
    )
    assert details.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), details


def test_missing_paths_leave_nothing_behind(crowded: ServerThread, stub: Any) -> None:
    before = len(stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters)
    for i in range(200):
        details = _refused(
            lambda i=i: stub.LoadAdapter(
                pb.LoadAdapterRequest(name=f"ghost-{i}", path=f"missing-{i}"), timeout=30
            )
        )
        assert details.code == grpc.StatusCode.NOT_FOUND, details
        assert list(details.field_violations) == ["path"]
    after = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters
    assert len(after) == before
    assert not [a for a in after if a.name.startswith("ghost-")]


def test_failed_entries_are_bounded(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(DEMO_ADAPTERS / "upper", root / "upper")
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    server = ServerThread(adapters_dir=root)
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for i in range(60):
                details = _refused(
                    lambda i=i: stub.LoadAdapter(
                        pb.LoadAdapterRequest(name=f"b{i}", path="broken"), timeout=30
                    )
                )
                assert details.code == grpc.StatusCode.FAILED_PRECONDITION, details
            adapters = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters
        # "broken" itself failed at startup; the LoadAdapter failures are the b<N> ones.
        failed = [
            a.name for a in adapters if a.state == pb.ADAPTER_STATE_FAILED and a.name != "broken"
        ]
        assert 1 <= len(failed) <= 32
        assert "b59" in failed, "the newest failures are the ones kept"
    finally:
        server.stop()
