"""Incremental detokenization: whole characters only, stop sequences never leak."""

from __future__ import annotations

import random
from typing import Any

import pytest
from peftserve.server.demo_tokenizer import EOS_ID, build_tokenizer
from peftserve.server.engine.detokenize import TextStream, window_decoder

TOKENIZER = build_tokenizer()


def ids(text: str) -> list[int]:
    return list(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def stream_all(
    tokens: list[int], stops: tuple[str, ...] = (), skip: bool = True
) -> tuple[list[str], TextStream]:
    stream = TextStream(TOKENIZER, stops, skip)
    deltas = [stream.push(t) for t in tokens]
    deltas.append(stream.finish())
    return deltas, stream


@pytest.mark.parametrize("text", ["é日本🙂", "aé b日本c🙂d", "plain ascii", "🙂🙂é"])
def test_multibyte_characters_are_never_split(text: str) -> None:
    tokens = ids(text)
    assert len(tokens) == len(text.encode())  # byte-level: é is two tokens
    deltas, stream = stream_all(tokens)
    assert "".join(deltas) == text == stream.text
    assert all("\ufffd" not in d for d in deltas)
    # Each delta is released as soon as its character is complete.
    assert [d for d in deltas if d] == list(text)


def test_incomplete_trailing_bytes_are_flushed_at_the_end() -> None:
    tokens = ids("aé")[:-1]  # the second byte of é never comes
    deltas, stream = stream_all(tokens)
    assert deltas[0] == "a" and deltas[1] == ""
    assert "".join(deltas) == stream.text == TOKENIZER.decode(tokens)


def test_stop_sequence_spanning_tokens_is_never_emitted() -> None:
    deltas, stream = stream_all(ids("hello wor" + "ld and more"), stops=("world",))
    assert stream.stopped and stream.text == "hello "
    assert "".join(deltas) == "hello "
    assert not any("w" in d for d in deltas)


def test_multibyte_stop_sequence() -> None:
    deltas, stream = stream_all(ids("ab日本cd"), stops=("日本",))
    assert stream.stopped and "".join(deltas) == "ab"


def test_held_back_prefix_is_released_when_no_stop_follows() -> None:
    tokens = ids("wow wonder")
    stream = TextStream(TOKENIZER, ("wonderful",), True)
    deltas = [stream.push(t) for t in tokens]
    # "wonder" could still become "wonderful": held back until the end.
    assert "".join(deltas) == "wow "
    assert stream.finish() == "wonder"
    assert stream.text == "wow wonder" and not stream.stopped


def test_earliest_of_several_stop_sequences_wins() -> None:
    deltas, stream = stream_all(ids("xx b-c a-b"), stops=("a-b", "b-c"))
    assert stream.text == "xx " and "".join(deltas) == "xx "


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(skip: bool) -> None:
    deltas, stream = stream_all([*ids("hi"), EOS_ID], skip=skip)
    assert stream.text == ("hi" if skip else "hi</s>")
    assert "".join(deltas) == stream.text


# ---- sentencepiece-style byte fallback (<0xNN> tokens decoded by ByteFallback) ----


def _byte_fallback_tokenizer() -> Any:
    from ..families.models import build_tokenizer as build_family_tokenizer

    return build_family_tokenizer("sp")


def test_byte_fallback_runs_that_are_not_utf8_decode_as_tokenizer_decode() -> None:
    tok = _byte_fallback_tokenizer()
    byte = {b: tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    word = tok("fox", add_special_tokens=False)["input_ids"]
    # <0xC3><0x9E> is "Þ", but a third byte makes the whole run invalid: three U+FFFD.
    for tokens in (
        [byte[0xC3], byte[0x9E], byte[0x9E], *word],
        [*word, byte[0xE2], byte[0x6D], *word, byte[0xC3]],
        [byte[0xF0], byte[0x9F], byte[0x99], byte[0x82], *word],  # a valid 4-byte emoji
    ):
        for skip in (True, False):
            stream = TextStream(tok, (), skip)
            deltas = [stream.push(t) for t in tokens] + [stream.finish()]
            assert "".join(deltas) == stream.text == tok.decode(tokens, skip_special_tokens=skip)


def test_random_byte_fallback_sequences_equal_decode() -> None:
    tok = _byte_fallback_tokenizer()
    rng = random.Random(7)
    vocab = len(tok)
    byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    for _ in range(300):
        tokens = [
            rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(vocab)
            for _ in range(rng.randrange(1, 16))
        ]
        skip = rng.random() < 0.5
        stream = TextStream(tok, (), skip)
        deltas = [stream.push(t) for t in tokens] + [stream.finish()]
        assert "".join(deltas) == stream.text == tok.decode(tokens, skip_special_tokens=skip), (
            tokens,
            skip,
        )


# ---- the window decodes: the Rust tokenizer directly where that is exactly ``decode`` ----


def _tokenizers() -> dict[str, Any]:
    from ..families.models import build_tokenizer as build_family_tokenizer

    return {
        "demo": TOKENIZER,
        "bpe": build_family_tokenizer("bpe"),
        "sp": build_family_tokenizer("sp"),
    }


@pytest.mark.parametrize("name", ["demo", "bpe", "sp"])
def test_direct_window_decodes_equal_decode(name: str) -> None:
    tok = _tokenizers()[name]
    rng = random.Random(3)
    vocab = len(tok)
    for skip in (True, False):
        decode = window_decoder(tok, skip)
        assert decode.__name__ == "direct", "a plain tokenizers-backed tokenizer goes direct"
        for _ in range(300):
            tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
            assert decode(tokens) == tok.decode(tokens, skip_special_tokens=skip), tokens


def test_a_tokenizer_with_its_own_decoding_keeps_it() -> None:
    from ..families.models import build_tokenizer as build_family_tokenizer

    cleaning = build_family_tokenizer("bpe")
    cleaning.clean_up_tokenization_spaces = True
    assert window_decoder(cleaning, True).__name__ == "wrapped"

    shouting = build_family_tokenizer("bpe")

    class Shouting(type(shouting)):  # type: ignore[misc]
        def _decode(self, *args: Any, **kwargs: Any) -> str:
            return str(super()._decode(*args, **kwargs)).upper()

    shouting.__class__ = Shouting
    tokens = shouting("the quick fox", add_special_tokens=False)["input_ids"]
    assert window_decoder(shouting, True).__name__ == "wrapped"
    stream = TextStream(shouting, (), True)
    deltas = [stream.push(t) for t in tokens] + [stream.finish()]
    assert "".join(deltas) == stream.text == "THE QUICK FOX"
