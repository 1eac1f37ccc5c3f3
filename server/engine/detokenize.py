"""Incremental detokenization with stop sequences: token ids in, safe text deltas out.

Two rules make streamed text trustworthy:

* A delta never ends inside a UTF-8 character. Byte-level tokenizers split "é" into two
  tokens; decoding only the first gives U+FFFD. Like TGI and vLLM we decode a small window
  ``ids[prefix_offset:]`` and compare it with ``ids[prefix_offset:read_offset]``: new text is
  released only when the window no longer ends in U+FFFD (the character is complete).
* With a byte-fallback tokenizer (sentencepiece style: ``<0xNN>`` tokens decoded by
  ``ByteFallback``), a run of consecutive byte tokens is decoded as a whole, and a run that is
  not valid UTF-8 becomes one U+FFFD per byte: a later byte token can turn text already
  decoded (``<0xC3><0x9E>`` is "Þ", ``<0xC3><0x9E><0x9E>`` is three U+FFFD) into something
  else. Text is therefore held back while the window ends in a byte token, and windows only
  start after a closed run, so the released text is exactly ``decode`` of the ids.
* Text at or after a stop sequence is never released. Released text is checked for a stop
  sequence and any suffix that could still grow into one is held back, so a stop sequence
  spanning several tokens is caught before any part of it leaves.

The final text is by construction the concatenation of every delta.

Each token costs two window decodes. For a plain ``tokenizers``-backed tokenizer (transformers'
``TokenizersBackend`` with its own ``decode``/``_decode`` and no clean-up of tokenization
spaces) they call the Rust tokenizer's ``decode`` directly: exactly what ``decode`` returns
(its ``_decode`` is that call and nothing else then), without the Python wrapper around it
(``to_py_obj``, kwargs, the clean-up check), ~2.6 -> ~0.6 us a call on the demo tokenizer.
Any other tokenizer keeps its ``decode``.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

REPLACEMENT_CHAR = "\ufffd"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_byte_ids_cache: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


class Decoder(Protocol):
    """The slice of a Hugging Face tokenizer this module needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def byte_fallback_ids(decoder: object) -> frozenset[int]:
    """Ids of a byte-fallback tokenizer's ``<0xNN>`` tokens; empty for any other tokenizer."""
    try:
        return _byte_ids_cache[decoder]
    except (KeyError, TypeError):
        pass
    ids: frozenset[int] = frozenset()
    backend = getattr(decoder, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    get_vocab = getattr(decoder, "get_vocab", None)
    if getattr(model, "byte_fallback", False) and callable(get_vocab):
        ids = frozenset(i for token, i in get_vocab().items() if BYTE_TOKEN.fullmatch(token))
    with contextlib.suppress(TypeError):  # not weak-referenceable: recomputed per stream
        _byte_ids_cache[decoder] = ids
    return ids


def window_decoder(decoder: Decoder, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """``ids -> decoder.decode(ids, skip_special_tokens=...)``, through the Rust tokenizer
    itself where that is exactly what ``decode`` does (see the module docstring)."""
    kind = type(decoder)
    backend = getattr(decoder, "_tokenizer", None)
    if (
        isinstance(decoder, TokenizersBackend)
        and kind.decode is PreTrainedTokenizerBase.decode
        and kind._decode is TokenizersBackend._decode
        and not decoder.clean_up_tokenization_spaces
        and callable(getattr(backend, "decode", None))
    ):
        rust_decode = backend.decode

        def direct(ids: list[int]) -> str:
            text: str = rust_decode(ids, skip_special_tokens=skip_special_tokens)
            return text

        return direct

    def wrapped(ids: list[int]) -> str:
        return decoder.decode(ids, skip_special_tokens=skip_special_tokens)

    return wrapped


def _held_back_length(text: str, stop_sequences: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop sequence."""
    longest = 0
    for stop in stop_sequences:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """Turns one sequence's generated token ids into text deltas, honouring stop sequences."""

    def __init__(
        self,
        decoder: Decoder,
        stop_sequences: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._byte_ids = byte_fallback_ids(decoder)
        self._decode = window_decoder(decoder, skip_special_tokens)
        self._ids: list[int] = []
        # Window offsets as in TGI's ``decode_token``: text before ``read_offset`` is decoded.
        self._prefix_offset = 0
        self._read_offset = 0
        # Decoded text not yet released because it may be the start of a stop sequence.
        self._pending = ""
        self.text = ""  # everything released so far
        self.stopped = False  # a stop sequence was found; nothing more is ever released

    def _decode_new(self, flush: bool) -> str:
        """Text completed by the tokens since the last call (all of it when ``flush``)."""
        if not flush and self._ids and self._ids[-1] in self._byte_ids:
            return ""  # a byte run may still grow, and is decoded as a whole
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and (flush or not new_text.endswith(REPLACEMENT_CHAR)):
            # Advance the window only past whole characters so the next decode has context.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that may be released now (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        return self._release(self._decode_new(flush=False), final=False)

    def finish(self) -> str:
        """The sequence ended: release whatever is still held (incomplete bytes included)."""
        if self.stopped:
            return ""
        return self._release(self._decode_new(flush=True), final=True)

    def _release(self, new_text: str, final: bool) -> str:
        self._pending += new_text
        if not self._pending:
            return ""
        if self._stops:
            cut = min(
                (pos for pos in (self._pending.find(s) for s in self._stops) if pos >= 0),
                default=-1,
            )
            if cut >= 0:
                delta = self._pending[:cut]
                self._pending = ""
                self.stopped = True
                self.text += delta
                return delta
        held = 0 if final else _held_back_length(self._pending, self._stops)
        delta = self._pending[: len(self._pending) - held]
        self._pending = self._pending[len(self._pending) - held :]
        self.text += delta
        return delta
