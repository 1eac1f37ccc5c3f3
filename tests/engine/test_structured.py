"""Structured output in the shared batch: fidelity, validity, and the engine's error paths.

A constrained request must get the same tokens alone and inside a batch of unconstrained and
differently constrained rows (greedy and seeded sampling), and every completed constrained
row's text must satisfy its constraint (hypothesis over generated schemas and regexes).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peftserve.server.engine import Engine
from peftserve.server.engine.errors import ChatTemplateMissingError, InvalidRequestError
from peftserve.server.engine.types import (
    ChatInput,
    ChatMessage,
    Constraint,
    ConstraintKind,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
)

PERSON = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "kind": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "age", "kind"],
        "additionalProperties": False,
    }
)
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
LARK = 'start: "(" item ("," item)* ")"\nitem: /[a-c]{1,3}/'

CONSTRAINTS = {
    "schema": Constraint(ConstraintKind.JSON_SCHEMA, PERSON),
    "object": Constraint(ConstraintKind.JSON_OBJECT),
    "regex": Constraint(ConstraintKind.REGEX, DATE),
    "grammar": Constraint(ConstraintKind.GRAMMAR, LARK),
    "choice": Constraint(ConstraintKind.CHOICE, choices=("yes", "no", "maybe")),
}


def run(aio: asyncio.Runner, engine: Engine, requests: list[GenerationRequest]) -> list[Any]:
    async def go() -> list[GenerationResult]:
        handles = [engine.submit(r) for r in requests]
        return list(await asyncio.gather(*(h.result() for h in handles)))

    return aio.run(go())


def request(
    name: str,
    constraint: Constraint | None,
    *,
    sample: bool = False,
    prompt: str = "the quick brown fox",
    max_new_tokens: int = 24,
    adapter: str = "",
    **params: Any,
) -> GenerationRequest:
    sampling: dict[str, Any] = {"do_sample": True, "seed": 7, "temperature": 0.9} if sample else {}
    return GenerationRequest(
        name,
        text=prompt,
        adapter=adapter,
        constraint=constraint,
        parameters=GenerationParams(max_new_tokens=max_new_tokens, **sampling, **params),
    )


def satisfies(constraint: Constraint, text: str) -> bool:
    if constraint.kind is ConstraintKind.CHOICE:
        return text in constraint.choices
    if constraint.kind is ConstraintKind.REGEX:
        return re.fullmatch(constraint.text, text) is not None
    if constraint.kind is ConstraintKind.GRAMMAR:
        return re.fullmatch(r"\([a-c]{1,3}(,[a-c]{1,3})*\)", text) is not None
    value = json.loads(text)
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return isinstance(value, dict)
    return matches_schema(json.loads(constraint.text), value)


def matches_schema(schema: dict[str, Any], value: Any) -> bool:
    """A validator for the schema subset these tests generate (no jsonschema dependency)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(value, dict) or set(schema.get("required", [])) - set(value):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(matches_schema(props[k], v) for k, v in value.items() if k in props)
    if kind == "array":
        return isinstance(value, list) and all(matches_schema(schema["items"], v) for v in value)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 10**9)
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema.get("minimum", -(10**18)) <= value <= schema.get("maximum", 10**18)
        )
    if kind == "boolean":
        return isinstance(value, bool)
    raise AssertionError(f"schema kind {kind!r} not covered")


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "seeded"])
def test_constrained_rows_get_the_same_tokens_alone_and_in_a_mixed_batch(
    engine: Engine, aio: asyncio.Runner, sample: bool
) -> None:
    mixable = sorted(a.name for a in engine.adapters() if a.mixed_batching)
    constrained = [
        request(f"c-{name}", c, sample=sample, adapter=mixable[i % 2] if i % 3 == 2 else "")
        for i, (name, c) in enumerate(CONSTRAINTS.items())
    ]
    unconstrained = [
        request(f"u-{i}", None, sample=sample, prompt=f"plain row {i}", adapter=a)
        for i, a in enumerate(["", mixable[0], mixable[1]])
    ]
    alone = [run(aio, engine, [r])[0] for r in constrained]
    crowd = run(aio, engine, constrained + unconstrained)
    for solo, batched in zip(alone, crowd[: len(alone)], strict=True):
        assert batched.batch_size > 1, "the constrained rows must have shared a batch"
        assert batched.sequences[0].token_ids == solo.sequences[0].token_ids, solo.request_id
        assert batched.sequences[0].finish_reason == solo.sequences[0].finish_reason
    for req, result in zip(constrained, crowd[: len(alone)], strict=True):
        seq = result.sequences[0]
        assert req.constraint is not None
        if seq.finish_reason is FinishReason.EOS:
            assert not seq.incomplete
            assert satisfies(req.constraint, seq.text), (req.request_id, seq.text)
        else:
            assert seq.finish_reason is FinishReason.CONSTRAINT_INCOMPLETE, seq
            assert seq.incomplete


def test_bounded_constraints_complete_and_match(engine: Engine, aio: asyncio.Runner) -> None:
    """Choice, a date regex and a bounded grammar always finish well within 24 tokens."""
    names = ("regex", "choice")
    results = run(aio, engine, [request(n, CONSTRAINTS[n], max_new_tokens=24) for n in names])
    for name, result in zip(names, results, strict=True):
        seq = result.sequences[0]
        assert seq.finish_reason is FinishReason.EOS, (name, seq)
        assert satisfies(CONSTRAINTS[name], seq.text), (name, seq.text)


def test_a_dead_end_ends_the_row_with_its_own_reason(engine: Engine, aio: asyncio.Runner) -> None:
    # Every JSON object starts with "{", which bad_words forbids: no token is left at step 1.
    dead = request("dead", CONSTRAINTS["object"], bad_words=("{",))
    # The choice is complete after "yes" and only EOS may follow, but min_new_tokens bans EOS.
    late = request(
        "late",
        Constraint(ConstraintKind.CHOICE, choices=("yes",)),
        min_new_tokens=6,
        max_new_tokens=10,
    )
    neighbour = request("neighbour", None, max_new_tokens=6)
    dead_result, late_result, other = run(aio, engine, [dead, late, neighbour])
    assert dead_result.sequences[0].finish_reason is FinishReason.CONSTRAINT_DEAD_END
    assert dead_result.sequences[0].token_ids == ()
    assert dead_result.sequences[0].incomplete
    assert late_result.sequences[0].finish_reason is FinishReason.CONSTRAINT_DEAD_END
    assert late_result.sequences[0].text == "yes"
    assert len(other.sequences[0].token_ids) == 6


def test_length_cut_is_marked_incomplete(engine: Engine, aio: asyncio.Runner) -> None:
    (result,) = run(aio, engine, [request("short", CONSTRAINTS["schema"], max_new_tokens=3)])
    seq = result.sequences[0]
    assert seq.finish_reason is FinishReason.CONSTRAINT_INCOMPLETE
    assert seq.incomplete and len(seq.token_ids) == 3
    assert seq.text.startswith("{")


def test_unconstrained_rows_are_never_marked_incomplete(
    engine: Engine, aio: asyncio.Runner
) -> None:
    (result,) = run(aio, engine, [request("plain", None, max_new_tokens=2)])
    assert result.sequences[0].finish_reason is FinishReason.LENGTH
    assert not result.sequences[0].incomplete


@pytest.mark.parametrize(
    ("constraint", "field", "position"),
    [
        (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": '), "constraint.json_schema", "line 1"),
        (
            Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "strin"}'),
            "constraint.json_schema",
            "strin",
        ),
        (Constraint(ConstraintKind.REGEX, "a(b"), "constraint.regex", "^"),
        (Constraint(ConstraintKind.GRAMMAR, 'start: "a" (\n'), "constraint.grammar", "1(13)"),
        (Constraint(ConstraintKind.GRAMMAR, "start: foo"), "constraint.grammar", "foo"),
        (Constraint(ConstraintKind.CHOICE), "constraint.choice", ""),
        (Constraint(ConstraintKind.CHOICE, choices=("a", "")), "constraint.choice.choices[1]", ""),
        (Constraint(ConstraintKind.REGEX, ""), "constraint.regex", ""),
    ],
)
def test_invalid_constraints_name_the_field_and_position(
    engine: Engine, constraint: Constraint, field: str, position: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.submit(request("bad", constraint))
    (violation,) = caught.value.violations
    assert violation.field == field
    assert position in violation.description


def test_constraints_are_not_available_with_beams(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.submit(request("beams", CONSTRAINTS["regex"], num_beams=2))
    assert caught.value.violations[0].field == "constraint"


def test_chat_renders_with_the_model_template(engine: Engine, aio: asyncio.Runner) -> None:
    chat = GenerationRequest(
        "chat",
        chat=ChatInput((ChatMessage("user", "hello world"),)),
        parameters=GenerationParams(max_new_tokens=16),
    )
    text = GenerationRequest(
        "text", text="hello world", parameters=GenerationParams(max_new_tokens=16)
    )
    chat_result, text_result = run(aio, engine, [chat, text])
    # The demo template renders a user turn as "<s>{content}<sep>", the text prompt's format.
    assert chat_result.sequences[0].token_ids == text_result.sequences[0].token_ids
    assert chat_result.prompt_tokens == text_result.prompt_tokens


def test_chat_validation_names_the_field(engine: Engine) -> None:
    cases = [
        (ChatInput(()), "chat.messages"),
        (ChatInput((ChatMessage("", "x"),)), "chat.messages[0].role"),
        (ChatInput((ChatMessage("system", "x"),)), "chat.messages"),
        (
            ChatInput((ChatMessage("assistant", "x"),), True, continue_final_message=True),
            "chat.add_generation_prompt",
        ),
    ]
    for chat, field in cases:
        with pytest.raises(InvalidRequestError) as caught:
            engine.submit(GenerationRequest("c", chat=chat))
        assert caught.value.violations[0].field == field, chat


def test_chat_without_a_template_is_a_failed_precondition(engine: Engine) -> None:
    renderer = engine._chat  # the engine's renderer, with its template taken away
    saved = renderer.has_template
    renderer.has_template = False
    try:
        with pytest.raises(ChatTemplateMissingError) as caught:
            engine.submit(GenerationRequest("c", chat=ChatInput((ChatMessage("user", "x"),))))
        assert caught.value.field == "chat"
    finally:
        renderer.has_template = saved


# ---- property: every completed constrained row satisfies its constraint ----

_LEAF = st.sampled_from(
    [
        {"type": "string", "maxLength": 6},
        {"type": "integer", "minimum": 0, "maximum": 999},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue"]},
    ]
)
_KEYS = st.text(alphabet="abcdefgh", min_size=1, max_size=5)


def _object(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_KEYS, children, min_size=1, max_size=3).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )


SCHEMAS = _object(
    st.one_of(_LEAF, _LEAF.map(lambda leaf: {"type": "array", "items": leaf, "maxItems": 2}))
)

_ATOM = st.one_of(
    st.sampled_from(["[a-c]", "[0-9]", "x", "(ab|cd)", "[a-z]"]),
    st.text(alphabet="abz09", min_size=1, max_size=3),
)
REGEXES = st.lists(
    st.tuples(_ATOM, st.sampled_from(["", "?", "{1,3}", "{2}"])), min_size=1, max_size=4
).map(lambda parts: "".join(f"(?:{atom}){q}" if q else atom for atom, q in parts))


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schema=SCHEMAS, regex=REGEXES, seed=st.integers(0, 2**16))
def test_completed_rows_satisfy_generated_constraints(
    engine: Engine, aio: asyncio.Runner, schema: dict[str, Any], regex: str, seed: int
) -> None:
    constraints = [
        Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)),
        Constraint(ConstraintKind.REGEX, regex),
    ]
    requests = [
        replace(
            request(f"p-{i}-{s}", c, sample=s, max_new_tokens=64),
            parameters=GenerationParams(
                max_new_tokens=64, **({"do_sample": True, "seed": seed} if s else {})
            ),
        )
        for i, c in enumerate(constraints)
        for s in (False, True)
    ]
    for req, result in zip(requests, run(aio, engine, requests), strict=True):
        seq = result.sequences[0]
        assert req.constraint is not None
        if req.constraint.kind is ConstraintKind.REGEX:
            # These regexes are bounded: they always complete well within 64 tokens.
            assert not seq.incomplete, (regex, seq)
        if seq.incomplete:
            assert seq.finish_reason is FinishReason.CONSTRAINT_INCOMPLETE, seq
            continue
        assert seq.finish_reason in (FinishReason.EOS, FinishReason.LENGTH), seq
        assert satisfies(req.constraint, seq.text), (req.constraint, seq.text)


def test_row_constraint_verbs_for_any_sampler() -> None:
    """The per-row object a sampler plugs in: masks, stops only where complete, dead ends."""
    import torch
    from peftserve.server.demo_tokenizer import EOS_ID, SEP_ID, build_tokenizer, byte_token_id
    from peftserve.server.engine.structured import (
        ConstraintCompiler,
        RowConstraint,
        apply_masks,
        dead_ends,
        stack_masks,
    )

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    compiler = ConstraintCompiler(
        tokenizer,
        vocab,
        max_text_length=1000,
        timeout_s=30.0,
        cache_size=4,
        threads=1,
        max_choices=8,
    )
    try:
        compiled = compiler.compile(Constraint(ConstraintKind.CHOICE, choices=("ab", "b")))
        # SEP stands in for a chat template's end-of-turn token: a stop llguidance does not know.
        row = RowConstraint(compiled, [EOS_ID, SEP_ID])
        other = RowConstraint(compiled, [EOS_ID])
        a, b = byte_token_id(ord("a")), byte_token_id(ord("b"))
        allowed = row.allowed()
        assert set(torch.nonzero(allowed).flatten().tolist()) == {a, b}
        row.accept(a)
        assert not row.is_complete
        assert set(torch.nonzero(row.allowed()).flatten().tolist()) == {b}
        row.accept(b)
        assert row.is_complete and row.is_stopped
        assert set(torch.nonzero(row.allowed()).flatten().tolist()) == {EOS_ID, SEP_ID}
        stacked = stack_masks([row, other])
        assert torch.equal(stacked[0], row.allowed()) and torch.equal(stacked[1], other.allowed())
        logits = torch.zeros(2, vocab)
        logits[0, EOS_ID] = logits[0, SEP_ID] = float("-inf")  # e.g. min_new_tokens
        # The masks leave tokens in both rows; row 0's own rules then removed them.
        assert apply_masks(logits, [row, other]) == [False, False]
        assert dead_ends(logits) == [True, False]
        assert int(torch.argmax(logits[1])) in (a, b)
        # A token the grammar refuses puts the matcher in error: nothing is allowed after it.
        other.accept(byte_token_id(ord("z")))
        assert not other.allowed().any() and not other.is_complete
        assert apply_masks(torch.zeros(1, vocab), [other]) == [True]
    finally:
        compiler.close()


def test_chat_end_of_turn_tokens_come_from_the_template() -> None:
    from peftserve.server.demo_tokenizer import EOS_ID, SEP_ID, build_tokenizer
    from peftserve.server.engine.chat import ChatRenderer

    demo = ChatRenderer(build_tokenizer())
    assert demo.has_template and demo.end_of_turn_ids == (EOS_ID,)
    chatml_like = build_tokenizer()
    # A template whose turns end with <sep> (as ChatML's end with <|im_end|>), then a newline.
    chatml_like.chat_template = (
        "{% for m in messages %}{{ bos_token + m['role'] + ':' + m['content'] + sep_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant:' }}{% endif %}"
    )
    renderer = ChatRenderer(chatml_like)
    assert renderer.end_of_turn_ids == (SEP_ID,)
    ids = renderer.render(ChatInput((ChatMessage("user", "hi"),)))
    assert chatml_like.decode(ids) == "<s>user:hi<sep>\n<s>assistant:"
    none = build_tokenizer()
    none.chat_template = None
    assert not ChatRenderer(none).has_template


def test_chat_requests_stop_at_the_end_of_turn(engine: Engine) -> None:
    chat = engine.prepare(GenerationRequest("c", chat=ChatInput((ChatMessage("user", "hi"),))))
    text = engine.prepare(GenerationRequest("t", text="hi"))
    assert chat.extra_stop_ids == engine._chat.end_of_turn_ids != ()
    assert text.extra_stop_ids == ()


def test_constrained_rows_joining_mid_flight_get_their_solo_tokens(
    engine: Engine, aio: asyncio.Runner
) -> None:
    """Constrained requests that arrive while other rows are decoding (they join the running
    batch at a step boundary with the iteration-level loop) get the tokens they get alone."""
    late = [
        request(f"late-{name}", CONSTRAINTS[name], sample=sample)
        for name in ("schema", "regex", "grammar")
        for sample in (False, True)
    ]
    alone = [run(aio, engine, [r])[0] for r in late]

    async def go() -> list[GenerationResult]:
        long = GenerationRequest(
            "long", text="a long running row", parameters=GenerationParams(max_new_tokens=48)
        )
        handle = engine.submit(long, stream=True)
        events = handle.event_batches()
        await anext(events)  # the long row is decoding now
        handles = [engine.submit(r) for r in late]
        results = list(await asyncio.gather(*(h.result() for h in handles)))
        async for _ in events:
            pass
        await handle.result()
        return results

    for solo, joined in zip(alone, aio.run(go()), strict=True):
        assert joined.sequences[0].token_ids == solo.sequences[0].token_ids, solo.request_id
        assert joined.sequences[0].incomplete == solo.sequences[0].incomplete
