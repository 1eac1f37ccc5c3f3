"""The committed demo model (``models/demo``) loads with stock HF/PEFT and its adapters work.

These tests never train: they check the committed weights, through the same plain
``PeftModel.generate`` calls the accuracies in ``models/demo/README.md`` were measured with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

DEMO_DIR = Path(__file__).resolve().parents[2] / "models" / "demo"
BASE_DIR = DEMO_DIR / "base"
ADAPTERS_DIR = DEMO_DIR / "adapters"

# adapter name -> the transformation it was trained to apply to the prompt.
SKILLS: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "reverse": lambda s: s[::-1],
    "title": str.title,
}
EXPECTED_PEFT_TYPES = {"upper": "LORA", "reverse": "LORA", "title": "LOHA"}
PROMPTS = ("the quick brown fox", "hello world", "a big red cat", "peft")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(BASE_DIR))


def _load(names: list[str]) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(
        str(BASE_DIR), dtype=torch.float32, trust_remote_code=False
    )
    model = PeftModel.from_pretrained(base, str(ADAPTERS_DIR / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(ADAPTERS_DIR / name), adapter_name=name)
    model.eval()
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, PeftModel]:
    """One PeftModel per PEFT type: PEFT refuses to mix LoRA and LoHa adapters in one model."""
    by_type: dict[str, list[str]] = {}
    for name in sorted(SKILLS):
        by_type.setdefault(EXPECTED_PEFT_TYPES[name], []).append(name)
    loaded: dict[str, PeftModel] = {}
    for names in by_type.values():
        model = _load(names)
        loaded.update(dict.fromkeys(names, model))
    return loaded


@pytest.fixture(scope="module")
def model(models: dict[str, PeftModel]) -> PeftModel:
    return models["upper"]


def generate(model: PeftModel, tok: PreTrainedTokenizerBase, prompt: str) -> str:
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False)
    return str(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def test_tokenizer_special_ids_and_format(tok: PreTrainedTokenizerBase) -> None:
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<sep>") == 3
    ids = tok("the quick brown fox")["input_ids"]
    # <s>, one token per byte (id = 4 + byte), <sep>: the prefix the model was trained on.
    assert ids == [1, *(4 + b for b in b"the quick brown fox"), 3]
    assert tok.decode(ids, skip_special_tokens=True) == "the quick brown fox"


def test_tokenizer_multibyte_round_trip(tok: PreTrainedTokenizerBase) -> None:
    text = "héllo 日本 🎉"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    # A lone lead byte is not a character yet: the incremental detokenizer must hold it back.
    first_e_acute = ids[1:2]
    assert tok.decode(first_e_acute) == "\ufffd"
    assert tok.decode(ids[1:3]) == "é"


def test_base_repeats(model: PeftModel, tok: PreTrainedTokenizerBase) -> None:
    with model.disable_adapter():
        for prompt in PROMPTS:
            assert generate(model, tok, prompt) == prompt


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_adapter_transforms(
    models: dict[str, PeftModel], tok: PreTrainedTokenizerBase, name: str
) -> None:
    model = models[name]
    model.set_adapter(name)
    for prompt in PROMPTS:
        assert generate(model, tok, prompt) == SKILLS[name](prompt)


def test_upper_on_fresh_base(tok: PreTrainedTokenizerBase) -> None:
    base = AutoModelForCausalLM.from_pretrained(str(BASE_DIR), trust_remote_code=False)
    model = PeftModel.from_pretrained(base, str(ADAPTERS_DIR / "upper"))
    assert generate(model, tok, "the quick brown fox") == "THE QUICK BROWN FOX"


def test_files_are_safetensors_only() -> None:
    assert {p.name for p in ADAPTERS_DIR.iterdir()} == set(SKILLS)
    for name in SKILLS:
        files = {p.name for p in (ADAPTERS_DIR / name).iterdir()}
        assert files == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        cfg = json.loads((ADAPTERS_DIR / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == EXPECTED_PEFT_TYPES[name]
        # Never a hub id or somebody's absolute path.
        assert cfg["base_model_name_or_path"] == "models/demo/base"
    assert (BASE_DIR / "model.safetensors").is_file()
    all_files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    assert not [p for p in all_files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert sum(p.stat().st_size for p in all_files) < 20 * 1024 * 1024
