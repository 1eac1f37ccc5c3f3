"""Model-family facts read from a model's config: context length and batch-composition quirks.

Context length. transformers has no single name for it: most configs say
``max_position_embeddings``, GPT-2 style ones ``n_positions``/``n_ctx``, MPT ``max_seq_len``,
ChatGLM/Qwen-1 ``seq_length``, others ``max_sequence_length``/``max_seq_length``/``seq_len``;
a multimodal config keeps it in its text config. ALiBi models such as BLOOM have none at all
and their tokenizer reports transformers' "no limit" sentinel (``int(1e30)``), which overflows
the contract's ``uint32``. ``context_length`` tries every name (text config first), takes the
tokenizer's ``model_max_length`` only when it is a real number, and clamps into ``uint32``.

Batch-composition quirks: a family whose output for one row depends on the other rows of its
forward must say how to keep such rows apart.

* Phi-3 LongRoPE (``rope_parameters``/``rope_scaling`` of type ``longrope``, e.g.
  Phi-3-mini-128k, Phi-3.5, Phi-4-mini): transformers picks the *long* or *short* RoPE factors
  for the whole forward from the largest position in it (``max(position_ids) + 1 >
  original_max_position_embeddings``), so a short row next to a long one gets the long
  factors and different tokens; and the first time a sequence outgrows the switch,
  ``Phi3ForCausalLM.prepare_inputs_for_generation`` drops the cache and feeds it again.
  ``RopeSwitch.side(length)`` maps a row's length (prompt plus tokens so far: the positions
  its next forward covers) to 0 or 1; the decode loop plugs it into its per-row partition
  hook (``Batcher.partition``), so every forward holds rows of one side only, and a row that
  crosses is prefilled again on the long side, as ``generate`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UINT32_MAX = 2**32 - 1
# transformers' VERY_LARGE_INTEGER (``int(1e30)``): "the tokenizer does not know".
_TOKENIZER_NO_LIMIT = 10**29
CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "n_ctx",
    "seq_len",
)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = int(value)
    return number if number > 0 else None


def config_context_length(config: Any) -> int | None:
    """The context length a model config states under any known name, or None."""
    configs = []
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        configs.append(get_text_config())
    configs.append(config)
    for cfg in configs:
        for key in CONTEXT_LENGTH_KEYS:
            found = _positive_int(getattr(cfg, key, None))
            if found is not None:
                return found
    return None


def context_length(config: Any, tokenizer_max_length: Any = None) -> int:
    """The served context length: config first, then a real tokenizer limit, in ``uint32``.

    With neither (an ALiBi model without a limit), the contract's largest value: the batch
    token budget and the per-request limits still bound every request.
    """
    length = config_context_length(config)
    if length is None:
        tokenizer = _positive_int(tokenizer_max_length)
        if tokenizer is not None and tokenizer < _TOKENIZER_NO_LIMIT:
            length = tokenizer
    if length is None:
        length = UINT32_MAX
    return min(length, UINT32_MAX)


@dataclass(frozen=True)
class RopeSwitch:
    """LongRoPE's switch: forwards with any position >= ``threshold`` use the long factors."""

    threshold: int  # original_max_position_embeddings

    def side(self, length: int) -> int:
        """0 for a row whose sequence (prompt + tokens so far) fits the short factors, else 1.

        transformers compares the forward's ``max(position_ids) + 1`` with the threshold, and
        a row of length ``length`` attends at positions up to ``length - 1``.
        """
        return 0 if length <= self.threshold else 1


def _rope_parameters(config: Any) -> dict[str, Any]:
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if isinstance(value, dict) and value:
            # transformers 5 may nest per-attention-type parameters (e.g. Gemma 3).
            if "rope_type" not in value and "type" not in value:
                nested = [v for v in value.values() if isinstance(v, dict)]
                if nested:
                    return nested[0]
            return value
    return {}


def rope_switch(config: Any) -> RopeSwitch | None:
    """The LongRoPE switch of ``config`` (text config of a multimodal one), if it has one."""
    get_text_config = getattr(config, "get_text_config", None)
    text = get_text_config() if callable(get_text_config) else config
    params = _rope_parameters(text)
    rope_type = str(params.get("rope_type") or params.get("type") or "")
    if rope_type != "longrope":
        return None
    original = _positive_int(getattr(text, "original_max_position_embeddings", None))
    if original is None:
        original = _positive_int(params.get("original_max_position_embeddings"))
    if original is None:
        return None
    return RopeSwitch(original)
