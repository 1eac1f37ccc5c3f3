"""Adapter registry: loads every adapter directory and groups adapters by PEFT type.

Why groups: one ``PeftModel`` cannot hold adapters of different PEFT types (LoRA + IA3 raises
``ValueError``), so each type gets its own ``PeftModel``. The groups must not each hold a copy
of the base weights, so every group wraps its own *module tree* whose parameters and buffers
are the very tensors of the base model (a ``deepcopy`` whose memo maps each tensor to itself;
``shares_base_weights`` checks it by ``data_ptr``).

Why ``mixed_batching``: peft's ``adapter_names=`` routes each row of a batch through its own
adapter. It was measured to give rows identical to solo runs for plain LoRA (including
"__base__" rows), while for IA3 it is silently ignored. Only plain LoRA adapters (no DoRA,
no aLoRA) are therefore mixed in one batch; every other adapter runs in batches of its own.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel

from .errors import AdapterLoadError
from .types import AdapterInfo

logger = logging.getLogger(__name__)

# peft's marker for "no adapter" rows in an ``adapter_names`` batch.
BASE_ROW_MARKER = "__base__"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
MIXABLE_PEFT_TYPES = frozenset({"LORA"})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def share_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the same parameter and buffer tensors (no weight copy)."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def shares_base_weights(base: torch.nn.Module, tree: torch.nn.Module) -> bool:
    """True when every base parameter's storage is also used by ``tree``."""
    tree_ptrs = {p.data_ptr() for p in tree.parameters()}
    return all(p.data_ptr() in tree_ptrs for p in base.parameters())


def inspect_adapter(path: Path) -> AdapterInfo:
    """Read an adapter directory's config and weights file; refuse anything but safetensors."""
    name = path.name
    if name in ("", BASE_ROW_MARKER):
        raise AdapterLoadError(name, "reserved adapter name")
    config_path = path / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterLoadError(name, f"cannot read {config_path.name}: {e}") from e
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS_FILE).is_file():
            # Pickle files can run arbitrary code on load: never touch them.
            raise AdapterLoadError(
                name, f"only pickle weights ({PICKLE_WEIGHTS_FILE}); need {WEIGHTS_FILE}"
            )
        raise AdapterLoadError(name, f"no {WEIGHTS_FILE}")
    peft_type = str(config.get("peft_type", "")).upper()
    if not peft_type:
        raise AdapterLoadError(name, "adapter_config.json has no peft_type")
    targets = config.get("target_modules") or ()
    target_modules = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    rank = config.get("r")
    mixable = (
        peft_type in MIXABLE_PEFT_TYPES
        and not config.get("use_dora", False)
        and not config.get("alora_invocation_tokens")
    )
    return AdapterInfo(
        name=name,
        peft_type=peft_type,
        path=str(path),
        sha256=sha256_file(weights),
        rank=int(rank) if isinstance(rank, int) else None,
        target_modules=target_modules,
        mixed_batching=mixable,
    )


@dataclass
class TypeGroup:
    """One ``PeftModel`` holding every loaded adapter of one PEFT type."""

    peft_type: str
    model: PeftModel
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)


class AdapterRegistry:
    """Loaded adapters by name, the type group each lives in, and the plain base model."""

    def __init__(self, base: torch.nn.Module, adapters_dir: Path | None) -> None:
        self.base = base
        self.groups: dict[str, TypeGroup] = {}
        self._by_name: dict[str, AdapterInfo] = {}
        self.load_errors: dict[str, AdapterLoadError] = {}
        if adapters_dir is not None:
            self._load_all(adapters_dir)

    def _load_all(self, adapters_dir: Path) -> None:
        candidates = sorted(p for p in adapters_dir.iterdir() if p.is_dir())
        infos: list[AdapterInfo] = []
        for path in candidates:
            if not (path / "adapter_config.json").is_file():
                continue
            try:
                infos.append(inspect_adapter(path))
            except AdapterLoadError as e:
                self._refuse(e)
        for info in infos:
            try:
                self._attach(info)
            except AdapterLoadError as e:
                self._refuse(e)

    def _refuse(self, error: AdapterLoadError) -> None:
        # The server keeps running without the adapter; requests naming it get NOT_FOUND.
        logger.error("skipping adapter: %s", error.message)
        self.load_errors[error.adapter] = error

    def _attach(self, info: AdapterInfo) -> None:
        group = self.groups.get(info.peft_type)
        try:
            if group is None:
                tree = share_weights_copy(self.base)
                model = PeftModel.from_pretrained(
                    tree, info.path, adapter_name=info.name, is_trainable=False
                )
                group = TypeGroup(peft_type=info.peft_type, model=model)
                self.groups[info.peft_type] = group
            else:
                group.model.load_adapter(info.path, adapter_name=info.name, is_trainable=False)
        except Exception as e:  # peft raises many types; all mean "this adapter is unusable"
            raise AdapterLoadError(info.name, f"{type(e).__name__}: {e}") from e
        device = next(self.base.parameters()).device
        group.model.to(device)
        group.model.eval()
        group.adapters[info.name] = info
        self._by_name[info.name] = info

    def get(self, name: str) -> AdapterInfo | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def infos(self) -> list[AdapterInfo]:
        return [self._by_name[n] for n in self.names()]

    @property
    def mixed_group(self) -> TypeGroup | None:
        """The group whose model serves mixed batches (and base rows), if any."""
        group = self.groups.get("LORA")
        if group is None or not any(a.mixed_batching for a in group.adapters.values()):
            return None
        return group
