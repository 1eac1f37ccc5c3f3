"""Random-weight Llama models with random LoRA adapters, for tests and benchmarks.

The committed demo model (``models/demo``) is tiny on purpose.  Load, memory and throughput
work needs models of realistic shape -- up to ~1B parameters -- without downloading anything,
and its adapters must really change the logits (a LoRA with ``B == 0`` is a no-op that would
hide adapter-routing bugs).  This module writes such a model to disk in plain HF layout:

    out_dir/base/                 config.json, model*.safetensors, tokenizer, generation config
    out_dir/adapters/lora<i>/     adapter_config.json, adapter_model.safetensors

Weights are generated tensor by tensor from a seeded generator and written in ~1 GB safetensors
shards, so even the ``1b`` preset needs neither a GPU nor the whole model in memory at once.

Usage::

    python -m peftserve.server.synthetic --out /tmp/synth --preset small --adapters 4
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .demo_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_tokenizer

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Every projection of a Llama block, so adapters cost what real "all-linear" LoRAs cost.
LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# Shard size for the base weights: bounds peak host memory while writing a large model.
SHARD_BYTES = 1 << 30
INIT_STD = 0.02


@dataclass(frozen=True)
class ModelDims:
    """The Llama shape parameters that matter for size and speed."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False


PRESETS: dict[str, ModelDims] = {
    # Seconds to build and load on a CPU: for unit tests.
    "tiny": ModelDims(64, 2, 4, 2, 128, VOCAB_SIZE, 512, tie_word_embeddings=True),
    # ~20M parameters: big enough for batching effects to be measurable on a CPU.
    "small": ModelDims(512, 4, 8, 4, 1536, 8192),
    # Llama-3.2-1B-like shape (~1.2B parameters with this vocabulary).
    "1b": ModelDims(2048, 16, 32, 8, 8192, 32000),
}


def llama_config(dims: ModelDims, dtype: str) -> LlamaConfig:
    """A ``LlamaConfig`` for ``dims`` with the byte tokenizer's special ids."""
    return LlamaConfig(
        **asdict(dims),
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype=dtype,
    )


def _param_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Persistent tensor names and shapes, taken from a meta-device model so none are guessed."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        # Tied weights are stored once, under the embedding's name.
        shapes.pop("lm_head.weight", None)
    return shapes


def _random_tensor(
    name: str, shape: torch.Size, gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    # Norm weights of 1 (as at init) keep activations sane; everything else is N(0, 0.02).
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * INIT_STD).to(dtype)


def _write_base(out: Path, config: LlamaConfig, dtype: torch.dtype, seed: int) -> None:
    """Write config, sharded random weights, tokenizer and generation config into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(
        str(out)
    )
    save_tokenizer(out, vocab_size=config.vocab_size)

    # Plan the shards from shapes first, so file names are known before any weight exists and
    # only one shard's tensors are ever held in memory.
    elem = torch.empty((), dtype=dtype).element_size()
    plan: list[dict[str, torch.Size]] = [{}]
    size = 0
    for name, shape in _param_shapes(config).items():
        nbytes = shape.numel() * elem
        if plan[-1] and size + nbytes > SHARD_BYTES:
            plan.append({})
            size = 0
        plan[-1][name] = shape
        size += nbytes

    gen = torch.Generator().manual_seed(seed)
    metadata = {"format": "pt"}
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard_shapes in enumerate(plan, start=1):
        fname = (
            "model.safetensors"
            if len(plan) == 1
            else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        )
        shard = {n: _random_tensor(n, shp, gen, dtype) for n, shp in shard_shapes.items()}
        save_file(shard, str(out / fname), metadata=metadata)
        for name, shp in shard_shapes.items():
            weight_map[name] = fname
            total += shp.numel() * elem
        del shard
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_lora(
    out: Path,
    config: LlamaConfig,
    rank: int,
    dtype: torch.dtype,
    seed: int,
    base_ref: str,
) -> None:
    """Write one random LoRA adapter over every projection of every layer.

    ``B`` is non-zero (unlike a freshly initialised LoRA) so the adapter changes the logits.
    """
    out.mkdir(parents=True, exist_ok=True)
    lora_cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        base_model_name_or_path=base_ref,
        task_type="CAUSAL_LM",
    )
    lora_cfg.save_pretrained(str(out))
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in _param_shapes(config).items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in LORA_TARGETS:
            continue
        d_out, d_in = shape
        prefix = f"base_model.model.{module}"
        # Scaled like a trained adapter: the delta is a visible fraction of the base output.
        a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, rank, generator=gen) * INIT_STD
        tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = b.to(dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def build_random_model(
    out_dir: Path,
    preset: str = "tiny",
    num_lora_adapters: int = 4,
    lora_rank: int = 16,
    dtype: str = "float32",
    seed: int = 0,
    dims: ModelDims | None = None,
) -> Path:
    """Write a random Llama and ``num_lora_adapters`` random LoRAs under ``out_dir``.

    ``dims`` overrides ``preset`` entirely.  Returns ``out_dir``; the base model is in
    ``out_dir / "base"`` and adapter ``i`` in ``out_dir / "adapters" / f"lora{i}"``.
    Everything is a deterministic function of the arguments.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dims is None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        dims = PRESETS[preset]
    config = llama_config(dims, dtype)
    torch_dtype = DTYPES[dtype]
    base_dir = out_dir / "base"
    _write_base(base_dir, config, torch_dtype, seed)
    for i in range(num_lora_adapters):
        # Distinct seeds per adapter so no two adapters are the same function.
        _write_lora(
            out_dir / "adapters" / f"lora{i}",
            config,
            lora_rank,
            torch_dtype,
            seed=seed + 1 + i,
            base_ref=str(base_dir),
        )
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m peftserve.server.synthetic --out DIR [--preset ...]``."""
    parser = argparse.ArgumentParser(description="Write a random Llama with random LoRA adapters.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--adapters", type=int, default=4, help="number of LoRA adapters")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    # Explicit dimensions override the preset's, one by one.
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None)
    for field in ("num_key_value_heads", "intermediate_size", "vocab_size"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
        )
        if (v := getattr(args, k)) is not None
    }
    dims = replace(PRESETS[args.preset], **overrides)
    out = build_random_model(
        args.out,
        preset=args.preset,
        num_lora_adapters=args.adapters,
        lora_rank=args.rank,
        dtype=args.dtype,
        seed=args.seed,
        dims=dims,
    )
    n_params = sum(s.numel() for s in _param_shapes(llama_config(dims, args.dtype)).values())
    print(f"wrote {n_params / 1e6:.1f}M-parameter model and {args.adapters} adapters to {out}")


if __name__ == "__main__":
    main()
