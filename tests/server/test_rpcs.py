"""Every RPC of the contract, end to end against a real server with the demo model."""

from __future__ import annotations

from typing import Any

import pytest
from peftserve.v1 import generation_pb2 as pb

PROMPT = "the quick brown fox"


def generate(stub: Any, **fields: Any) -> pb.GenerateResponse:
    return stub.Generate(pb.GenerateRequest(**fields), timeout=60)


def test_base_model_repeats_the_prompt(stub: Any) -> None:
    response = generate(stub, text=PROMPT)
    assert response.sequences[0].text == PROMPT
    assert response.sequences[0].finish_reason == pb.FINISH_REASON_EOS
    assert response.provenance.adapter == ""
    assert response.provenance.adapter_sha256 == ""


def test_upper_adapter_visibly_changes_the_output(stub: Any) -> None:
    response = generate(stub, text=PROMPT, adapter="upper")
    assert response.sequences[0].text == PROMPT.upper()
    assert response.provenance.adapter == "upper"
    assert len(response.provenance.adapter_sha256) == 64


def test_request_id_is_echoed_or_made_up(stub: Any) -> None:
    assert generate(stub, text=PROMPT, request_id="abc-123").request_id == "abc-123"
    made_up = generate(stub, text=PROMPT).request_id
    assert made_up and made_up != "abc-123"


def test_usage_timing_and_effective_parameters(stub: Any) -> None:
    response = generate(
        stub,
        text=PROMPT,
        parameters=pb.GenerationParameters(max_new_tokens=5, do_sample=True, seed=7, top_k=3),
        options=pb.ResponseOptions(return_token_ids=True),
    )
    sequence = response.sequences[0]
    assert sequence.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(sequence.token_ids) == 5
    assert response.usage.completion_tokens == 5
    assert response.usage.prompt_tokens == len(PROMPT) + 2  # bytes + <s> + <sep>
    effective = response.provenance.effective_parameters
    assert effective.max_new_tokens == 5 and effective.do_sample and effective.top_k == 3
    assert response.provenance.seed == 7
    assert response.provenance.model_id
    assert response.timing.inference_ms > 0
    assert response.timing.queue_wait_ms >= 0


def test_seeded_sampling_is_reproducible_and_unseeded_reports_its_seed(stub: Any) -> None:
    params = pb.GenerationParameters(max_new_tokens=12, do_sample=True, temperature=1.5, seed=42)
    first = generate(stub, text=PROMPT, parameters=params)
    second = generate(stub, text=PROMPT, parameters=params)
    assert first.sequences[0].text == second.sequences[0].text
    unseeded = generate(
        stub,
        text=PROMPT,
        parameters=pb.GenerationParameters(max_new_tokens=12, do_sample=True, temperature=1.5),
    )
    replay = generate(
        stub,
        text=PROMPT,
        parameters=pb.GenerationParameters(
            max_new_tokens=12, do_sample=True, temperature=1.5, seed=unseeded.provenance.seed
        ),
    )
    assert replay.sequences[0].text == unseeded.sequences[0].text


def test_token_ids_input_matches_text_input(stub: Any) -> None:
    ids = stub.Tokenize(pb.TokenizeRequest(text=PROMPT, add_special_tokens=True)).token_ids
    by_ids = generate(stub, token_ids=pb.TokenIds(ids=ids), adapter="upper")
    assert by_ids.sequences[0].text == PROMPT.upper()


def test_beam_search_returns_scored_sequences(stub: Any) -> None:
    response = generate(
        stub,
        text=PROMPT,
        adapter="reverse",
        parameters=pb.GenerationParameters(num_beams=3, num_return_sequences=2, max_new_tokens=30),
    )
    assert [s.index for s in response.sequences] == [0, 1]
    assert response.sequences[0].text == PROMPT[::-1]
    assert all(s.HasField("beam_score") for s in response.sequences)
    assert response.sequences[0].beam_score >= response.sequences[1].beam_score


def test_stop_sequence_ends_the_text_before_it(stub: Any) -> None:
    response = generate(
        stub, text=PROMPT, parameters=pb.GenerationParameters(stop_sequences=["brown"])
    )
    assert response.sequences[0].text == "the quick "
    assert response.sequences[0].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


def test_bad_words_are_never_generated(stub: Any) -> None:
    response = generate(stub, text=PROMPT, parameters=pb.GenerationParameters(bad_words=["quick"]))
    assert "quick" not in response.sequences[0].text


def test_logprobs_with_alternatives(stub: Any) -> None:
    response = generate(
        stub,
        text=PROMPT,
        parameters=pb.GenerationParameters(max_new_tokens=4),
        options=pb.ResponseOptions(return_logprobs=True, top_logprobs=3, return_token_ids=True),
    )
    sequence = response.sequences[0]
    assert len(sequence.logprobs) == 4
    for token_id, item in zip(sequence.token_ids, sequence.logprobs, strict=True):
        assert item.token_id == token_id
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6


@pytest.mark.parametrize(
    ("text", "parameters"),
    [
        ("the quick brown fox", pb.GenerationParameters(max_new_tokens=40)),
        # Hot seeded sampling emits arbitrary bytes: multi-byte characters, split and invalid
        # UTF-8 sequences all cross token boundaries and must come out identical.
        (
            "café 日本 🙂 fox",
            pb.GenerationParameters(
                max_new_tokens=60, min_new_tokens=60, do_sample=True, temperature=100.0, seed=11
            ),
        ),
    ],
)
def test_stream_deltas_concatenate_to_the_unary_text(
    stub: Any, text: str, parameters: pb.GenerationParameters
) -> None:
    unary = generate(stub, text=text, parameters=parameters)
    messages = list(
        stub.StreamGenerate(pb.GenerateRequest(text=text, parameters=parameters), timeout=60)
    )
    deltas = [m.delta for m in messages if m.WhichOneof("event") == "delta"]
    assert messages[-1].WhichOneof("event") == "summary"
    assert all(m.WhichOneof("event") == "delta" for m in messages[:-1])
    assert len([d for d in deltas if d.text]) > 1
    assert "".join(d.text for d in deltas) == unary.sequences[0].text
    summary = messages[-1].summary
    assert summary.sequences[0].finish_reason == unary.sequences[0].finish_reason
    assert summary.usage.completion_tokens == unary.usage.completion_tokens


def test_sampled_bytes_include_multibyte_characters(stub: Any) -> None:
    parameters = pb.GenerationParameters(
        max_new_tokens=60, min_new_tokens=60, do_sample=True, temperature=100.0, seed=11
    )
    text = generate(stub, text="café", parameters=parameters).sequences[0].text
    # The case above is only meaningful if non-ASCII output actually occurs.
    assert any(ord(c) > 127 for c in text)


def test_stream_with_beams_sends_whole_sequences_then_summary(stub: Any) -> None:
    messages = list(
        stub.StreamGenerate(
            pb.GenerateRequest(
                text=PROMPT,
                adapter="upper",
                parameters=pb.GenerationParameters(
                    num_beams=2, num_return_sequences=2, max_new_tokens=30
                ),
            ),
            timeout=60,
        )
    )
    deltas = [m.delta for m in messages[:-1]]
    assert sorted(d.index for d in deltas) == [0, 1]
    assert next(d.text for d in deltas if d.index == 0) == PROMPT.upper()
    assert messages[-1].WhichOneof("event") == "summary"


def test_tokenize(stub: Any) -> None:
    with_special = stub.Tokenize(pb.TokenizeRequest(text="é", add_special_tokens=True))
    plain = stub.Tokenize(pb.TokenizeRequest(text="é"))
    assert len(plain.token_ids) == 2  # byte-level: two UTF-8 bytes
    assert len(with_special.token_ids) == 4
    assert len(plain.tokens) == len(plain.token_ids)


def test_model_info(stub: Any) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_id
    assert info.dtype == "float32"
    assert info.device == "cpu"
    assert info.context_length > 0
    assert info.vocab_size > 256
    assert info.HasField("eos_token_id")
    assert info.limits.max_batch_size >= 1
    assert info.limits.default_max_new_tokens >= 1


def test_list_adapters(stub: Any) -> None:
    adapters = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert {"upper", "reverse"} <= set(adapters)
    assert adapters["upper"].peft_type == "LORA"
    assert adapters["upper"].HasField("rank")
    assert adapters["upper"].mixed_batching
    non_lora = [a for a in adapters.values() if a.peft_type != "LORA"]
    assert non_lora, "the demo model ships a non-LoRA adapter"
    assert all(len(a.sha256) == 64 for a in adapters.values())


@pytest.mark.parametrize("adapter", ["upper", "reverse", "title", ""])
def test_concurrent_mixed_adapter_calls_equal_solo_calls(stub: Any, adapter: str) -> None:
    prompts = ["red fox", "lazy dog jumps", "over the moon", "hello world"]
    alone = [generate(stub, text=p, adapter=adapter).sequences[0].text for p in prompts]
    others = [a for a in ("upper", "reverse", "") if a != adapter]
    futures = [
        stub.Generate.future(pb.GenerateRequest(text=p, adapter=adapter), timeout=60)
        for p in prompts
    ]
    # Neighbours on other adapters share the batches.
    noise = [
        stub.Generate.future(pb.GenerateRequest(text=p, adapter=a), timeout=60)
        for p in prompts
        for a in others
    ]
    assert [f.result().sequences[0].text for f in futures] == alone
    for future in noise:
        future.result()
