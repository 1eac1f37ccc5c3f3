"""Tiny random models of many architecture families, with locally trained tokenizers.

Nothing is downloaded: each family's config is written here with tiny dimensions, weights are
random (seeded), and the tokenizer is trained in milliseconds on ``CORPUS`` by the
``tokenizers`` library, in one of two styles:

* ``bpe``: byte-level BPE (GPT-2, OPT, GPT-NeoX, BLOOM, Falcon, MPT, Qwen2 style);
* ``sp``: sentencepiece-style BPE with byte fallback (Llama, Mistral, Gemma, Phi-3, Mixtral
  style): ``▁`` for spaces, ``<0xNN>`` tokens for bytes outside the vocabulary, decoded by
  ``ByteFallback``, so a random model can emit byte sequences that are not valid UTF-8.

Adapters (``write_adapter``) get random, non-trivial weights so that each really changes the
logits (a freshly initialised LoRA is a no-op that would hide routing bugs).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A serving system batches requests from many "
    "clients and adapters; every request must get the tokens it would get alone. "
    "Le cœur a ses raisons que la raison ne connaît point. Grüße aus Köln, naïve façade. "
    "日本語のテキスト、中文文本。 Emoji 🙂🚀 and numbers 1234567890. "
    "def f(x):\n    return x * 2  # code, too\n"
) * 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
BPE_VOCAB = 320
SP_VOCAB = 360


def _train(tokenizer: Tokenizer, vocab_size: int, alphabet: list[str]) -> Tokenizer:
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS], trainer=trainer)
    return tokenizer


def _byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _train(tok, BPE_VOCAB, pre_tokenizers.ByteLevel.alphabet())


def _sentencepiece_bpe() -> Tokenizer:
    """Llama-2-style: Metaspace words, BPE merges, <0xNN> byte fallback, BOS prepended."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    _train(trained, SP_VOCAB, [])
    model = json.loads(trained.to_str())["model"]
    # Rebuild with the byte tokens as ordinary vocabulary right after the specials, like
    # Llama's ids 3..258: byte fallback needs them, and they must not be special tokens.
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def build_tokenizer(style: str) -> PreTrainedTokenizerFast:
    backend = _byte_level_bpe() if style == "bpe" else _sentencepiece_bpe()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


# ---- families ----

TINY: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@dataclass(frozen=True)
class Family:
    """One architecture: how to build its config, which tokenizer, which adapters fit it."""

    name: str
    config: Callable[[int], Any]  # vocab size -> config
    tokenizer: str  # "bpe" | "sp"
    lora_targets: Any = "all-linear"
    # The non-LoRA adapter of the matrix: "loha" (all-linear) or "ia3" (peft's mapping).
    other: str = "loha"
    embed_name: str = "embed_tokens"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _cfg(cls_name: str, **overrides: Any) -> Callable[[int], Any]:
    def make(vocab: int) -> Any:
        cls = getattr(transformers, cls_name)
        settings = {
            "vocab_size": vocab,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            # Peaked logits: fewer near-ties, so batched and solo argmax agree on random weights.
            "initializer_range": 0.3,
            "tie_word_embeddings": False,
        }
        settings.update(overrides)
        return cls(**settings)

    return make


def _llama_like(cls_name: str, **extra: Any) -> Callable[[int], Any]:
    return _cfg(cls_name, **{**TINY, **extra})


# Phi-3 LongRoPE: switch at 24 positions, so a test prompt can sit on either side of it.
LONGROPE_SWITCH = 24
_HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]
_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0] * (_HEAD_DIM // 2),
    "long_factor": [1.0 + 3.0 * i for i in range(_HEAD_DIM // 2)],
    "original_max_position_embeddings": LONGROPE_SWITCH,
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", _llama_like("LlamaConfig"), "sp"),
        Family(
            "mistral",
            _llama_like("MistralConfig", sliding_window=6),
            "sp",
            notes="sliding_window=6, shorter than the prompts",
        ),
        Family("qwen2", _llama_like("Qwen2Config"), "bpe"),
        Family(
            "gemma2",
            _llama_like(
                "Gemma2Config",
                head_dim=8,
                sliding_window=6,
                query_pre_attn_scalar=8,
                final_logit_softcapping=30.0,
                attn_logit_softcapping=50.0,
            ),
            "sp",
            # Untied: with Gemma's scaled tied embeddings the random logits saturate and no
            # adapter changes a greedy token, which would hide routing errors.
            notes="alternating sliding (6) and global layers, logit soft-capping",
        ),
        Family(
            "gemma3",
            _llama_like(
                "Gemma3TextConfig",
                head_dim=8,
                sliding_window=6,
                query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "full_attention"],
            ),
            "sp",
            notes="text-only Gemma 3, sliding window 6",
        ),
        Family("phi3", _llama_like("Phi3Config", pad_token_id=PAD_ID), "sp"),
        Family(
            "phi3-longrope",
            _llama_like(
                "Phi3Config",
                rope_parameters=_LONGROPE,
                original_max_position_embeddings=LONGROPE_SWITCH,
            ),
            "sp",
            notes=f"LongRoPE, switch at {LONGROPE_SWITCH} positions",
        ),
        Family(
            "gpt2",
            _cfg("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=256),
            "bpe",
            other="ia3",
            embed_name="wte",
        ),
        Family(
            "opt",
            _cfg(
                "OPTConfig",
                hidden_size=32,
                ffn_dim=64,
                word_embed_proj_dim=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=256,
            ),
            "bpe",
        ),
        Family(
            "gpt_neox",
            _cfg(
                "GPTNeoXConfig",
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=256,
            ),
            "bpe",
            embed_name="embed_in",
        ),
        Family(
            "falcon",
            _cfg(
                "FalconConfig",
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=256,
                new_decoder_architecture=True,
                num_kv_heads=2,
            ),
            "bpe",
            embed_name="word_embeddings",
        ),
        Family(
            "falcon-alibi",
            _cfg(
                "FalconConfig",
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                alibi=True,
                multi_query=True,
                parallel_attn=True,
            ),
            "bpe",
            embed_name="word_embeddings",
            notes="ALiBi, multi-query attention (Falcon-7B layout)",
        ),
        Family(
            "qwen2_moe",
            _llama_like(
                "Qwen2MoeConfig",
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
            ),
            "bpe",
            notes="4 experts, top-2, shared expert",
        ),
        Family(
            "mixtral",
            _llama_like("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
            "sp",
        ),
        Family(
            "bloom",
            _cfg("BloomConfig", hidden_size=32, n_layer=2, n_head=4),
            "bpe",
            embed_name="word_embeddings",
            notes="ALiBi, no position limit in the config",
        ),
        Family(
            "mpt",
            _cfg(
                "MptConfig", d_model=32, n_heads=4, n_layers=2, max_seq_len=128, expansion_ratio=2
            ),
            "bpe",
            embed_name="wte",
            notes="ALiBi, max_seq_len=128",
        ),
    ]
}


@dataclass(frozen=True)
class BuiltModel:
    family: Family
    base: Path
    adapters: Path


def build_base(family: Family, out: Path, seed: int = 0) -> Path:
    """Write ``family``'s tiny random model and its tokenizer to ``out``; return ``out``."""
    tokenizer = build_tokenizer(family.tokenizer)
    config = family.config(len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _randomize(model: Any, seed: int) -> None:
    """Give every adapter parameter random values that visibly move the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * noise)
            elif "prompt_encoder" in name or "modules_to_save" in name:
                p.copy_(p + 0.5 * noise)
            else:
                p.copy_(0.3 * noise)


def adapter_config(family: Family, kind: str, base: Path) -> PeftConfig:
    """The peft config of one adapter kind for ``family``."""
    lora: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": family.lora_targets,
        "init_lora_weights": False,
    }
    if kind == "lora":
        return LoraConfig(**lora)
    if kind == "lora2":
        return LoraConfig(**{**lora, "r": 2})
    if kind == "rslora":
        return LoraConfig(**lora, use_rslora=True)
    if kind == "dora":
        return LoraConfig(**lora, use_dora=True)
    if kind == "lora_embed_head":
        return LoraConfig(**{**lora, "target_modules": [family.embed_name, "lm_head"]})
    if kind == "modules_to_save":
        return LoraConfig(**lora, modules_to_save=["lm_head"])
    if kind == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules="all-linear", init_weights=False)
    if kind == "lokr":
        return LoKrConfig(r=4, alpha=8, target_modules="all-linear", init_weights=False)
    if kind == "ia3":
        return IA3Config(init_ia3_weights=False)
    if kind == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    if kind == "prefix_tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    raise ValueError(f"unknown adapter kind {kind!r}")


def write_adapter(family: Family, kind: str, base: Path, out: Path, seed: int) -> Path:
    """Write one random adapter of ``kind`` over the base model in ``base`` to ``out``."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = adapter_config(family, kind, base)
    if kind == "other":
        config = adapter_config(family, family.other, base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    _randomize(peft_model, seed)
    peft_model.save_pretrained(str(out))
    return out


def build_family(family: Family, out: Path, kinds: dict[str, str], seed: int = 0) -> BuiltModel:
    """Base model under ``out/base`` and one adapter per ``{name: kind}`` under ``out/adapters``."""
    base = build_base(family, out / "base", seed)
    adapters = out / "adapters"
    for index, (name, kind) in enumerate(kinds.items()):
        resolved = family.other if kind == "other" else kind
        write_adapter(family, resolved, base, adapters / name, seed + 100 + index)
    return BuiltModel(family, base, adapters)
