"""The mixing table: which adapter kinds may share a forward with which rows, and why.

Each entry was decided by a test, not by the name of the PEFT type: ``tests/families`` runs
every kind on tiny random models of each family (solo ``PeftModel.generate`` against batched
and mixed runs) and ``docs/compatibility.md`` records the results. With the pinned
transformers 5.24 / peft 0.21.2:

=====================  ===========  ==========  ===========  ==================================
kind                   other        base rows   same adapter  why
                       adapters
=====================  ===========  ==========  ===========  ==================================
LoRA (plain, rsLoRA,   yes*         yes*        yes           routed per row on the routed
all-linear, embed /                                           tree (``routing.py``); equal to
lm_head targets)                                              solo
LoHa, LoKr, IA3        yes*         yes*        yes           routed per row on the routed
(Linear layers)                                               tree, in the same forward as
                                                              LoRA rows; equal to solo
LoRA + DoRA            no           no          yes           no routing for DoRA's weight
                                                              norm (peft refuses it as well)
LoRA + modules_to_save no           no          yes           mixed: ``KeyError`` in peft; a
(or trainable tokens)                                         saved ``lm_head`` also conflicts
                                                              with LoRA on ``lm_head``: own model
LoRA on parameters     no           no          yes           ``ParamWrapper`` has no mixed
(``target_parameters``)                                       batches
aLoRA                  no           no          yes           per-row invocation offsets
any other non-prompt   no           no          yes           no routing (peft's
type (VeRA, OFT, ...)                                         ``adapter_names`` ignores it)
prompt / p-tuning      no           no          same prompt   left padding shifts the virtual
                                                length only   tokens: not batch-invariant
prefix tuning          no           no          same prompt   as above; refused where
                                                length only   ``generate`` ignores it (Llama,
                                                              Qwen2, ... : see the probe)
=====================  ===========  ==========  ===========  ==================================

``*`` "yes" is checked again at load, on the served model, by a probe forward (see
``registry.py``): every layer must be of a class the routed tree routes (LoHa/LoKr on a
convolution are not), and a family may feed some layers flattened tokens (OPT's MLP,
Qwen2-MoE's experts, a MoE router), which breaks per-row routing. An adapter failing the probe
is served alone.

Prompt-learning adapters are also probed at load: one that raises through ``generate`` or
leaves the logits exactly as the base model's (ignored) is refused with FAILED_PRECONDITION.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Non-LoRA types whose (Linear) layers the routed tree routes per row (``routing.py``).
ROUTED_TYPES = frozenset({"LOHA", "LOKR", "IA3"})
PROMPT_LEARNING_TYPES = frozenset(
    {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}
)


@dataclass(frozen=True)
class MixingRule:
    """How rows of one adapter may share a forward (see the module's table)."""

    kind: str  # the table row, e.g. "lora", "lora+dora"
    # Rows of other adapters and base rows may share its forward (the routed tree).
    mixed: bool
    # Only requests whose prompts have the same length share a batch (no left padding).
    same_prompt_length: bool
    # Needs a PeftModel of its own: it cannot live next to other adapters of its type.
    own_model: bool
    why: str
    # Probe at load that generate applies it at all (prompt learning).
    probe_effect: bool = False


def _has(config: dict[str, Any], key: str) -> bool:
    value = config.get(key)
    return bool(value) and value != {}


def rule_for(config: dict[str, Any]) -> MixingRule:
    """The table row of an adapter, from its ``adapter_config.json``."""
    peft_type = str(config.get("peft_type", "")).upper()
    saves_modules = _has(config, "modules_to_save") or _has(config, "trainable_token_indices")
    if peft_type in PROMPT_LEARNING_TYPES:
        return MixingRule(
            peft_type.lower(),
            mixed=False,
            same_prompt_length=True,
            own_model=False,
            why="left padding shifts its virtual tokens, so only prompts of one length batch",
            probe_effect=True,
        )
    if saves_modules:
        return MixingRule(
            f"{peft_type.lower()}+modules_to_save",
            mixed=False,
            same_prompt_length=False,
            own_model=True,
            why="peft cannot route modules_to_save per row, and its saved copies conflict "
            "with other adapters targeting the same modules",
        )
    if peft_type in ROUTED_TYPES:
        return MixingRule(
            peft_type.lower(),
            mixed=True,
            same_prompt_length=False,
            own_model=False,
            why="each row is routed through its own adapter, next to LoRA and base rows",
        )
    if peft_type != "LORA":
        return MixingRule(
            peft_type.lower(),
            mixed=False,
            same_prompt_length=False,
            own_model=False,
            why=f"no per-row routing for {peft_type} (peft ignores adapter_names for it)",
        )
    if config.get("use_dora"):
        return MixingRule("lora+dora", False, False, False, "peft refuses adapter_names with DoRA")
    if _has(config, "target_parameters"):
        return MixingRule(
            "lora+target_parameters",
            False,
            False,
            True,
            "peft's ParamWrapper has no mixed batches",
        )
    if _has(config, "alora_invocation_tokens"):
        return MixingRule("lora+alora", False, False, False, "aLoRA offsets are per request")
    return MixingRule("lora", True, False, False, "each row is routed through its own adapter")
