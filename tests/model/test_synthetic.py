"""The synthetic model builder writes loadable models whose LoRA adapters change the output."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


def _import_synthetic() -> ModuleType:
    # Prefer the installed package; fall back to the source tree so the test also runs from a
    # plain checkout without an editable install.
    try:
        return importlib.import_module("peftserve.server.synthetic")
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        return importlib.import_module("server.synthetic")


synthetic = _import_synthetic()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    return synthetic.build_random_model(out, preset="tiny", num_lora_adapters=2, lora_rank=4)


def test_layout_is_safetensors_only(tiny_dir: Path) -> None:
    base = tiny_dir / "base"
    assert (base / "model.safetensors").is_file()
    assert (base / "config.json").is_file()
    for name in ("lora0", "lora1"):
        files = {p.name for p in (tiny_dir / "adapters" / name).iterdir()}
        assert files == {"adapter_config.json", "adapter_model.safetensors"}
        cfg = json.loads((tiny_dir / "adapters" / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        assert cfg["r"] == 4


def test_adapters_load_and_change_logits(tiny_dir: Path) -> None:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "base"), dtype=torch.float32)
    ids = tok("hello wörld", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()

    model = PeftModel.from_pretrained(base, str(tiny_dir / "adapters" / "lora0"))
    model.load_adapter(str(tiny_dir / "adapters" / "lora1"), adapter_name="lora1")
    model.eval()
    with torch.no_grad():
        logits0 = model(input_ids=ids).logits.clone()
        model.set_adapter("lora1")
        logits1 = model(input_ids=ids).logits.clone()
        with model.disable_adapter():
            logits_off = model(input_ids=ids).logits.clone()

    assert torch.allclose(logits_off, base_logits, atol=1e-6)
    # Each adapter moves the logits, and the two adapters are different functions.
    assert (logits0 - base_logits).abs().max() > 1e-3
    assert (logits1 - base_logits).abs().max() > 1e-3
    assert (logits0 - logits1).abs().max() > 1e-3


def test_deterministic(tmp_path: Path) -> None:
    a = synthetic.build_random_model(tmp_path / "a", num_lora_adapters=1, lora_rank=2, seed=3)
    b = synthetic.build_random_model(tmp_path / "b", num_lora_adapters=1, lora_rank=2, seed=3)
    for rel in ("base/model.safetensors", "adapters/lora0/adapter_model.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_explicit_dims_and_bfloat16(tmp_path: Path) -> None:
    dims = synthetic.ModelDims(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=300,
    )
    out = synthetic.build_random_model(
        tmp_path, num_lora_adapters=1, lora_rank=2, dtype="bfloat16", dims=dims
    )
    model = AutoModelForCausalLM.from_pretrained(str(out / "base"))
    assert model.dtype == torch.bfloat16
    assert model.config.vocab_size == 300
    # The tokenizer is padded to the model's vocabulary so every id decodes.
    tok = AutoTokenizer.from_pretrained(str(out / "base"))
    assert len(tok) == 300
    assert tok.decode([299]) == "<extra_39>"
