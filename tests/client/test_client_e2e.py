"""The friendly clients and the CLI against a real server with the demo model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
from peftserve.client import AsyncPeftServeClient, PeftServeClient, PeftServeClientError

from ..conftest import ServerThread

PROMPT = "the quick brown fox"


def test_sync_generate_and_stream(demo_server: ServerThread) -> None:
    with PeftServeClient(demo_server.address) as client:
        out = client.generate(PROMPT, adapter="upper", max_new_tokens=32)
        assert out.text == PROMPT.upper()
        assert out.sequences[0].finish_reason == "eos"
        assert out.adapter == "upper" and len(out.adapter_sha256) == 64
        assert "".join(client.stream(PROMPT, adapter="reverse")) == PROMPT[::-1]
        assert {a.name for a in client.list_adapters()} >= {"upper", "reverse", "title"}
        assert client.model_info().context_length > 0
        assert len(client.tokenize("é", add_special_tokens=False).token_ids) == 2


def test_sync_errors_carry_code_and_field(demo_server: ServerThread) -> None:
    with PeftServeClient(demo_server.address) as client:
        with pytest.raises(PeftServeClientError) as not_found:
            client.generate(PROMPT, adapter="missing")
        assert not_found.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(PeftServeClientError) as invalid:
            client.generate(PROMPT, do_sample=True, top_p=2.0)
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid.value.field == "parameters.top_p"


def test_async_twin(demo_server: ServerThread) -> None:
    async def scenario() -> tuple[list[str], str]:
        async with AsyncPeftServeClient(demo_server.address) as client:
            outs = await asyncio.gather(
                *(client.generate(PROMPT, adapter=a) for a in ("upper", "reverse", "title", ""))
            )
            streamed = "".join([d async for d in client.stream(PROMPT, adapter="title")])
            return [o.text for o in outs], streamed

    texts, streamed = asyncio.run(scenario())
    assert texts == [PROMPT.upper(), PROMPT[::-1], PROMPT.title(), PROMPT]
    assert streamed == PROMPT.title()


def run_cli(demo_server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peftserve.client.cli", "--target", demo_server.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_generate_stream_adapters_info(demo_server: ServerThread) -> None:
    generated = run_cli(demo_server, "generate", PROMPT, "--adapter", "upper")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip() == PROMPT.upper()
    streamed = run_cli(demo_server, "generate", PROMPT, "--adapter", "reverse", "--stream")
    assert streamed.stdout.strip() == PROMPT[::-1]
    adapters = run_cli(demo_server, "adapters", "--json")
    assert {a["name"] for a in json.loads(adapters.stdout)} >= {"upper", "reverse", "title"}
    info = run_cli(demo_server, "info")
    assert info.returncode == 0, info.stderr
    assert "context" in info.stdout.lower()


def test_cli_error_exit_code_and_message(demo_server: ServerThread) -> None:
    result = run_cli(demo_server, "generate", PROMPT, "--adapter", "missing")
    assert result.returncode == 2
    assert "NOT_FOUND" in result.stderr
