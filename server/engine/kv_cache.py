"""KV-cache verbs over transformers' ``DynamicCache``: create, select rows, trim, merge.

A running sub-batch keeps one ``DynamicCache`` (created the way ``generate`` creates it, so each
layer is the type the model's config asks for) whose rows are left-padded to a common width.
These functions are the only code that touches the cache's tensors:

* ``select_rows`` drops the rows that left (``batch_select_indices`` on every layer);
* ``trim_left`` removes leading columns that are padding in every remaining row;
* ``merge`` left-pads two caches to a common width and concatenates them along the batch.

Merging and trimming are exact only for layers whose stored keys are the whole history: plain
``DynamicLayer``s, and ``DynamicSlidingWindowLayer``s that have not yet dropped a token (their
``cumulative_length`` drives the mask, so a window that already slid cannot be re-padded).
``can_merge``/``can_trim`` say so; a cache they refuse is never merged or trimmed wrongly: its
rows simply stay a cohort of their own (see docs/engine.md).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def new_cache(model_config: Any) -> DynamicCache:
    """An empty cache laid out for ``model_config``, exactly as ``generate`` makes one."""
    return DynamicCache(config=model_config.get_text_config(decoder=True))


def _layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


def _filled(layer: Any) -> bool:
    return bool(getattr(layer, "is_initialized", False)) and layer.keys is not None


def _whole_history(layer: Any, width: int) -> bool:
    """True when ``layer`` holds every one of the ``width`` columns (nothing slid out)."""
    kind = type(layer)
    if kind is DynamicLayer:
        return True
    if kind is DynamicSlidingWindowLayer:
        held = layer.keys.shape[-2] if _filled(layer) else 0
        return held == width == layer.cumulative_length and width < layer.sliding_window - 1
    return False


def can_trim(cache: DynamicCache, width: int) -> bool:
    return all(_whole_history(layer, width) for layer in _layers(cache))


def can_merge(a: DynamicCache, a_width: int, b: DynamicCache, b_width: int) -> bool:
    """Whether ``merge`` is exact for these two caches (same layout, whole histories)."""
    la, lb = _layers(a), _layers(b)
    if len(la) != len(lb):
        return False
    width = max(a_width, b_width)
    for x, y in zip(la, lb, strict=True):
        if type(x) is not type(y):
            return False
        if not (_whole_history(x, a_width) and _whole_history(y, b_width)):
            return False
        if type(x) is DynamicSlidingWindowLayer and width >= x.sliding_window - 1:
            return False
    return True


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only ``rows`` (a device index tensor) of every layer, in that order."""
    for layer in _layers(cache):
        if _filled(layer):
            layer.batch_select_indices(rows)


def trim_left(cache: DynamicCache, columns: int) -> None:
    """Drop the first ``columns`` columns (padding in every row); only when ``can_trim``."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        if _filled(layer):
            layer.keys = layer.keys[..., columns:, :]
            layer.values = layer.values[..., columns:, :]
        if type(layer) is DynamicSlidingWindowLayer:
            layer.cumulative_length -= columns


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


def merge(a: DynamicCache, a_width: int, b: DynamicCache, b_width: int) -> None:
    """Append ``b``'s rows to ``a``, both left-padded to the wider width; only when ``can_merge``.

    The padded columns are zeros; the attention mask (kept by the running batch) hides them.
    """
    width = max(a_width, b_width)
    for x, y in zip(_layers(a), _layers(b), strict=True):
        if not _filled(y):
            continue
        if not _filled(x):
            raise ValueError("cannot merge into a cache layer that holds nothing")
        x.keys = torch.cat([_pad_left(x.keys, width - a_width), _pad_left(y.keys, width - b_width)])
        x.values = torch.cat(
            [_pad_left(x.values, width - a_width), _pad_left(y.values, width - b_width)]
        )
        if type(x) is DynamicSlidingWindowLayer:
            x.cumulative_length = width


def nbytes(cache: DynamicCache) -> int:
    """Bytes held by the cache's key and value tensors."""
    total = 0
    for layer in _layers(cache):
        if _filled(layer):
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total
