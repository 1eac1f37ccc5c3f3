"""One real server per model family (tiny random model, local tokenizer) and its references.

Each family's model and adapters are built into a temporary directory when its first test
runs, served on 127.0.0.1 by a real server, and stopped after the family's last test
(module-scoped parametrised fixture: pytest runs the tests family by family).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from peft import PeftModel
from peftserve.v1 import generation_pb2_grpc as pb_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..conftest import ServerThread
from .models import FAMILIES, Family, build_family

torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)

# name -> kind served by every family's server (see models.adapter_config).
ADAPTERS = {
    "lora": "lora",
    "lora_b": "lora2",
    "other": "other",
    "saved": "modules_to_save",
    "prompt": "prompt_tuning",
    "prefix": "prefix_tuning",
}
# Adapters a family cannot even build with peft (nothing to serve or refuse).
UNBUILDABLE = {"mpt": {"prompt", "prefix"}}


@dataclass
class Served:
    family: Family
    server: ServerThread
    stub: Any
    base_dir: Path
    adapters_dir: Path
    tokenizer: Any
    adapters: dict[str, str]
    _models: dict[str, Any] = field(default_factory=dict)
    _references: dict[tuple[str, tuple[int, ...], int], list[int]] = field(default_factory=dict)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def model(self, adapter: str) -> Any:
        if adapter not in self._models:
            if "" not in self._models:
                base = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)
                self._models[""] = base.eval()
            if adapter:
                tree = copy.deepcopy(self._models[""])
                self._models[adapter] = PeftModel.from_pretrained(
                    tree, self.adapters_dir / adapter
                ).eval()
        return self._models[adapter]

    def reference(self, adapter: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Solo greedy ``generate`` of ``prompt`` (at least ``max_new_tokens`` tokens)."""
        key = (adapter, tuple(prompt), max_new_tokens)
        if key not in self._references:
            with torch.inference_mode():
                out = self.model(adapter).generate(
                    input_ids=torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    do_sample=False,
                )
            self._references[key] = out[0, len(prompt) :].tolist()
        return self._references[key]


def _kinds(family: Family) -> dict[str, str]:
    skip = UNBUILDABLE.get(family.name, set())
    return {name: kind for name, kind in ADAPTERS.items() if name not in skip}


@contextlib.contextmanager
def serving(family: Family, kinds: dict[str, str], out: Path, **overrides: Any) -> Iterator[Served]:
    """Build ``family`` with the adapters ``{name: kind}`` under ``out`` and serve it."""
    built = build_family(family, out, kinds)
    settings: dict[str, Any] = {"max_wait_ms": 40.0, "default_max_new_tokens": 8}
    settings.update(overrides)
    server = ServerThread(model_path=built.base, adapters_dir=built.adapters, **settings)
    server.wait_ready()
    channel = grpc.insecure_channel(server.address)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield Served(
            family=family,
            server=server,
            stub=pb_grpc.GenerationServiceStub(channel),
            base_dir=built.base,
            adapters_dir=built.adapters,
            tokenizer=AutoTokenizer.from_pretrained(built.base),
            adapters=kinds,
        )
    finally:
        channel.close()
        server.stop()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    family = FAMILIES[request.param]
    with serving(family, _kinds(family), tmp_path_factory.mktemp(family.name)) as served:
        yield served
