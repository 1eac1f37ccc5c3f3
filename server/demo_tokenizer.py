"""A byte-level tokenizer for the embedded demo model and for synthetic test models.

Every UTF-8 byte is its own token and there are no merges, so any text round-trips and a
multi-byte character (``é``, ``日本``, an emoji) always spans several tokens.  That is
deliberate: it exercises the server's incremental detokenizer on partial characters, which a
word-piece vocabulary would mostly hide.

The tokenizer is built with the ``tokenizers`` library and wrapped in
:class:`transformers.PreTrainedTokenizerFast`, so it saves to, and loads from, plain HF files
with ``AutoTokenizer.from_pretrained(path)`` and no ``trust_remote_code``.

Encoding a prompt with special tokens gives ``<s> prompt-bytes <sep>``: exactly the prefix the
demo model was trained to continue with ``target </s>``.

This module imports nothing from the rest of the project, so both ``scripts/train_demo.py``
and :mod:`peftserve.server.synthetic` can use it without dragging in the server.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SEP_TOKEN = "<sep>"
# Specials come first so their ids are stable and small whatever the byte alphabet order is.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, SEP_TOKEN)
PAD_ID, BOS_ID, EOS_ID, SEP_ID = range(len(SPECIAL_TOKENS))
NUM_BYTES = 256
VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTES
# The chat template of the demo model, in the format it was trained on: a user turn is
# "<s>{content}<sep>", the reply "{content}</s>". The model (and every adapter) answers a
# user message by transforming it, so there is no system role; multi-turn chats repeat the
# pattern. ``</s>`` is therefore also the end-of-turn token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + message['content'] -}}"
    "{%- if not loop.last or add_generation_prompt -%}{{- sep_token -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('the demo model knows the roles user and assistant, not ' "
    "+ message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _bytes_to_unicode() -> list[str]:
    """The printable symbol ByteLevel uses for each byte value 0..255 (GPT-2's mapping)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(NUM_BYTES):
        if b not in symbols:
            symbols[b] = chr(NUM_BYTES + extra)
            extra += 1
    return [symbols[b] for b in range(NUM_BYTES)]


def byte_token_id(byte: int) -> int:
    """Token id of a raw byte value: handy for tests and for reading dumps by eye."""
    return len(SPECIAL_TOKENS) + byte


def _build_backend(vocab_size: int | None = None) -> Tokenizer:
    """Build the raw ``tokenizers`` object: 256 byte symbols, no merges, plus the specials."""
    # ByteLevel maps each byte to a printable unicode symbol; those symbols are the vocabulary.
    # Ordering them by byte value makes id == 4 + byte, so dumps of ids are readable.
    byte_symbols = _bytes_to_unicode()
    assert set(byte_symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({sym: len(SPECIAL_TOKENS) + i for i, sym in enumerate(byte_symbols)})
    # A BPE with an empty merge list is exactly "one token per byte".
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # No regex split and no prefix space: the text must come back byte for byte.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    if vocab_size is not None and vocab_size > VOCAB_SIZE:
        # Synthetic models may use a realistic vocabulary (e.g. 32000) for realistic compute;
        # every id a random model can emit must still decode, so fill the gap with plain
        # (non-special) tokens that show up visibly in the text.
        backend.add_tokens([f"<extra_{i}>" for i in range(vocab_size - VOCAB_SIZE)])
    # The prompt format the model was trained on: "<s>{prompt}<sep>" then "{target}</s>".
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {SEP_TOKEN}",
        pair=f"{BOS_TOKEN} $A {SEP_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, BOS_ID), (SEP_TOKEN, SEP_ID), (EOS_TOKEN, EOS_ID)],
    )
    return backend


def build_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Return the demo byte-level tokenizer, ready to ``save_pretrained``.

    ``vocab_size`` larger than :data:`VOCAB_SIZE` pads the vocabulary with ``<extra_i>`` tokens
    so that it matches a model with a bigger embedding table.
    """
    if vocab_size is not None and vocab_size < VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {VOCAB_SIZE}, got {vocab_size}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        sep_token=SEP_TOKEN,
        # Nothing here is ever truncated by length, but generation code reads this.
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(out_dir: Path, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Build the tokenizer, write its HF files into ``out_dir`` and return it."""
    tok = build_tokenizer(vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok
