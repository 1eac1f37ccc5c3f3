"""KV-cache verbs over transformers' ``DynamicCache``: create, reorder rows, trim, merge.

A running sub-batch keeps one ``DynamicCache`` (created the way ``generate`` creates it, so each
layer is the type the model's config asks for) whose rows are left-padded to a common width.
These functions are the only code that touches the cache's tensors.

Full-attention layers (``DynamicLayer``) are replaced by ``SlotLayer``s: a preallocated
``(row slots, heads, columns, head dim)`` buffer per layer, of which the live rows ``[0, rows)``
and columns ``[start, end)`` are the cache. ``update`` writes a step's keys in place and returns
views of the live region, so the model attends over exactly the tensors a ``DynamicLayer``
would give it (same values, same width) without copying the whole cache every step. The buffer
grows in 64-column buckets with headroom (amortised: one copy of the live region per
``max(64, width / 2)`` steps) and in row slots by doubling. On top of that:

* ``move_rows`` fills the slots of rows that left with rows from the end (a leave copies at
  most one row per leaver; the order of the rows changes, and the caller follows it); the
  buffer keeps its slots for the next joiners and is reallocated to fit only once at most a
  quarter of them are live (``shrink``: a copy of at most a quarter of the buffer);
* ``trim_left`` drops leading all-padding columns by moving ``start`` (no copy);
* ``merge`` writes joiners into free row slots, left-padded with zeros to the live width
  (and, when a joiner is wider, widens the live region to the left first): one reservation,
  then a copy of the joiners' own rows only.

The buffers are made inside the model's forward, so they are inference tensors: the verbs that
write them outside a forward (``drop_rows``, ``merge``) run under ``torch.inference_mode()``.

Every other layer type (sliding windows, indexed, linear, ...) stays the class transformers
made and gets the same verbs as before: ``batch_select_indices``, slicing, ``torch.cat``.
Merging and trimming are exact only for layers whose stored keys are the whole history:
``SlotLayer``/``DynamicLayer``, and ``DynamicSlidingWindowLayer``s that have not yet dropped a
token (their ``cumulative_length`` drives the mask, so a window that already slid cannot be
re-padded). ``can_merge``/``can_trim`` say so; a cache they refuse is never merged or trimmed
wrongly: its rows simply stay a cohort of their own (see docs/engine.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

BUCKET = 64  # column capacities are multiples of this


def _alloc(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A buffer of ``shape`` like ``like``, uninitialised: every cell a view ever shows is
    written first (``update`` writes the new columns, ``append_rows`` and ``widen_left`` write
    their padding, ``reserve``/``shrink`` copy the live region), so zeroing it would only cost
    (a prefill's buffer has 64 columns of headroom it never uses when it is merged: zeroing it
    was ~12% of a joiner's prefill). tests/engine/test_kv_cache.py runs every verb with
    NaN-filled buffers to hold that."""
    return like.new_empty(shape)


def _bucket(columns: int) -> int:
    return -(-columns // BUCKET) * BUCKET


class SlotLayer(DynamicLayer):
    """A full-attention cache layer over a preallocated buffer, written in place.

    ``keys``/``values`` are always the live views ``buffer[:rows, :, start:end]``, so code that
    reads them (or ``get_seq_length``/``get_mask_sizes``) sees what a ``DynamicLayer`` holds.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.rows = 0
        self.start = 0
        self.end = 0

    # ---- transformers' layer interface ----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        rows, heads, columns, _ = key_states.shape
        capacity = _bucket(columns + BUCKET)
        self._k = _alloc(key_states, (rows, heads, capacity, key_states.shape[-1]))
        self._v = _alloc(value_states, (rows, heads, capacity, value_states.shape[-1]))
        self.rows, self.start, self.end = rows, 0, 0
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Once per layer and step: kept to a capacity check, two writes and two views.
        if self._k is None or self._v is None:
            self.lazy_initialization(key_states, value_states)
        rows, columns = key_states.shape[0], key_states.shape[-2]
        if rows != self.rows:
            raise ValueError(f"{rows} rows of keys for a cache of {self.rows}")
        end = self.end + columns
        k, v = self._buffers()
        if end > k.shape[2]:
            self.reserve(rows, 0, columns)
            k, v = self._buffers()
            end = self.end + columns
        k[:rows, :, self.end : end] = key_states
        v[:rows, :, self.end : end] = value_states
        self.end = end
        self.keys = k[:rows, :, self.start : end]
        self.values = v[:rows, :, self.start : end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start if self.is_initialized else 0

    def reset(self) -> None:
        self._k = self._v = None
        self.rows = self.start = self.end = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized:
            self.end = max(self.start, self.end + tokens_to_remove)
            self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            k, v = self._buffers()
            self._k, self._v = k.index_select(0, indices), v.index_select(0, indices)
            self.rows = int(indices.shape[0])
            self._refresh()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            index = torch.arange(self.rows, device=self.device).repeat_interleave(repeats)
            self.batch_select_indices(index)

    # ---- the verbs the running batch uses ----
    @property
    def capacity(self) -> tuple[int, int]:
        """(row slots, columns) of the buffer."""
        k = self._k
        return (0, 0) if k is None else (int(k.shape[0]), int(k.shape[2]))

    def reserve(self, rows: int, left: int, right: int) -> None:
        """Make room for ``rows`` rows, ``left`` columns before ``start`` and ``right`` after
        ``end``; when the buffer is too small, one copy of the live region into a larger one."""
        k, v = self._buffers()
        slots, columns = int(k.shape[0]), int(k.shape[2])
        if slots >= rows and self.start >= left and columns - self.end >= right:
            return
        width = self.end - self.start
        new_slots = slots if slots >= rows else max(rows, 2 * slots)
        new_columns = _bucket(left + width + right + max(BUCKET, width // 2))
        start = left
        new_k = _alloc(k, (new_slots, k.shape[1], new_columns, k.shape[3]))
        new_v = _alloc(v, (new_slots, v.shape[1], new_columns, v.shape[3]))
        live = slice(self.start, self.end)
        new_k[: self.rows, :, start : start + width] = k[: self.rows, :, live]
        new_v[: self.rows, :, start : start + width] = v[: self.rows, :, live]
        self._k, self._v = new_k, new_v
        self.start, self.end = start, start + width

    def shrink(self) -> bool:
        """Reallocate to fit when at most a quarter of the row slots are live (so the copy is
        at most a quarter of what the buffer held); True when it did."""
        k, v = self._buffers()
        slots = int(k.shape[0])
        if slots < 8 or self.rows * 4 > slots:
            return False
        width = self.end - self.start
        columns = _bucket(width + max(BUCKET, width // 2))
        live = slice(self.start, self.end)
        new_k = _alloc(k, (max(1, 2 * self.rows), k.shape[1], columns, k.shape[3]))
        new_v = _alloc(v, (max(1, 2 * self.rows), v.shape[1], columns, v.shape[3]))
        new_k[: self.rows, :, :width] = k[: self.rows, :, live]
        new_v[: self.rows, :, :width] = v[: self.rows, :, live]
        self._k, self._v = new_k, new_v
        self.start, self.end = 0, width
        self._refresh()
        return True

    def widen_left(self, columns: int) -> None:
        """Prepend ``columns`` zero (padding) columns to every live row."""
        if columns <= 0:
            return
        self.reserve(self.rows, columns, 0)
        k, v = self._buffers()
        self.start -= columns
        k[: self.rows, :, self.start : self.start + columns] = 0
        v[: self.rows, :, self.start : self.start + columns] = 0
        self._refresh()

    def append_rows(self, sources: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write each (keys, values) source, no wider than the live width, into the next free
        row slots, left-padded with zeros."""
        added = sum(int(keys.shape[0]) for keys, _ in sources)
        self.reserve(self.rows + added, 0, 0)
        k, v = self._buffers()
        slot = self.rows
        for keys, values in sources:
            n, width = int(keys.shape[0]), int(keys.shape[-2])
            pad_end = self.end - width
            rows = slice(slot, slot + n)
            k[rows, :, self.start : pad_end] = 0
            v[rows, :, self.start : pad_end] = 0
            k[rows, :, pad_end : self.end] = keys
            v[rows, :, pad_end : self.end] = values
            slot += n
        self.rows = slot
        self._refresh()

    def move_rows(self, targets: Sequence[int], sources: Sequence[int], rows: int) -> None:
        """Copy live rows ``sources`` into slots ``targets``, then keep the first ``rows``."""
        k, v = self._buffers()
        live = slice(self.start, self.end)
        for target, source in zip(targets, sources, strict=True):
            k[target, :, live] = k[source, :, live]
            v[target, :, live] = v[source, :, live]
        self.rows = rows
        self._refresh()

    def trim_left(self, columns: int) -> None:
        self.start = min(self.end, self.start + columns)
        self._refresh()

    def nbytes(self) -> int:
        """Bytes of the buffer (capacity, not only the live region)."""
        if self._k is None or self._v is None:
            return 0
        return self._k.nbytes + self._v.nbytes

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is None or self._v is None:
            raise ValueError("this cache layer holds nothing yet")
        return self._k, self._v

    def _refresh(self) -> None:
        k, v = self._buffers()
        self.keys = k[: self.rows, :, self.start : self.end]
        self.values = v[: self.rows, :, self.start : self.end]


def new_cache(model_config: Any) -> DynamicCache:
    """An empty cache laid out for ``model_config`` as ``generate`` makes one, its
    full-attention layers as ``SlotLayer``s (every other layer type as transformers made it)."""
    cache = DynamicCache(config=model_config.get_text_config(decoder=True))
    cache.layers = [SlotLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = SlotLayer
    return cache


def _layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


def _filled(layer: Any) -> bool:
    return bool(getattr(layer, "is_initialized", False)) and layer.keys is not None


def _whole_history(layer: Any, width: int) -> bool:
    """True when ``layer`` holds every one of the ``width`` columns (nothing slid out)."""
    kind = type(layer)
    if kind is SlotLayer or kind is DynamicLayer:
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
    """Keep only ``rows`` (a device index tensor) of every layer, in that order (a copy)."""
    for layer in _layers(cache):
        if _filled(layer):
            layer.batch_select_indices(rows)


def leave_order(keep: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """Where the rows ``keep`` (ascending indices) end up when the rows that left are dropped
    by filling their slots with kept rows from the end: (new order as old indices, slots
    filled, rows moved into them). Rows already in the first ``len(keep)`` slots stay put."""
    n = len(keep)
    kept = set(keep)
    holes = [i for i in range(n) if i not in kept]
    movers = [i for i in keep if i >= n]
    order = list(range(n))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    return order, holes, movers


@torch.inference_mode()
def drop_rows(cache: DynamicCache, order: list[int], holes: list[int], movers: list[int]) -> None:
    """Apply ``leave_order``'s result: slot layers copy the movers only, others select rows."""
    index: torch.Tensor | None = None
    for layer in _layers(cache):
        if not _filled(layer):
            continue
        if type(layer) is SlotLayer:
            layer.move_rows(holes, movers, len(order))
            layer.shrink()
        else:
            if index is None:
                index = torch.tensor(order, dtype=torch.long, device=layer.keys.device)
            layer.batch_select_indices(index)


def trim_left(cache: DynamicCache, columns: int) -> None:
    """Drop the first ``columns`` columns (padding in every row); only when ``can_trim``."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        if type(layer) is SlotLayer:
            if _filled(layer):
                layer.trim_left(columns)
            continue
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


@torch.inference_mode()
def merge(a: DynamicCache, a_width: int, others: Sequence[tuple[DynamicCache, int]]) -> None:
    """Append the rows of every ``(cache, width)`` in ``others`` to ``a``, in order, all
    left-padded to the widest width; only when ``can_merge`` holds for each.

    Slot layers widen once and copy only the joiners' rows; other layers concatenate once.
    The padded columns are zeros; the attention mask (kept by the running batch) hides them.
    """
    width = max([a_width] + [w for _, w in others])
    for i, x in enumerate(_layers(a)):
        ys = [(_layers(cache)[i], w) for cache, w in others]
        ys = [(y, w) for y, w in ys if _filled(y)]
        if not ys:
            continue
        if not _filled(x):
            raise ValueError("cannot merge into a cache layer that holds nothing")
        if type(x) is SlotLayer:
            x.widen_left(width - a_width)
            x.append_rows([(y.keys, y.values) for y, _ in ys])
            continue
        x.keys = torch.cat(
            [_pad_left(x.keys, width - a_width)] + [_pad_left(y.keys, width - w) for y, w in ys]
        )
        x.values = torch.cat(
            [_pad_left(x.values, width - a_width)] + [_pad_left(y.values, width - w) for y, w in ys]
        )
        if type(x) is DynamicSlidingWindowLayer:
            x.cumulative_length = width


def nbytes(cache: DynamicCache) -> int:
    """Bytes of the live key and value tensors (what ``generate``'s cache would hold)."""
    total = 0
    for layer in _layers(cache):
        if _filled(layer):
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total


def capacity_nbytes(cache: DynamicCache) -> int:
    """Bytes allocated for the cache: slot layers' whole buffers, other layers' tensors."""
    total = 0
    for layer in _layers(cache):
        if type(layer) is SlotLayer:
            total += layer.nbytes()
        elif _filled(layer):
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total
