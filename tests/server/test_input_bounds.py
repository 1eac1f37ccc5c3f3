"""Hostile but legitimate inputs: huge prompts are refused cheaply, never tokenized on the loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread
from .status_details import details_of

FOUR_MIB = 4 * 1024 * 1024 - 1024  # just under the default receive limit


class SpyTokenizer:
    """Wraps the engine's tokenizer: records every text encoded, can hold one encode."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.lengths: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.lengths.append(len(text))
        if text.startswith("HOLD"):
            self.entered.set()
            self.release.wait(30)
        return self._real(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture(scope="module")
def spied() -> Iterator[tuple[ServerThread, SpyTokenizer]]:
    # In-process: the spy replaces the engine's tokenizer object.
    server = ServerThread(engine_process=False)
    server.wait_ready()
    engine = server.server.engine()
    spy = SpyTokenizer(engine._tokenizer)
    engine._tokenizer = spy
    try:
        yield server, spy
    finally:
        spy.release.set()
        server.stop()


@pytest.fixture(scope="module")
def stub(spied: tuple[ServerThread, SpyTokenizer]) -> Iterator[Any]:
    options = [("grpc.max_send_message_length", 8 * 1024 * 1024)]
    with grpc.insecure_channel(spied[0].address, options=options) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


@pytest.mark.parametrize("rpc", ["Generate", "Tokenize"])
def test_huge_text_is_refused_before_tokenizing(
    spied: tuple[ServerThread, SpyTokenizer], stub: Any, rpc: str
) -> None:
    spy = spied[1]
    spy.lengths.clear()
    text = "a" * FOUR_MIB
    with pytest.raises(grpc.RpcError) as caught:
        if rpc == "Generate":
            stub.Generate(pb.GenerateRequest(text=text), timeout=30)
        else:
            stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30)
    details = details_of(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details.field_violations) == ["text"]
    assert "bytes" in details.message
    assert not [n for n in spy.lengths if n >= FOUR_MIB], "the huge text was tokenized"


def test_huge_token_id_list_is_refused_by_its_length(stub: Any) -> None:
    ids = pb.TokenIds(ids=[5] * 100_000)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(token_ids=ids), timeout=30)
    details = details_of(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details.field_violations) == ["token_ids"]


@pytest.mark.parametrize("rpc", ["Generate", "StreamGenerate", "Tokenize"])
def test_tokenizing_never_blocks_the_event_loop(
    spied: tuple[ServerThread, SpyTokenizer], stub: Any, rpc: str
) -> None:
    """While one request's tokenizing is held, health and GetModelInfo still answer."""
    server, spy = spied
    spy.entered.clear()
    spy.release.clear()
    text = "HOLD on"
    try:
        if rpc == "Tokenize":
            call = stub.Tokenize.future(pb.TokenizeRequest(text=text), timeout=60)
        elif rpc == "Generate":
            call = stub.Generate.future(pb.GenerateRequest(text=text), timeout=60)
        else:
            stream = stub.StreamGenerate(pb.GenerateRequest(text=text), timeout=60)
            call = threading.Thread(target=lambda: list(stream))
            call.start()
        assert spy.entered.wait(30), "the request never reached the tokenizer"
        with grpc.insecure_channel(server.address) as other:
            health = health_pb2_grpc.HealthStub(other).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            pb_grpc.GenerationServiceStub(other).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    finally:
        spy.release.set()
    if isinstance(call, threading.Thread):
        call.join(60)
    else:
        assert call.result()
