"""Pure conversions: coalescing of stream events and float32 parameter round trips."""

from __future__ import annotations

from peftserve.server import convert
from peftserve.server.engine.types import ResponseOptions, TokenEvent, TokenLogprob
from peftserve.v1 import generation_pb2 as pb


def test_events_that_arrive_together_merge_per_sequence_in_order() -> None:
    events = [
        TokenEvent(0, (10,), "a", (TokenLogprob(10, "a", -0.1),)),
        TokenEvent(1, (20,), "x"),
        TokenEvent(0, (11, 12), "bc", (TokenLogprob(11, "b", -0.2), TokenLogprob(12, "c", -0.3))),
        TokenEvent(1, (21,), ""),
    ]
    options = ResponseOptions(return_token_ids=True, return_logprobs=True)
    messages = convert.stream_deltas("r", events, options)
    assert [m.delta.index for m in messages] == [0, 1]
    first, second = (m.delta for m in messages)
    assert first.text == "abc" and list(first.token_ids) == [10, 11, 12]
    assert [lp.token_id for lp in first.logprobs] == [10, 11, 12]
    assert second.text == "x" and list(second.token_ids) == [20, 21]
    assert all(m.request_id == "r" for m in messages)


def test_token_ids_and_logprobs_only_when_asked() -> None:
    events = [TokenEvent(0, (10,), "a", (TokenLogprob(10, "a", -0.1),))]
    (message,) = convert.stream_deltas("r", events, ResponseOptions())
    assert message.delta.text == "a"
    assert not message.delta.token_ids and not message.delta.logprobs


def test_float32_parameters_come_back_as_the_decimal_the_client_meant() -> None:
    request = pb.GenerateRequest(
        text="x", parameters=pb.GenerationParameters(temperature=0.7, top_p=0.9)
    )
    parameters = convert.generation_request(request, None).parameters
    assert parameters.temperature == 0.7 and parameters.top_p == 0.9
    assert parameters.top_k is None  # unset stays unset
