"""The family matrix: every family serves base, LoRA and a non-LoRA adapter exactly as solo runs.

For each tiny random family model (see ``models.py``), served for real:

* base, two LoRA adapters and one non-LoRA adapter (LoHa, or IA3 where LoHa cannot apply)
  return the tokens of a solo ``PeftModel.generate``, each alone and all concurrently (mixed
  batches), and also when they join while another request is already generating;
* modules_to_save, prompt-tuning and prefix-tuning adapters are either refused at load
  (FAILED, with the reason) or equal to solo, alone, concurrently and at equal or different
  prompt lengths;
* the returned text is ``tokenizer.decode`` of the returned ids (with the request's
  special-token option), also for byte sequences that are not valid UTF-8, and a stream's
  deltas concatenate to the unary text;
* the context length comes from the config under whatever name it uses, and is enforced.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from peftserve.v1 import generation_pb2 as pb

from .conftest import Served
from .models import LONGROPE_SWITCH

MAX_NEW = 6
PROMPTS = (
    "the quick brown fox",
    "Grüße aus Köln 🙂",
    "A serving system batches requests from many clients and adapters; every request",
)
# Every family's context length as its config states it (BLOOM states none: ALiBi).
CONTEXT = {"bloom": 2**32 - 1, "mpt": 128, "falcon-alibi": 2048}
MAY_REFUSE = ("saved", "prompt", "prefix")


def _request(adapter: str, text: str, max_new: int = MAX_NEW, special: bool = False) -> Any:
    return pb.GenerateRequest(
        text=text,
        adapter=adapter,
        parameters=pb.GenerationParameters(max_new_tokens=max_new, min_new_tokens=max_new),
        options=pb.ResponseOptions(return_token_ids=True, include_special_tokens=special),
    )


def _ids(response: Any) -> list[int]:
    return list(response.sequences[0].token_ids)


def _check(served: Served, adapter: str, text: str, response: Any, max_new: int = MAX_NEW) -> None:
    expected = served.reference(adapter, served.encode(text), max_new)
    where = f"{served.family.name}/{adapter or 'base'}/{text[:12]!r}"
    assert _ids(response) == expected, where
    decoded = served.tokenizer.decode(_ids(response), skip_special_tokens=True)
    assert response.sequences[0].text == decoded, f"{where}: text is not decode(ids)"


def _together(served: Served, cases: list[tuple[str, str]], max_new: int = MAX_NEW) -> list[Any]:
    futures = [served.stub.Generate.future(_request(a, t, max_new), timeout=120) for a, t in cases]
    return [f.result() for f in futures]


def _ready(served: Served) -> dict[str, Any]:
    adapters = served.stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    return {a.name: a for a in adapters}


def test_context_length_is_read_from_the_config_and_enforced(served: Served) -> None:
    info = served.stub.GetModelInfo(pb.GetModelInfoRequest())
    expected = CONTEXT.get(served.family.name, 256)
    assert info.context_length == expected
    if expected < 2**32 - 1:
        too_long = _request("", "x", max_new=expected)
        with pytest.raises(grpc.RpcError) as caught:
            served.stub.Generate(too_long, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_base_lora_and_other_adapter_equal_solo_alone_and_mixed(served: Served) -> None:
    adapters = _ready(served)
    for name in ("lora", "lora_b", "other"):
        assert adapters[name].state == pb.ADAPTER_STATE_READY, adapters[name].error
    cases = [(a, t) for a in ("", "lora", "lora_b", "other") for t in PROMPTS]
    for name in ("lora", "lora_b", "other"):
        # An adapter that changes no token could not reveal a routing error.
        assert any(
            served.reference(name, served.encode(t), MAX_NEW)
            != served.reference("", served.encode(t), MAX_NEW)
            for t in PROMPTS
        ), f"{name} changes no token on {served.family.name}"
    for adapter, text in cases:  # alone
        _check(served, adapter, text, served.stub.Generate(_request(adapter, text), timeout=60))
    for (adapter, text), response in zip(cases, _together(served, cases), strict=True):
        _check(served, adapter, text, response)


def test_requests_joining_a_running_request_equal_solo(served: Served) -> None:
    """Rows that arrive while another row is mid-generation (a new step-level loop admits
    them into the running batch; the static batcher runs them next)."""
    long_request = _request("lora", PROMPTS[2], max_new=24)
    stream = served.stub.StreamGenerate(long_request, timeout=120)
    first = next(stream)  # the long row is generating now
    joiners = [
        ("", PROMPTS[0]),
        ("lora_b", PROMPTS[1]),
        ("lora", PROMPTS[0]),
        ("other", PROMPTS[1]),
    ]
    responses = _together(served, joiners)
    rest = list(stream)
    ids = list(first.delta.token_ids) + [
        i for m in rest if m.HasField("delta") for i in m.delta.token_ids
    ]
    assert ids == served.reference("lora", served.encode(PROMPTS[2]), 24)
    for (adapter, text), response in zip(joiners, responses, strict=True):
        _check(served, adapter, text, response)


@pytest.mark.parametrize("name", MAY_REFUSE)
def test_saved_modules_and_prompt_learning_equal_solo_or_are_refused(
    served: Served, name: str
) -> None:
    if name not in served.adapters:
        pytest.skip(f"peft cannot build a {name} adapter for {served.family.name}")
    adapter = _ready(served)[name]
    if adapter.state == pb.ADAPTER_STATE_FAILED:
        assert adapter.error, "a refusal names why"
        with pytest.raises(grpc.RpcError) as caught:
            served.stub.Generate(_request(name, PROMPTS[0]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        return
    assert adapter.state == pb.ADAPTER_STATE_READY
    # Alone, then concurrently with the mixable adapters and with itself at equal and
    # different prompt lengths.
    for text in PROMPTS[:2]:
        _check(served, name, text, served.stub.Generate(_request(name, text), timeout=60))
    cases = [(name, PROMPTS[0]), (name, PROMPTS[0]), (name, PROMPTS[1]), ("lora", PROMPTS[0])]
    cases += [("", PROMPTS[1]), (name, PROMPTS[2])]
    for (a, text), response in zip(cases, _together(served, cases), strict=True):
        _check(served, a, text, response)


def test_streams_equal_unary_and_decode(served: Served) -> None:
    for adapter in ("", "lora"):
        for index, text in enumerate(PROMPTS):
            special = index % 2 == 1
            request = _request(adapter, text, max_new=12, special=special)
            unary = served.stub.Generate(request, timeout=60)
            deltas = [m.delta for m in served.stub.StreamGenerate(request, timeout=60)]
            streamed = "".join(d.text for d in deltas)
            ids = [i for d in deltas for i in d.token_ids]
            assert ids == _ids(unary)
            assert streamed == unary.sequences[0].text
            decoded = served.tokenizer.decode(ids, skip_special_tokens=not special)
            assert unary.sequences[0].text == decoded, (served.family.name, text, special)


def test_longrope_rows_on_both_sides_of_the_switch_equal_solo(served: Served) -> None:
    if served.family.name != "phi3-longrope":
        pytest.skip("only the LongRoPE family has a RoPE switch")
    short = "the fox"
    long = "the quick brown fox jumps over the lazy dog and the cat sat on the mat again and again"
    crossing = "the quick brown fox jumps over the lazy dog and the cat sat on"
    assert len(served.encode(short)) + 8 - 1 <= LONGROPE_SWITCH
    assert len(served.encode(long)) > LONGROPE_SWITCH
    assert len(served.encode(crossing)) <= LONGROPE_SWITCH < len(served.encode(crossing)) + 7
    cases = [(a, t) for t in (short, long, crossing, short) for a in ("", "lora")]
    for (adapter, text), response in zip(cases, _together(served, cases, 8), strict=True):
        _check(served, adapter, text, response, 8)
