"""The step: one model forward over the rows of one sub-batch (or one prefill).

It picks the model the rows' adapters need and calls its forward the way ``generate`` does:
``cache`` in and out, ``use_cache=True``, ``logits_to_keep=1`` where the model takes it, explicit
``position_ids`` where it takes them, and the last position's logits as a float32 copy.

Model choice: base rows alone run on the untouched base model; rows of mixed adapters (of any
routable PEFT type) and base rows run on the registry's routed tree, one forward, each row
through its own adapter (``routing.py``: the row assignment is made once per forward); rows of
a non-mixable adapter run on its type group's ``PeftModel`` after ``set_adapter`` (called only
when the active adapter changes: peft's ``set_adapter`` walks every module). While a beam search
is running through ``generate`` on a group's model (``lend``), the loop never switches that
model's active adapter: rows of another non-mixable adapter of that group wait. The routed tree
shares no state with the group models, so its rows never wait for a beam search.

The forward itself is ``fastpath.FastForwards.run`` where it applies (Llama-style decoders:
the same torch ops as the model's forward, without transformers' per-call machinery; it
refuses itself for anything it does not reproduce bit for bit), else the model's own.
``forward_fused`` runs several forwards of one key as one fast-forward pass (a joiner's prefill
with a decode step), or nothing when the fast forward refuses any of them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from .fastpath import FastForwards, enabled_by_environment
from .peft_guard import guard_models
from .registry import BASE_ROW_MARKER, ROUTED_GROUP, AdapterRegistry
from .rows import Row
from .running import SubBatchKey

# One forward's part of a fused pass: (rows, input_ids, mask or None, positions, cache).
FusedInputs = tuple[list[Row], torch.Tensor, torch.Tensor | None, torch.Tensor, DynamicCache]


def adapter_name(row: Row) -> str:
    adapter = row.job.prepared.adapter
    return adapter.name if adapter is not None else BASE_ROW_MARKER


class ModelStep:
    """Runs forwards on the worker thread; knows which model serves which rows."""

    def __init__(self, registry: AdapterRegistry, device: torch.device) -> None:
        self.registry = registry
        self.device = device
        base: Any = registry.base
        params = inspect.signature(base.forward).parameters
        self.takes_position_ids = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params
        self.model_config = base.config
        # The bit-identical fast forward (decided per model at its first forward).
        self.fast = FastForwards(
            enabled=self.takes_position_ids
            and self.takes_logits_to_keep
            and enabled_by_environment()
        )
        # (model, adapter) a running beam search's generate is using; None when no beam runs.
        self._lent: tuple[Any, str | None] | None = None

    def lend(self, model: Any, adapter: str | None) -> None:
        self._lent = (model, adapter)

    def take_back(self) -> None:
        self._lent = None

    def beam_model(self, group: str, adapter: str | None) -> Any:
        """The model a beam search of ``adapter`` (None = base) runs ``generate`` on."""
        if adapter is None:
            return self.registry.base
        if group == ROUTED_GROUP:
            group = self.registry.type_group(adapter)
        model: Any = self.registry.groups[group].model
        model.set_adapter(adapter)
        return model

    def can_run(self, key: SubBatchKey) -> bool:
        """False while a beam search holds this key's model on another adapter."""
        if self._lent is None or key.adapter is None or key.group in ("base", ROUTED_GROUP):
            return True
        model, adapter = self._lent
        return model is not self.registry.groups[key.group].model or adapter == key.adapter

    def _model(self, key: SubBatchKey, rows: list[Row], tokens: list[int] | None = None) -> Any:
        """The model for ``rows``; on the routed tree each row's adapter is assigned to its
        ``tokens[i]`` consecutive input rows (1 each when None: one input row per row)."""
        if key.group == "base":
            return self.registry.base
        if key.group == ROUTED_GROUP:
            tree = self.registry.routed
            names = [adapter_name(row) for row in rows]
            if tokens is not None:
                names = [name for name, n in zip(names, tokens, strict=True) for _ in range(n)]
            tree.assign(names)
            if not tree.routing.groups:
                # Only base rows: the untouched base model (its tensors are the tree's own).
                return self.registry.base
            return tree.model
        assert key.adapter is not None, "a type group's key names its adapter"
        model: Any = self.registry.groups[key.group].model
        if model.active_adapter != key.adapter:
            model.set_adapter(key.adapter)
        return model

    def forward(
        self,
        key: SubBatchKey,
        rows: list[Row],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """One forward; the (rows, vocab) float32 logits of each row's last position."""
        model = self._model(key, rows)
        kwargs: dict[str, Any] = {}
        if self.takes_position_ids:
            kwargs["position_ids"] = position_ids
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        # Whatever the forward raises, no hook or active-adapter change survives it.
        with guard_models(self.registry.models()), torch.inference_mode():
            logits = self.fast.run(model, input_ids, attention_mask, position_ids, cache)
            if logits is None:
                out = model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    cache=cache,
                    use_cache=True,
                    return_dict=True,
                    **kwargs,
                )
                logits = out.logits
        return logits[:, -1].to(copy=True, dtype=torch.float32)

    def forward_fused(
        self, key: SubBatchKey, parts: list[FusedInputs]
    ) -> list[torch.Tensor] | None:
        """The forwards of ``parts`` (each: rows, input_ids, mask, positions, cache; all of
        ``key``) in one fused pass of the fast forward (``FastForward.fused``), each part's
        (rows, vocab) float32 logits as ``forward`` gives them for that part alone; None when
        the fast forward does not take them all (nothing was run: call ``forward`` per part)."""
        if not self.fast.enabled or not self.fast.fuse:
            return None
        rows = [row for part in parts for row in part[0]]
        # On the routed tree the forward's input rows are tokens: each row's prompt positions.
        tokens = [int(part[1].shape[1]) for part in parts for _ in part[0]]
        model = self._model(key, rows, tokens)
        inputs = [(ids, mask, positions, cache) for _, ids, mask, positions, cache in parts]
        with guard_models(self.registry.models()), torch.inference_mode():
            logits = self.fast.run_fused(model, inputs)
        if logits is None:
            return None
        return [lg[:, -1].to(copy=True, dtype=torch.float32) for lg in logits]


def prefill_inputs(
    prompts: list[tuple[int, ...]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Left-padded (input_ids, attention_mask, position_ids, pads) for prompts fed at once.

    Positions as ``generate`` makes them: ``cumsum(mask) - 1``, 0 on padding.
    """
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = [[pad_token_id] * pad + list(p) for p, pad in zip(prompts, pads, strict=True)]
    mask_rows = [[0] * pad + [1] * len(p) for p, pad in zip(prompts, pads, strict=True)]
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    mask = torch.tensor(mask_rows, dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return input_ids, mask, positions, pads
