"""Per-row adapter routing: rows of several adapters, of any routable PEFT type, in one forward.

Why not peft's ``adapter_names``: for every forward peft walks the model twice (a check that
the names exist, then one ``forward_pre_hook`` registered on every LoRA layer), every LoRA
layer then rebuilds each adapter's row list in Python (rows x adapters) and gathers the rows
with a Python list; and only LoRA honours it at all (LoHa, LoKr and IA3 silently ignore it),
so each of their adapters cost a forward of its own, base weights included.

Here one plain module tree over the base model's tensors (``share_weights_copy``: no weight
is copied) has every adapted leaf module replaced by a ``RoutedLayer``: its base module plus,
per adapter, a function computing exactly what that adapter's own peft layer computes after
its base call in a solo forward (same ops, same order, same dtype casts; IA3 scales its rows'
output, or on a feedforward module its rows' input to the base module), reading the weights
of the peft layer of the adapter's type group (no copy either). The row assignment is made
once per forward (``Routing.assign``: per adapter an index tensor, or a slice where its rows
are contiguous, or "all rows"), and every layer reads it. Where some adapter's rows are
interleaved with others', a layer gathers its input once in adapter order (q/k/v, and gate/up,
share one gather, cut once into the adapters' spans, per forward), computes each adapter's
increment on its span and adds them all with one ``index_add_``: two operations per layer
instead of two per adapter and layer, the same additions (``RoutedLayer._forward_gathered``).
What a layer adds where is worked out once per assignment and kept with it (``_Plan``; the last
few assignments are kept, since decode steps repeat theirs and alternate with the joiners'
prefills). Per call, the small things cost: a plain ``nn.Linear`` base is applied as its
``forward`` would be, without ``nn.Module.__call__``, while no hook asks for the call; LoRA's
scaling multiplies the fresh product in place, by a 0-dim tensor of the value torch makes of
the Python number (``multiplier``); the same bits, fewer tensors. Each row therefore gets the
numbers its solo forward computes; ``tests/engine/test_routing.py`` checks the logits bit for
bit, the fidelity tests (``tests/engine/test_fidelity.py``, ``tests/families``) token by token.

Routable: the peft layer classes in ``_DELTAS`` (LoRA ``Linear``/``Embedding`` without a
variant such as DoRA; LoHa, LoKr and IA3 ``Linear``) in eval mode; an adapter with any other
layer (convolutions, peft's ``ParamWrapper`` over expert parameters) is not routable and keeps
its own sub-batch (``mixing.py``). A layer fed flattened tokens (OPT's MLP) sees more input
rows than the forward has: it raises ``RoutingError`` rather than route wrong rows, which the
registry's load-time probe turns into "served alone".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.ia3 import layer as ia3_layer
from peft.tuners.loha import layer as loha_layer
from peft.tuners.lokr import layer as lokr_layer
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional

from .peft_guard import HookWatch

# peft's marker for "no adapter" rows; such rows get the base layer's output only.
BASE_ROW_MARKER = "__base__"

# Rows of one adapter: None = every row of the forward, a slice, or an index tensor.
Rows = slice | torch.Tensor | None
# Bytes of LoHa/LoKr delta weights kept between forwards (see ``_lycoris_linear``).
DELTA_CACHE_BYTES = 256 << 20
# Row assignments kept with their layers' plans (a step's decode forward and its joiners'
# prefill alternate between two; a few more cost nothing).
KEPT_ASSIGNMENTS = 4


class RoutingError(RuntimeError):
    """A routed layer cannot route this forward's rows (e.g. it is fed flattened tokens)."""


class Routing:
    """The row assignment of the current forward, shared by every ``RoutedLayer`` of a tree.

    With rows of some adapter interleaved with others (an index tensor), the layers take the
    gathered path (``RoutedLayer._forward_gathered``): ``order`` lists the rows of every adapter
    group, group after group (``spans``: where each group's rows lie in it), a layer's input is
    gathered in that order once and cut into its groups' spans once (``views``: the same input
    tensor, e.g. the one hidden state q/k/v or gate/up all read, is gathered and cut once per
    forward), each adapter's delta is computed on its span, and every delta of the layer is
    added back with one ``index_add_``.

    An assignment is kept, with what each layer worked out for it (its ``_Plan``), for the next
    forwards of the same rows: most decode steps route the rows of the step before, and a
    step's decode forward and its joiners' prefill alternate between two assignments.
    """

    def __init__(self, keep: int = KEPT_ASSIGNMENTS) -> None:
        self.rows = 0
        self.groups: tuple[tuple[str, Rows], ...] = ()
        self.order: torch.Tensor | None = None  # None: the groups are used as they are
        self.spans: tuple[tuple[str, slice], ...] = ()
        self.plans: dict[RoutedLayer, _Plan] = {}
        self._keep = keep
        self._current: _Assignment | None = None
        self._kept: dict[tuple[str, ...], _Assignment] = {}  # oldest first
        self._source: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []

    def assign(self, names: Sequence[str], device: torch.device) -> None:
        """Route row ``i`` through adapter ``names[i]`` (``BASE_ROW_MARKER``: none)."""
        # A new forward: never reuse the last forward's gathered input.
        self._source = None
        self._views = []
        key = tuple(names)
        current = self._current
        if current is not None and key == current.names:
            return  # the same rows as the last forward (most decode steps)
        found = self._kept.pop(key, None)
        if found is None or found.device != device:
            found = _Assignment.of(key, device)
        self._kept[key] = found  # now the newest
        if len(self._kept) > self._keep:
            del self._kept[next(iter(self._kept))]
        self._current = found
        self.rows = len(key)
        self.groups = found.groups
        self.order = found.order
        self.spans = found.spans
        self.plans = found.plans

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``'s rows of each group in ``spans`` (gathered once for the layers fed ``x``)."""
        if self._source is not x:
            assert self.order is not None
            gathered = x.index_select(0, self.order)
            self._views = [gathered[span] for _, span in self.spans]
            self._source = x  # held: no other tensor can take its identity meanwhile
        return self._views

    def order_of(self, groups: tuple[int, ...]) -> torch.Tensor:
        """The rows of the groups at ``groups`` in ``spans``, as ``order`` lists them."""
        assert self._current is not None and self.order is not None
        orders = self._current.orders
        found = orders.get(groups)
        if found is None:
            if len(groups) == len(self.spans):
                found = self.order
            else:
                found = torch.cat([self.order[self.spans[i][1]] for i in groups])
            orders[groups] = found
        return found

    def forget(self, layer: RoutedLayer) -> None:
        """Drop ``layer``'s plans (its adapters changed)."""
        for kept in self._kept.values():
            kept.plans.pop(layer, None)

    def clear(self) -> None:
        """Forget every assignment (and the plans made for them): the layers changed."""
        self.rows = 0
        self.groups = ()
        self.order = None
        self.spans = ()
        self.plans = {}
        self._current = None
        self._kept = {}
        self._source = None
        self._views = []


@dataclass(eq=False)
class _Assignment:
    """One row assignment: its groups, and where each lies in ``order`` (interleaved rows)."""

    names: tuple[str, ...]
    device: torch.device
    groups: tuple[tuple[str, Rows], ...]
    order: torch.Tensor | None
    spans: tuple[tuple[str, slice], ...]
    orders: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    plans: dict[RoutedLayer, _Plan] = field(default_factory=dict)

    @classmethod
    def of(cls, names: tuple[str, ...], device: torch.device) -> _Assignment:
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            positions.setdefault(name, []).append(i)
        positions.pop(BASE_ROW_MARKER, None)
        groups: list[tuple[str, Rows]] = []
        interleaved = False
        for name, rows in positions.items():
            if len(rows) == len(names):
                groups.append((name, None))
            elif rows[-1] - rows[0] + 1 == len(rows):
                groups.append((name, slice(rows[0], rows[-1] + 1)))
            else:
                groups.append((name, torch.tensor(rows, dtype=torch.long, device=device)))
                interleaved = True
        if not interleaved:
            return cls(names, device, tuple(groups), None, ())
        order: list[int] = []
        spans: list[tuple[str, slice]] = []
        for name, rows in positions.items():
            spans.append((name, slice(len(order), len(order) + len(rows))))
            order.extend(rows)
        order_tensor = torch.tensor(order, dtype=torch.long, device=device)
        return cls(names, device, tuple(groups), order_tensor, tuple(spans))


@dataclass(frozen=True, eq=False)
class _Plan:
    """What one layer does on the gathered path for one assignment and input/result dtypes.

    ``adds``: (increment, index in ``Routing.spans``) of every adapter whose increment, of the
    result's dtype, is added as it is (``result + increment`` keeps that dtype): computed on the
    group's span and added with one ``index_add_`` over ``order`` (their rows, span after span).
    ``casts``: (increment, span index, rows, dtype) of the others (an adapter of another dtype
    than the result, or whose increment's dtype is known only once computed): the sum is cast
    as the solo forward casts it and copied back to the rows.
    """

    x_dtype: torch.dtype
    result_dtype: torch.dtype
    adds: tuple[tuple[Callable[[torch.Tensor], torch.Tensor], int], ...]
    order: torch.Tensor
    casts: tuple[tuple[Callable[[torch.Tensor], torch.Tensor], int, torch.Tensor, torch.dtype], ...]


@dataclass(frozen=True)
class Delta:
    """One adapter on one layer, as its solo forward applies it around the base call.

    Additive (LoRA, LoHa, LoKr): ``increment(x)`` is added to the base result, the sum then
    cast to the base result's dtype (LoRA) or the input's (LyCORIS). Multiplicative (IA3):
    ``output_scale`` maps the rows' base result to their output, or ``input_scale`` maps the
    rows' input to what the base layer is fed instead (IA3 on a feedforward module).
    """

    increment: Callable[[torch.Tensor], torch.Tensor] | None = None
    dtype: torch.dtype | None = None  # the increment's (the adapter weights')
    to_input_dtype: bool = False
    output_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    input_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    cached_bytes: int = 0


def _replace_rows(
    tensor: torch.Tensor, rows: Rows, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``tensor`` with ``rows`` replaced by ``fn`` of them (in place where they are a part)."""
    if rows is None:
        return fn(tensor)
    if isinstance(rows, slice):
        tensor[rows] = fn(tensor[rows])
    else:
        tensor.index_copy_(0, rows, fn(tensor.index_select(0, rows)))
    return tensor


class RoutedLayer(nn.Module):
    """A base module plus the adapters that target it; each row gets its own adapter's delta."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas: dict[str, Delta] = {}
        self.scales_input = False  # some adapter here transforms the base layer's input
        self.additive = True  # every adapter here adds an increment (no IA3 scaling)
        self._routing = routing
        # A plain nn.Linear base is applied as its forward would be, without nn.Module.__call__
        # (~3 us a call), while no hook anywhere asks for the call (``HookWatch``, as the fast
        # forward checks its model).
        self._linear: dict[str, Any] | None = None
        if type(base_layer) is nn.Linear:
            self._linear = base_layer._parameters
        self._hooks = HookWatch(base_layer)

    def set_delta(self, name: str, delta: Delta | None) -> None:
        if delta is None:
            self.deltas.pop(name, None)
        else:
            self.deltas[name] = delta
        self.scales_input = any(d.input_scale is not None for d in self.deltas.values())
        self.additive = all(d.increment is not None for d in self.deltas.values())
        self._routing.forget(self)

    def _check_rows(self, x: torch.Tensor, rows: Rows) -> None:
        if rows is not None and x.shape[0] != self._routing.rows:
            raise RoutingError(
                f"a routed layer got {x.shape[0]} input rows for a forward of "
                f"{self._routing.rows} rows (flattened tokens?)"
            )

    def _base_input(self, x: torch.Tensor) -> torch.Tensor:
        fed = x
        for name, rows in self._routing.groups:
            delta = self.deltas.get(name)
            if delta is None or delta.input_scale is None:
                continue
            self._check_rows(x, rows)
            if rows is not None and fed is x:
                fed = x.clone()  # the other rows keep their input exactly
            fed = _replace_rows(fed, rows, delta.input_scale)
        return fed

    def _base(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        params = self._linear
        if params is not None and not args and not kwargs and not self._hooks.hooked():
            return functional.linear(x, params["weight"], params["bias"])  # nn.Linear.forward
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._routing.order is not None and self.additive:
            return self._forward_gathered(x, *args, **kwargs)
        fed = self._base_input(x) if self.scales_input else x
        result = self._base(fed, args, kwargs)
        for name, rows in self._routing.groups:
            delta = self.deltas.get(name)
            if delta is None:
                continue  # this adapter does not target this module
            self._check_rows(x, rows)
            if delta.output_scale is not None:
                result = _replace_rows(result, rows, delta.output_scale)
                continue
            if delta.increment is None:
                continue  # applied to the base layer's input
            dtype = x.dtype if delta.to_input_dtype else result.dtype
            if rows is None:
                increment = delta.increment(x)
                if increment.dtype == result.dtype == dtype:
                    result.add_(increment)  # the same addition as ``result + increment``
                else:
                    result = (result + increment).to(dtype)
                continue
            if isinstance(rows, slice):
                increment = delta.increment(x[rows])
                if increment.dtype == result.dtype == dtype:
                    # In place: the same single addition per element as ``result + increment``.
                    result[rows].add_(increment)
                else:
                    result[rows] = (result[rows] + increment).to(dtype)
                continue
            increment = delta.increment(x.index_select(0, rows))
            if increment.dtype == result.dtype == dtype:
                result.index_add_(0, rows, increment)
            else:
                part = (result.index_select(0, rows) + increment).to(dtype)
                result.index_copy_(0, rows, part)
        return result

    def _forward_gathered(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``forward`` for interleaved rows (see ``Routing``): each row's increment, computed by
        the same operations on the same rows and added by the same single addition, with one
        gather per input tensor and one ``index_add_`` per layer instead of an ``index_select``
        and an ``index_add_`` per adapter and layer; what to add where is worked out once per
        assignment (``_plan``)."""
        routing = self._routing
        result = self._base(x, args, kwargs)
        if x.shape[0] != routing.rows:
            self._check_rows(x, slice(None))
        plan = routing.plans.get(self)
        if plan is None or plan.x_dtype is not x.dtype or plan.result_dtype is not result.dtype:
            plan = self._plan(x.dtype, result.dtype)
        adds = plan.adds
        if not adds and not plan.casts:
            return result  # no adapter of this forward targets this module
        views = routing.views(x)
        for increment, i, rows, dtype in plan.casts:
            part = (result.index_select(0, rows) + increment(views[i])).to(dtype)
            result.index_copy_(0, rows, part)
        if len(adds) == 1:
            increment, i = adds[0]
            result.index_add_(0, plan.order, increment(views[i]))
        elif adds:
            parts = [increment(views[i]) for increment, i in adds]
            result.index_add_(0, plan.order, torch.cat(parts))
        return result

    def _plan(self, x_dtype: torch.dtype, result_dtype: torch.dtype) -> _Plan:
        """This layer's ``_Plan`` for the current assignment (kept with it)."""
        routing = self._routing
        adds: list[tuple[Callable[[torch.Tensor], torch.Tensor], int]] = []
        casts = []
        for i, (name, _) in enumerate(routing.spans):
            delta = self.deltas.get(name)
            if delta is None or delta.increment is None:
                continue  # this adapter does not target this module
            dtype = x_dtype if delta.to_input_dtype else result_dtype
            if delta.dtype == result_dtype == dtype:
                adds.append((delta.increment, i))
            else:
                casts.append((delta.increment, i, routing.order_of((i,)), dtype))
        assert routing.order is not None
        order = routing.order_of(tuple(i for _, i in adds)) if adds else routing.order
        plan = _Plan(x_dtype, result_dtype, tuple(adds), order, tuple(casts))
        routing.plans[self] = plan
        return plan


def multiplier(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (peft's scaling, a Python float) as a 0-dim CPU tensor multiplying a ``dtype``
    tensor to the very bits the Python number gives, without the tensor torch wraps the number
    into in every multiply: the number rounded to float64 for float64 tensors, to float32 for
    float32, float16 and bfloat16 ones (the value torch converts the number to and computes those
    products with). Anything else stays as it is."""
    if type(value) is not float:
        return value
    if dtype == torch.float64:
        return torch.tensor(value, dtype=torch.float64)
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.tensor(value, dtype=torch.float32)
    return value


def _lora_linear(layer: Any, name: str, cache_budget: int) -> Delta | None:
    if name in layer.lora_variant or name not in layer.lora_A:
        return None
    weight_a = layer.lora_A[name].weight
    lora_b = layer.lora_B[name]
    weight_b, bias_b = lora_b.weight, lora_b.bias
    scaling = multiplier(layer.scaling[name], weight_b.dtype)
    cast = layer._cast_input_dtype

    def increment(x: torch.Tensor) -> torch.Tensor:
        # lora.Linear.forward: dropout is the identity in eval mode, lora_A/lora_B are Linear;
        # ``* scaling`` in place on the fresh product (the same multiply, one tensor less).
        after_a = functional.linear(cast(x, weight_a.dtype), weight_a)
        return functional.linear(after_a, weight_b, bias_b).mul_(scaling)

    return Delta(increment, dtype=weight_b.dtype)


def _lora_embedding(layer: Any, name: str, cache_budget: int) -> Delta | None:
    if name in layer.lora_variant or name not in layer.lora_embedding_A:
        return None
    if layer.input_fns.get(name) is not None or layer.output_fns.get(name) is not None:
        return None
    embedding_a = layer.lora_embedding_A[name]
    embedding_b = layer.lora_embedding_B[name]
    if not isinstance(embedding_a, torch.Tensor) or not isinstance(embedding_b, torch.Tensor):
        return None
    scaling = layer.scaling[name]

    def increment(x: torch.Tensor) -> torch.Tensor:
        # lora.Embedding.forward, one vanilla adapter.
        output = (layer._embed(x, embedding_a.T) @ embedding_b.T) * scaling
        embed_scale = layer._get_embed_scale()
        if embed_scale is not None:
            output = output * embed_scale.to(output.dtype)
        return output

    return Delta(increment, dtype=embedding_b.dtype)


def _lycoris_linear(layer: Any, name: str, cache_budget: int) -> Delta | None:
    """LoHa/LoKr ``Linear``: ``functional.linear(x, delta_weight)``. peft rebuilds the delta weight
    from its factors in every forward; within ``cache_budget`` bytes it is built once here
    (the same function of the same tensors: the same bits) and kept."""
    if name not in layer._available_adapters:
        return None
    weight = layer.get_base_layer().weight
    size = weight.numel() * weight.element_size()
    if size <= cache_budget:
        delta_weight = layer.get_delta_weight(name, apply_rank_dropout=False)
        cast = layer._cast_input_dtype

        def cached(x: torch.Tensor) -> torch.Tensor:
            return functional.linear(cast(x, delta_weight.dtype), delta_weight)

        return Delta(cached, delta_weight.dtype, to_input_dtype=True, cached_bytes=size)

    def increment(x: torch.Tensor) -> torch.Tensor:
        # loha/lokr Linear.forward in eval mode (no module or rank dropout).
        return layer._get_delta_activations(name, x)

    # Its dtype is the delta weight's, known once built: the gathered path adds it as a cast.
    return Delta(increment, to_input_dtype=True)


def _ia3_linear(layer: Any, name: str, cache_budget: int) -> Delta | None:
    """IA3 ``Linear`` (also over GPT-2's ``Conv1D``) with one active adapter, as its forward."""
    if name not in layer.ia3_l:
        return None
    vector = layer.ia3_l[name]

    if layer.is_feedforward:

        def scale_input(x: torch.Tensor) -> torch.Tensor:
            return (x.to(vector.dtype) * (1 * vector.flatten())).to(x.dtype)

        return Delta(input_scale=scale_input)

    def scale_output(result: torch.Tensor) -> torch.Tensor:
        return (result * (1 * vector.flatten())).to(result.dtype)

    return Delta(output_scale=scale_output)


_DELTAS: dict[type, Callable[[Any, str, int], Delta | None]] = {
    lora_layer.Linear: _lora_linear,
    lora_layer.Embedding: _lora_embedding,
    loha_layer.Linear: _lycoris_linear,
    lokr_layer.Linear: _lycoris_linear,
    ia3_layer.Linear: _ia3_linear,
}


def _tuner_layers(peft_model: Any, name: str) -> list[tuple[str, Any]]:
    """(path in the transformers model, peft layer) of every tuner layer holding ``name``."""
    model = peft_model.base_model.model
    found = []
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and name in _adapter_names_of(module):
            found.append((path, module))
    return found


def _adapter_names_of(layer: BaseTunerLayer) -> set[str]:
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is not None:
            names.update(container.keys())
    return names


class RoutedTree:
    """One module tree over the base tensors serving base rows and every routed adapter."""

    def __init__(self, model: nn.Module, delta_cache_bytes: int = DELTA_CACHE_BYTES) -> None:
        self.model = model  # a share_weights_copy of the base model
        self.device = next(model.parameters()).device
        self.routing = Routing()
        self.delta_cache_bytes = delta_cache_bytes
        self.layers: dict[str, RoutedLayer] = {}  # path -> the routed layer there
        self.adapters: set[str] = set()

    @staticmethod
    def why_not(peft_model: Any, name: str) -> str:
        """Why ``name`` in ``peft_model`` cannot be routed here ("" = it can)."""
        layers = _tuner_layers(peft_model, name)
        if not layers:
            return "no adapter layers found"
        for path, layer in layers:
            make = _DELTAS.get(type(layer))
            if make is None:
                return f"{type(layer).__module__}.{type(layer).__name__} at {path} has no routing"
            if layer.merged or layer.training or make(layer, name, 0) is None:
                return f"{path}: this layer's adapter cannot be routed (variant, merged, ...)"
        return ""

    @torch.inference_mode()
    def add(self, peft_model: Any, name: str) -> None:
        """Route ``name`` through the layers of ``peft_model`` (``why_not`` must be "")."""
        self.remove(name)
        for path, layer in _tuner_layers(peft_model, name):
            routed = self.layers.get(path)
            if routed is None:
                routed = self._wrap(path)
            delta = _DELTAS[type(layer)](layer, name, self.delta_cache_bytes - self.cached_bytes())
            assert delta is not None, path
            routed.set_delta(name, delta)
        self.adapters.add(name)
        self.routing.clear()

    def remove(self, name: str) -> None:
        """Stop routing ``name``; a layer left with no adapter gets its plain module back."""
        for path in list(self.layers):
            routed = self.layers[path]
            routed.set_delta(name, None)
            if not routed.deltas:
                self._unwrap(path)
        self.adapters.discard(name)
        self.routing.clear()

    def cached_bytes(self) -> int:
        return sum(d.cached_bytes for layer in self.layers.values() for d in layer.deltas.values())

    def _wrap(self, path: str) -> RoutedLayer:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        routed = RoutedLayer(getattr(parent, child), self.routing)
        setattr(parent, child, routed)
        self.layers[path] = routed
        return routed

    def _unwrap(self, path: str) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        setattr(parent, child, self.layers.pop(path).base_layer)

    def assign(self, names: Sequence[str]) -> None:
        self.routing.assign(names, self.device)
