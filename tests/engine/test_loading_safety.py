"""The base model loads from local safetensors only: pickle checkpoints are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peftserve.server.engine import Engine
from peftserve.server.engine.config import EngineConfig
from safetensors.torch import load_file

from .conftest import DEMO


def test_pickle_only_base_model_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "pickled-base"
    shutil.copytree(DEMO / "base", model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        Engine(EngineConfig(model_path=model_dir))
