"""The mixing table's rows by adapter config (server/engine/mixing.py); the families tests
decide them, this pins which config fields select which row."""

from __future__ import annotations

from typing import Any

import pytest
from peftserve.server.engine.mixing import rule_for


@pytest.mark.parametrize(
    ("config", "kind", "mixed", "same_length", "own_model"),
    [
        ({"peft_type": "LORA"}, "lora", True, False, False),
        ({"peft_type": "LORA", "use_rslora": True}, "lora", True, False, False),
        (
            {"peft_type": "LORA", "target_modules": ["embed_tokens", "lm_head"]},
            "lora",
            True,
            False,
            False,
        ),
        ({"peft_type": "LORA", "use_dora": True}, "lora+dora", False, False, False),
        (
            {"peft_type": "LORA", "modules_to_save": ["lm_head"]},
            "lora+modules_to_save",
            False,
            False,
            True,
        ),
        (
            {"peft_type": "LORA", "trainable_token_indices": [1, 2]},
            "lora+modules_to_save",
            False,
            False,
            True,
        ),
        (
            {"peft_type": "LORA", "target_parameters": ["experts.gate_up_proj"]},
            "lora+target_parameters",
            False,
            False,
            True,
        ),
        ({"peft_type": "LORA", "alora_invocation_tokens": [5]}, "lora+alora", False, False, False),
        ({"peft_type": "LOHA"}, "loha", True, False, False),
        ({"peft_type": "LOKR"}, "lokr", True, False, False),
        ({"peft_type": "IA3"}, "ia3", True, False, False),
        ({"peft_type": "VERA"}, "vera", False, False, False),
        (
            {"peft_type": "LOHA", "modules_to_save": ["lm_head"]},
            "loha+modules_to_save",
            False,
            False,
            True,
        ),
        (
            {"peft_type": "IA3", "modules_to_save": ["lm_head"]},
            "ia3+modules_to_save",
            False,
            False,
            True,
        ),
        ({"peft_type": "PROMPT_TUNING"}, "prompt_tuning", False, True, False),
        ({"peft_type": "PREFIX_TUNING"}, "prefix_tuning", False, True, False),
    ],
)
def test_rule_for(
    config: dict[str, Any], kind: str, mixed: bool, same_length: bool, own_model: bool
) -> None:
    rule = rule_for(config)
    assert (rule.kind, rule.mixed, rule.same_prompt_length, rule.own_model) == (
        kind,
        mixed,
        same_length,
        own_model,
    )
    assert rule.why
    assert rule.probe_effect == same_length  # prompt learning is probed through generate
