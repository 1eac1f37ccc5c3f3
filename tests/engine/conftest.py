"""Fixtures for the engine tests: one model directory and one started engine per module.

The committed demo model (``models/demo``) is used when present; otherwise a random tiny
Llama with the demo byte-level tokenizer and random adapters (two LoRA, one IA3) is built
once per session. A LoRA saved only as pickle (``.bin``) sits next to them: the engine must
refuse it and keep going.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftserve.server.demo_tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE, save_tokenizer
from peftserve.server.engine import Engine
from peftserve.server.engine.config import EngineConfig
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "demo"
PICKLE_ADAPTER = "pickled"


@dataclass(frozen=True)
class ModelFiles:
    base: Path
    adapters: Path
    demo: bool  # the trained demo model (meaningful text) rather than random weights


def _demo_present() -> bool:
    return (DEMO / "base" / "config.json").is_file() and (DEMO / "adapters").is_dir()


def build_random_model(out: Path) -> ModelFiles:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        # Peaked logits: fewer near-ties, so batched and solo argmax agree on random weights.
        initializer_range=0.3,
    )
    base = LlamaForCausalLM(config).eval()
    base.generation_config = GenerationConfig(
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=1
    )
    base_dir = out / "base"
    base.save_pretrained(base_dir)
    save_tokenizer(base_dir)
    adapters = out / "adapters"
    lora: dict[str, Any] = {
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
        "init_lora_weights": False,
    }
    specs = {
        "upper": LoraConfig(r=4, lora_alpha=8, **lora),
        "reverse": LoraConfig(r=8, lora_alpha=16, **lora),
        "scale": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        ),
        PICKLE_ADAPTER: LoraConfig(r=2, **lora),
    }
    for index, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(1000 + index)
        peft_model = get_peft_model(copy.deepcopy(base), spec)
        if isinstance(spec, IA3Config):
            with torch.no_grad():
                for n, p in peft_model.named_parameters():
                    if "ia3_l" in n:
                        p.copy_(1.0 + 0.5 * torch.randn_like(p))
        peft_model.save_pretrained(str(adapters / name), safe_serialization=name != PICKLE_ADAPTER)
    return ModelFiles(base_dir, adapters, demo=False)


@pytest.fixture(scope="session", params=["demo", "random"])
def model_files(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ModelFiles:
    """Every engine test runs on both models: the trained demo model (real text, LoRA + LoHa)
    and a random one that adds an IA3 adapter and a pickle-only adapter to refuse."""
    if request.param == "demo":
        if not _demo_present():
            pytest.skip("models/demo is not present")
        return ModelFiles(DEMO / "base", DEMO / "adapters", demo=True)
    return build_random_model(tmp_path_factory.mktemp("random-model"))


class Reference:
    """Solo in-process ``PeftModel.generate`` runs, loaded independently of the engine."""

    def __init__(self, files: ModelFiles) -> None:
        self.files = files
        self._models: dict[str, Any] = {}

    def model(self, adapter: str) -> Any:
        if adapter not in self._models:
            base = AutoModelForCausalLM.from_pretrained(self.files.base, dtype=torch.float32).eval()
            if adapter:
                self._models[adapter] = PeftModel.from_pretrained(
                    base, self.files.adapters / adapter
                ).eval()
            else:
                self._models[adapter] = base
        return self._models[adapter]

    def generate(self, adapter: str, prompt: list[int], **kwargs: object) -> list[list[int]]:
        model = self.model(adapter)
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                **kwargs,
            )
        return [row[len(prompt) :] for row in out.tolist()]


@pytest.fixture(scope="session")
def reference(model_files: ModelFiles) -> Reference:
    return Reference(model_files)


def engine_config(files: ModelFiles, **overrides: object) -> EngineConfig:
    settings: dict[str, Any] = {
        "model_path": files.base,
        "adapters_dir": files.adapters,
        "max_wait_ms": 20.0,
        "default_max_new_tokens": 8,
    }
    settings.update(overrides)
    return EngineConfig(**settings)


@pytest.fixture(scope="session")
def aio() -> Iterator[asyncio.Runner]:
    """One event loop for the session: the engine binds to the loop it is started on."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="session")
def engine(model_files: ModelFiles, aio: asyncio.Runner) -> Iterator[Engine]:
    """The shared engine, loaded and started once; tests must leave it idle."""
    eng = Engine(engine_config(model_files))
    aio.run(eng.start())
    yield eng
    aio.run(eng.stop())


@pytest.fixture
def chunked_engine(model_files: ModelFiles, aio: asyncio.Runner) -> Iterator[Engine]:
    """A fresh engine feeding at most 16 prompt tokens per step: longer prompts go in chunks."""
    eng = Engine(engine_config(model_files, max_prefill_tokens=16))
    aio.run(eng.start())
    yield eng
    aio.run(eng.stop())
