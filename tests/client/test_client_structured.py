"""Client helpers for constraints and chat: request building and both twins against a server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
from peftserve.client import (
    AsyncPeftServeClient,
    ChatMessage,
    PeftServeClient,
    PeftServeClientError,
    build_generate_request,
)

from ..conftest import ServerThread

SCHEMA = {
    "type": "object",
    "properties": {"animal": {"enum": ["fox", "dog"]}, "legs": {"type": "integer", "maximum": 8}},
    "required": ["animal", "legs"],
    "additionalProperties": False,
}


def test_constraint_keywords_fill_the_oneof() -> None:
    assert build_generate_request("x", json_schema=SCHEMA).constraint.json_schema == json.dumps(
        SCHEMA
    )
    assert build_generate_request("x", json_schema="{}").constraint.json_schema == "{}"
    assert build_generate_request("x", json_object=True).constraint.HasField("json_object")
    assert build_generate_request("x", regex="a+").constraint.regex == "a+"
    assert build_generate_request("x", grammar='start: "a"').constraint.grammar == 'start: "a"'
    assert list(build_generate_request("x", choice=["a", "b"]).constraint.choice.choices) == [
        "a",
        "b",
    ]
    assert not build_generate_request("x").HasField("constraint")
    # An empty choice list is still a choice (the server names the field), not "no constraint".
    assert build_generate_request("x", choice=[]).constraint.WhichOneof("kind") == "choice"


def test_constraint_misuse_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="at most one constraint"):
        build_generate_request("x", regex="a", choice=["a"])
    with pytest.raises(TypeError, match="list of strings"):
        build_generate_request("x", choice="yes")  # type: ignore[arg-type]


def test_messages_replace_the_prompt() -> None:
    request = build_generate_request(
        messages=[ChatMessage("user", "hi"), {"role": "assistant", "content": "H"}],
        continue_final_message=True,
        add_generation_prompt=False,
    )
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [
        ("user", "hi"),
        ("assistant", "H"),
    ]
    assert request.chat.HasField("add_generation_prompt")
    assert request.chat.continue_final_message
    unset = build_generate_request(messages=[{"role": "user", "content": "hi"}])
    assert not unset.chat.HasField("add_generation_prompt")
    with pytest.raises(TypeError):
        build_generate_request("text", messages=[ChatMessage("user", "hi")])
    with pytest.raises(TypeError):
        build_generate_request()
    with pytest.raises(TypeError):
        build_generate_request("text", continue_final_message=True)


def test_sync_client_constraints_and_chat(demo_server: ServerThread) -> None:
    with PeftServeClient(demo_server.address) as client:
        out = client.generate("the quick brown fox", json_schema=SCHEMA, max_new_tokens=40)
        value = json.loads(out.text)
        assert value["animal"] in ("fox", "dog") and not out.sequences[0].incomplete
        assert client.generate("no", choice=["yes", "no"]).text == "no"
        chat = client.generate(messages=[ChatMessage("user", "hello")], adapter="upper")
        assert chat.text == "HELLO"
        assert "".join(client.stream(messages=[{"role": "user", "content": "hi"}])) == "hi"
        cut = client.generate("the quick brown fox", json_schema=SCHEMA, max_new_tokens=2)
        assert cut.sequences[0].finish_reason == "constraint_incomplete"
        assert cut.sequences[0].incomplete
        info = client.model_info()
        assert info.chat_template and info.limits.max_constraint_text_length > 0
        with pytest.raises(PeftServeClientError) as caught:
            client.generate("x", regex="a(")
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.field == "constraint.regex"


def test_async_client_constraints_and_chat(demo_server: ServerThread) -> None:
    async def scenario() -> tuple[str, str, list[bool]]:
        async with AsyncPeftServeClient(demo_server.address) as client:
            choice = await client.generate("yes", choice=["yes", "no"])
            chat = await client.generate(
                messages=[ChatMessage("user", "hello world")], adapter="title"
            )
            events = [
                e async for e in client.stream_events("x y", regex="[a-z ]+", max_new_tokens=3)
            ]
            flags = [
                s.incomplete for e in events if hasattr(e, "output") for s in e.output.sequences
            ]
            return choice.text, chat.text, flags

    choice, chat, flags = asyncio.run(scenario())
    assert (choice, chat) == ("yes", "Hello World")
    assert flags == [False]


def test_cli_constraint_and_message_flags(demo_server: ServerThread) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "peftserve.client.cli", "--target", demo_server.address, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    schema = cli("generate", "the quick brown fox", "--json-schema", json.dumps(SCHEMA))
    assert schema.returncode == 0, schema.stderr
    assert json.loads(schema.stdout)["animal"] in ("fox", "dog")
    choice = cli("generate", "no", "--choice", "yes", "--choice", "no")
    assert choice.stdout.strip() == "no"
    chat = cli("generate", "--message", "user:hello", "--adapter", "upper")
    assert chat.stdout.strip() == "HELLO", chat.stderr
    both = cli("generate", "hi", "--message", "user:hi")
    assert both.returncode == 2 and "exactly one" in both.stderr
    bad = cli("generate", "hi", "--regex", "a(")
    assert bad.returncode == 2 and "constraint.regex" in bad.stderr
