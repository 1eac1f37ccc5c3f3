"""Structured output and chat through a real server on 127.0.0.1: results and every error path.

Error paths: a bad schema/regex/grammar (INVALID_ARGUMENT naming the field, with the
compiler's position), a constraint too big (INVALID_ARGUMENT), a compile past the time limit
(RESOURCE_EXHAUSTED, while other requests keep being served), chat to a model without a chat
template (FAILED_PRECONDITION naming "chat") and a dead end (a finish reason, not an error).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import DEMO_MODEL, ServerThread
from .status_details import details_of

PROMPT = "the quick brown fox"
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "animal": {"enum": ["fox", "dog", "cat"]},
            "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        },
        "required": ["animal", "legs"],
        "additionalProperties": False,
    }
)
# A schema big enough that compiling it takes milliseconds, not microseconds.
BIG_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {f"f{i}": {"type": "string", "pattern": "[a-z]{1,8}"} for i in range(300)},
        "required": [f"f{i}" for i in range(300)],
    }
)


def generate(stub: Any, streaming: bool = False, **fields: Any) -> pb.GenerateResponse:
    fields.setdefault("text", PROMPT)
    fields.setdefault("parameters", pb.GenerationParameters(max_new_tokens=40))
    request = pb.GenerateRequest(**fields)
    if not streaming:
        return stub.Generate(request, timeout=60)
    messages = list(stub.StreamGenerate(request, timeout=60))
    summary = messages[-1].summary
    text = "".join(m.delta.text for m in messages[:-1])
    sequences = [pb.Sequence(text=text, finish_reason=summary.sequences[0].finish_reason)]
    sequences[0].incomplete = summary.sequences[0].incomplete
    return pb.GenerateResponse(sequences=sequences)


def failure(stub: Any, streaming: bool = False, **fields: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, streaming, **fields)
    return caught.value


@pytest.mark.parametrize("streaming", [False, True])
def test_json_schema_request_returns_valid_json(stub: Any, streaming: bool) -> None:
    # The demo model only repeats text and never saw JSON; the constraint alone makes its
    # output a schema-valid object.
    response = generate(stub, streaming, constraint=pb.Constraint(json_schema=SCHEMA))
    seq = response.sequences[0]
    assert seq.finish_reason == pb.FINISH_REASON_EOS and not seq.incomplete
    value = json.loads(seq.text)
    assert value["animal"] in ("fox", "dog", "cat") and 0 <= value["legs"] <= 8


def test_choice_regex_and_grammar_requests(stub: Any) -> None:
    choice = generate(
        stub, text="no", constraint=pb.Constraint(choice=pb.ChoiceList(choices=["yes", "no"]))
    )
    assert choice.sequences[0].text == "no"
    regex = generate(stub, text="2024-05-06", constraint=pb.Constraint(regex=r"\d{4}-\d{2}-\d{2}"))
    assert regex.sequences[0].text == "2024-05-06"
    words = 'start: word (" " word)*\nword: /[a-z]+/'
    grammar = generate(stub, text=PROMPT, constraint=pb.Constraint(grammar=words))
    assert grammar.sequences[0].text == PROMPT
    anything = generate(stub, text="{}", constraint=pb.Constraint(json_object=pb.JsonObject()))
    assert json.loads(anything.sequences[0].text) == {}


def test_length_cut_says_incomplete(stub: Any) -> None:
    response = generate(
        stub,
        constraint=pb.Constraint(json_schema=SCHEMA),
        parameters=pb.GenerationParameters(max_new_tokens=4),
    )
    seq = response.sequences[0]
    assert seq.finish_reason == pb.FINISH_REASON_CONSTRAINT_INCOMPLETE
    assert seq.incomplete


@pytest.mark.parametrize("streaming", [False, True])
def test_dead_end_is_a_finish_reason(stub: Any, streaming: bool) -> None:
    response = generate(
        stub,
        streaming,
        constraint=pb.Constraint(json_object=pb.JsonObject()),
        parameters=pb.GenerationParameters(max_new_tokens=8, bad_words=["{"]),
    )
    seq = response.sequences[0]
    assert seq.finish_reason == pb.FINISH_REASON_CONSTRAINT_DEAD_END
    assert seq.incomplete and seq.text == ""


@pytest.mark.parametrize(
    ("constraint", "field", "position"),
    [
        (
            pb.Constraint(json_schema='{"type": "object",'),
            "constraint.json_schema",
            "line 1 column 19",
        ),
        (pb.Constraint(json_schema='{"type": "strin"}'), "constraint.json_schema", "strin"),
        (pb.Constraint(regex="[0-9"), "constraint.regex", "^"),
        (pb.Constraint(grammar="start: a\na: b"), "constraint.grammar", "2("),
        (pb.Constraint(choice=pb.ChoiceList()), "constraint.choice", ""),
        (pb.Constraint(), "constraint", ""),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_constraint_names_field_and_position(
    stub: Any, constraint: pb.Constraint, field: str, position: str, streaming: bool
) -> None:
    error = failure(stub, streaming, constraint=constraint)
    details = details_of(error)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_ARGUMENT"
    assert field in details.field_violations, details
    assert position in details.field_violations[field]


def test_chat_request_uses_the_demo_template(stub: Any) -> None:
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="hello world")])
    response = generate(stub, text=None, chat=chat, adapter="upper")
    assert response.sequences[0].text == "HELLO WORLD"
    assert response.sequences[0].finish_reason == pb.FINISH_REASON_EOS
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.chat_template
    assert info.limits.max_constraint_text_length > 0
    assert info.limits.constraint_compile_timeout_ms > 0


def test_chat_and_constraint_together(stub: Any) -> None:
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="yes")])
    response = generate(
        stub,
        text=None,
        chat=chat,
        constraint=pb.Constraint(choice=pb.ChoiceList(choices=["yes", "no"])),
    )
    assert response.sequences[0].text == "yes"


def test_chat_unknown_role_is_invalid(stub: Any) -> None:
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="system", content="be nice")])
    details = details_of(failure(stub, text=None, chat=chat))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat.messages" in details.field_violations


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The demo model without its chat template, a tiny constraint size limit and a compile
    time limit no real compile meets."""
    model = tmp_path_factory.mktemp("no-template") / "base"
    shutil.copytree(DEMO_MODEL, model)
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    for extra in Path(model).glob("chat_template*"):
        extra.unlink()
    server = ServerThread(
        model_path=model,
        max_constraint_text_length=len(BIG_SCHEMA) + 10,
        constraint_compile_timeout_s=1e-9,
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict_stub(strict_server: ServerThread) -> Iterator[Any]:
    with grpc.insecure_channel(strict_server.address) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def test_chat_without_template_is_failed_precondition(strict_stub: Any) -> None:
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="hi")])
    details = details_of(failure(strict_stub, text=None, chat=chat))
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "CHAT_TEMPLATE_MISSING"
    assert "chat" in details.preconditions
    assert not strict_stub.GetModelInfo(pb.GetModelInfoRequest()).chat_template


def test_constraint_too_big_is_invalid(strict_stub: Any) -> None:
    details = details_of(
        failure(strict_stub, constraint=pb.Constraint(regex="a" * (len(BIG_SCHEMA) + 11)))
    )
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "size limit" in details.field_violations["constraint.regex"]


@pytest.mark.parametrize("streaming", [False, True])
def test_compile_timeout_fails_only_that_request(strict_stub: Any, streaming: bool) -> None:
    schema = BIG_SCHEMA.replace("f0", "g0" if streaming else "h0")  # a fresh, uncached compile
    details = details_of(
        failure(strict_stub, streaming, constraint=pb.Constraint(json_schema=schema))
    )
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "CONSTRAINT_COMPILE_TIMEOUT"
    assert "constraint.json_schema" in details.field_violations
    # The server keeps serving everyone else.
    plain = generate(strict_stub, parameters=pb.GenerationParameters(max_new_tokens=4))
    assert len(plain.sequences[0].text) == 4
