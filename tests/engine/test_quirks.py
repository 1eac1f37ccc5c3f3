"""Model-family facts from configs (server/engine/quirks.py): context length and LongRoPE."""

from __future__ import annotations

import pytest
from peftserve.server.engine.quirks import (
    UINT32_MAX,
    RopeSwitch,
    context_length,
    rope_switch,
)
from transformers import (
    BloomConfig,
    Gemma3Config,
    GPT2Config,
    LlamaConfig,
    MptConfig,
    Phi3Config,
    PretrainedConfig,
)

SENTINEL = int(1e30)  # transformers' "the tokenizer does not know"


@pytest.mark.parametrize(
    ("config", "tokenizer_max", "expected"),
    [
        (LlamaConfig(max_position_embeddings=4096), SENTINEL, 4096),
        (GPT2Config(n_positions=1024), SENTINEL, 1024),
        (MptConfig(max_seq_len=256), 2048, 256),  # the config wins over the tokenizer
        (PretrainedConfig(seq_length=8192), SENTINEL, 8192),  # ChatGLM / Qwen-1 style
        (PretrainedConfig(max_sequence_length=777), None, 777),
        (PretrainedConfig(n_ctx=333), None, 333),
        (Gemma3Config(text_config={"max_position_embeddings": 12345}), SENTINEL, 12345),
        (BloomConfig(), 2048, 2048),  # ALiBi: no config limit, a real tokenizer limit
        (BloomConfig(), SENTINEL, UINT32_MAX),  # neither: the contract's largest value
        (BloomConfig(), None, UINT32_MAX),
        (LlamaConfig(max_position_embeddings=2**40), SENTINEL, UINT32_MAX),  # clamped
    ],
)
def test_context_length_from_every_config_name(
    config: PretrainedConfig, tokenizer_max: int | None, expected: int
) -> None:
    assert context_length(config, tokenizer_max) == expected


def _longrope_phi3(original: int = 4096) -> Phi3Config:
    half = 48  # head_dim = 3072 / 32 = 96 -> 48 frequencies; Phi3 checks the length
    return Phi3Config(
        max_position_embeddings=131072,
        original_max_position_embeddings=original,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * half,
            "long_factor": [2.0] * half,
            "original_max_position_embeddings": original,
        },
    )


def test_longrope_is_detected_from_the_config() -> None:
    assert rope_switch(_longrope_phi3()) == RopeSwitch(4096)
    assert rope_switch(Phi3Config()) is None
    assert rope_switch(LlamaConfig()) is None


def test_rope_switch_sides_follow_transformers_comparison() -> None:
    # transformers uses the long factors when max(position_ids) + 1 > original.
    switch = RopeSwitch(24)
    assert switch.side(24) == 0
    assert switch.side(25) == 1
