"""A bit-identical forward for Llama-style decoders, without transformers' per-call machinery.

Why: on the demo model a decode step is mostly Python around tiny tensors (docs/engine.md,
"Where a step's time goes"): 58 ``nn.Module.__call__``s, output dataclasses, kwargs plumbing,
decorators and ``create_causal_mask``. ``FastForward`` runs the same torch ops, in the same
order and dtypes, as transformers 5.24's ``LlamaForCausalLM.forward`` (``modeling_llama.py``,
``masking_utils.create_causal_mask``, ``integrations/sdpa_attention.sdpa_attention_forward``)
for what the engine calls (``input_ids``, a 2-D padding mask or none, explicit
``position_ids``, a ``DynamicCache`` of ``SlotLayer``/``DynamicLayer``s, ``logits_to_keep=1``):

* embed -> per layer: RMSNorm, q/k/v, RoPE, the cache layer's own ``update``, SDPA with
  transformers' scaling, mask, ``is_causal``, ``enable_gqa``/``pack_gqa``/``repeat_kv``
  choices, o_proj, residual, RMSNorm, MLP, residual -> final norm -> lm_head on the last
  position;
* every projection (q/k/v/o, gate/up/down, the embedding, lm_head) is the model's own
  submodule: a plain ``nn.Linear``/``nn.Embedding`` is applied as its ``forward`` would
  (``F.linear``/``F.embedding`` on its own tensors), anything else -- a peft tuner layer, the
  routed tree's ``RoutedLayer`` -- runs its own ``forward`` (what ``__call__`` runs when no
  hook is registered, which is checked), so adapters keep working unchanged;
* the 4-D mask is built only where ``create_causal_mask`` would build one, as the same boolean
  tensor (same values, shape and layout), with its same decisions to pass none.

It refuses itself (``why_not`` says why; the caller then runs the model's own forward) for
anything it does not reproduce: other model classes (Llama, Mistral without a sliding
window, Qwen2 with every layer full attention are the families whose modules are exactly these
ops), another transformers version than the one read, attention other than SDPA, RoPE other
than "default", sliding or other non-full layers, non-float or quantized weights, training
mode, any hook on any module, caches other than ``DynamicCache`` of ``SlotLayer``/
``DynamicLayer``s, and peft models other than a plain ``PeftModel``/``PeftModelForCausalLM``
over tuners whose forward is the base model's (no prompt learning, aLoRA, X-LoRA, poly, ...).
The load-time part is decided once per model; what can change between steps (an adapter
attached into a module tree, the active adapter, a hook) is checked cheaply on every forward,
before any tensor is touched.

Fused forwards (``FastForward.fused``): several forwards of one model in one pass, e.g. a
joiner's prefill and a running sub-batch's decode step. Every part's tokens go flattened
through the embedding, norms, projections and MLP; each part keeps its own RoPE, mask, cache
layer and SDPA, and its own final norm and lm_head on its last positions (the layout its own
forward gives lm_head). Only the matmuls' row counts change; on CPU (MKL) a matmul of 4+ rows
gives each row the same bits whatever the others are, so with 4+ rows in each part the pass is
bitwise the parts' own forwards (docs/engine.md "Fused forwards"; the batcher fuses only then).
``PEFTSERVE_FUSED_FORWARD=0`` turns fusing off.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from peft import PeftModel, PeftModelForCausalLM
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from torch.nn import functional
from transformers import DynamicCache
from transformers.activations import SiLUActivation
from transformers.cache_utils import DynamicLayer
from transformers.integrations import sdpa_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

from .kv_cache import SlotLayer
from .peft_guard import HookWatch

# The transformers release whose modeling code this module reproduces op for op.
TRANSFORMERS_VERSION = "5.24.0"


@dataclass(frozen=True)
class _Family:
    """The module classes of one Llama-style family (each checked by exact type)."""

    # Any, not type: ``type(x) is not family.layer`` must not narrow x to ``object``.
    model: Any
    decoder: Any
    layer: Any
    attention: Any
    mlp: Any
    norm: Any
    rotary: Any


FAMILIES: dict[type, _Family] = {
    modeling_llama.LlamaForCausalLM: _Family(
        modeling_llama.LlamaForCausalLM,
        modeling_llama.LlamaModel,
        modeling_llama.LlamaDecoderLayer,
        modeling_llama.LlamaAttention,
        modeling_llama.LlamaMLP,
        modeling_llama.LlamaRMSNorm,
        modeling_llama.LlamaRotaryEmbedding,
    ),
    modeling_mistral.MistralForCausalLM: _Family(
        modeling_mistral.MistralForCausalLM,
        modeling_mistral.MistralModel,
        modeling_mistral.MistralDecoderLayer,
        modeling_mistral.MistralAttention,
        modeling_mistral.MistralMLP,
        modeling_mistral.MistralRMSNorm,
        modeling_mistral.MistralRotaryEmbedding,
    ),
    modeling_qwen2.Qwen2ForCausalLM: _Family(
        modeling_qwen2.Qwen2ForCausalLM,
        modeling_qwen2.Qwen2Model,
        modeling_qwen2.Qwen2DecoderLayer,
        modeling_qwen2.Qwen2Attention,
        modeling_qwen2.Qwen2MLP,
        modeling_qwen2.Qwen2RMSNorm,
        modeling_qwen2.Qwen2RotaryEmbedding,
    ),
}

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _peft_why_not(peft_model: Any) -> str:
    """Why the active adapter's forward is not "the tuner layers inside the base model's
    forward" ("" = it is)."""
    if type(peft_model) not in (PeftModel, PeftModelForCausalLM):
        return f"peft model class {type(peft_model).__name__}"
    tuner = peft_model.base_model
    if type(tuner).forward is not BaseTuner.forward:
        return f"{type(tuner).__name__} has a forward of its own"
    hooks = getattr(type(tuner), "_enable_peft_forward_hooks", None)
    if hooks is not None and hooks is not LoraModel._enable_peft_forward_hooks:
        return f"{type(tuner).__name__} installs forward hooks of its own"
    config = peft_model.active_peft_config
    if config.is_prompt_learning:
        return f"prompt learning ({config.peft_type})"
    if getattr(config, "alora_invocation_tokens", None):
        return "aLoRA (per-row invocation offsets)"
    return ""


# One forward's inputs for ``FastForward.fused``: (input_ids, 2-D mask or None, positions, cache).
FusedPart = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, DynamicCache]


class FastForward:
    """The fast forward of one model (a transformers causal LM or a peft model around one)."""

    def __init__(self, model: Any, lm: Any, family: _Family) -> None:
        self.model = model  # what the caller would have called
        self.lm = lm  # the transformers causal LM inside it
        self.family = family
        self.peft = model is not lm
        self.decoder = lm.model
        self.config = lm.config
        self.num_layers = int(lm.config.num_hidden_layers)
        self._hooks = HookWatch(model)

    # ---- deciding ----
    @staticmethod
    def load_why_not(model: Any) -> str:
        """Why ``model`` cannot ever take the fast forward ("" = it can, when ``why_not``
        finds nothing at the forward)."""
        if transformers.__version__ != TRANSFORMERS_VERSION:
            return f"transformers {transformers.__version__}, not {TRANSFORMERS_VERSION}"
        lm = model
        if isinstance(model, PeftModel):
            problem = _peft_why_not(model)
            if problem:
                return problem
            lm = model.base_model.model
        family = FAMILIES.get(type(lm))
        if family is None:
            return f"model class {type(lm).__name__}"
        config = lm.config
        if config._attn_implementation != "sdpa":
            return f"attention {config._attn_implementation!r}, not sdpa"
        if sdpa_attention._is_torch_npu_available:
            return "Ascend NPU (transformers converts the mask there)"
        if not getattr(config, "is_causal", True):
            return "bidirectional attention"
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            return f"layer types {sorted(set(layer_types))}"
        if getattr(config, "sliding_window", None) is not None and family.model is not (
            modeling_qwen2.Qwen2ForCausalLM
        ):
            # Mistral masks every layer with its sliding window; Qwen2 only its sliding layers.
            return f"sliding window {config.sliding_window}"
        if getattr(lm, "hf_quantizer", None) is not None or getattr(lm, "is_quantized", False):
            return "quantized"
        decoder: Any = lm.model
        if type(decoder) is not family.decoder:
            return f"decoder class {type(decoder).__name__}"
        rotary = decoder.rotary_emb
        if type(rotary) is not family.rotary or rotary.rope_type != "default":
            return f"rope type {getattr(rotary, 'rope_type', '?')!r}"
        if len(decoder.layers) < config.num_hidden_layers:
            return "fewer layers than the config says"
        for p in lm.parameters():
            if p.dtype not in _FLOATS:
                return f"parameters of dtype {p.dtype}"
        return ""

    @classmethod
    def build(cls, model: Any) -> tuple[FastForward | None, str]:
        problem = cls.load_why_not(model)
        if problem:
            return None, problem
        lm = model.base_model.model if isinstance(model, PeftModel) else model
        return cls(model, lm, FAMILIES[type(lm)]), ""

    def why_not(self, cache: Any, attention_mask: Any = None) -> str:
        """What, at this forward, the fast path would not reproduce ("" = nothing)."""
        if attention_mask is not None and attention_mask.ndim != 2:
            return "a mask that is not a 2-D padding mask"
        if self._hooks.hooked():
            return "hooks on the model"
        if self.model.training or self.lm.training:
            return "training mode"
        if self.config._attn_implementation != "sdpa":  # set_attn_implementation since load
            return f"attention {self.config._attn_implementation!r}, not sdpa"
        if ALL_ATTENTION_FUNCTIONS.get("sdpa") is not sdpa_attention.sdpa_attention_forward:
            return "a custom sdpa attention function"
        if self.peft:
            problem = _peft_why_not(self.model)
            if problem:
                return problem
        if type(cache) is not DynamicCache or cache.offloading:
            return f"cache {type(cache).__name__}"
        layers = cache.layers
        if len(layers) < self.num_layers:
            return "a cache with fewer layers than the model"
        for layer in layers[: self.num_layers]:
            if type(layer) is not SlotLayer and type(layer) is not DynamicLayer:
                return f"cache layer {type(layer).__name__}"
        return ""

    def resolve(self) -> list[tuple[Any, ...]] | None:
        """Each decoder layer's modules and tensors for this forward when every layer is
        exactly the family's structure (an adapter may have replaced a module since the last
        forward), else None.

        Read from the modules' own ``_modules``/``_parameters`` dicts: what ``layer.mlp`` or
        ``linear.weight`` return, without ``nn.Module.__getattr__`` (~1 us a lookup here, a
        few dozen per layer)."""
        family = self.family
        modules = self.decoder._modules
        if type(modules["norm"]) is not family.norm:
            return None
        # Not ``layers[:n]``: slicing a ModuleList builds a new module (~20 us).
        plan = []
        layer: Any
        for layer in list(modules["layers"]._modules.values())[: self.num_layers]:
            if type(layer) is not family.layer:
                return None
            parts = layer._modules
            attn: Any = parts["self_attn"]
            mlp: Any = parts["mlp"]
            norm_in, norm_post = parts["input_layernorm"], parts["post_attention_layernorm"]
            if (
                type(attn) is not family.attention
                or type(mlp) is not family.mlp
                or type(norm_in) is not family.norm
                or type(norm_post) is not family.norm
                or attn.training
                or not attn.is_causal
            ):
                return None
            a, m = attn._modules, mlp._modules
            plan.append(
                (
                    _norm(norm_in),
                    attn,
                    _proj(a["q_proj"]),
                    _proj(a["k_proj"]),
                    _proj(a["v_proj"]),
                    _proj(a["o_proj"]),
                    _norm(norm_post),
                    _proj(m["gate_proj"]),
                    _proj(m["up_proj"]),
                    _proj(m["down_proj"]),
                    m["act_fn"],
                )
            )
        return plan

    # ---- running ----
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        plan: list[tuple[Any, ...]],
    ) -> torch.Tensor:
        """The (rows, 1, vocab) logits of the last position, as the model's forward gives them
        with ``logits_to_keep=1``; the cache is updated as the forward updates it. ``plan`` is
        what ``resolve()`` returned for this forward. Call it under ``torch.inference_mode``
        (as the step does), like the model's own forward."""
        modules = self.decoder._modules
        hidden = _embed(modules["embed_tokens"], input_ids)
        q_length = hidden.shape[1]
        first: Any = cache.layers[0]  # a SlotLayer or DynamicLayer (why_not)
        past = first.get_seq_length()
        mask = _causal_mask(attention_mask, hidden, q_length, past)
        cos, sin = _rope(modules["rotary_emb"], hidden, position_ids)
        # apply_rotary_pos_emb's unsqueeze, once for all layers (a view: no numbers change).
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, cache_layer in zip(plan, cache.layers, strict=False):
            norm_in, attn, q, k, v, o, norm_post, gate, up, down, act = layer
            # LlamaDecoderLayer.forward
            residual = hidden
            hidden = _rms_norm(norm_in, hidden)
            hidden = _attention(attn, q, k, v, o, hidden, cos, sin, mask, cache_layer, q_length)
            hidden = residual + hidden
            residual = hidden
            hidden = _rms_norm(norm_post, hidden)
            # LlamaMLP.forward
            gated = _act(act, _linear(gate, hidden))
            hidden = _linear(down, gated * _linear(up, hidden))
            hidden = residual + hidden
        hidden = _rms_norm(_norm(modules["norm"]), hidden)
        hidden = hidden[:, slice(-1, None), :]  # slice_logits_to_keep(hidden, 1)
        return _lm_head(self.lm, hidden)

    def fused(self, parts: list[FusedPart], plan: list[tuple[Any, ...]]) -> list[torch.Tensor]:
        """Several forwards of this model in one pass: each part's (rows, 1, vocab) logits, as
        ``__call__`` gives them for that part alone, each part's cache updated as its own
        forward updates it (see "Fused forwards" in the module docstring).

        Tokens of every part are flattened into one (tokens, hidden) tensor through the
        embedding, the norms, every projection and the MLP; each part's attention (its RoPE,
        mask, cache layer and SDPA) runs on its own rows; the final norm and lm_head run per
        part on its last positions, with the row count that part's own forward has."""
        modules = self.decoder._modules
        rotary = modules["rotary_emb"]
        shapes = [(int(ids.shape[0]), int(ids.shape[1])) for ids, _, _, _ in parts]
        splits = [rows * length for rows, length in shapes]
        flat_ids = torch.cat([ids.reshape(-1, 1) for ids, _, _, _ in parts])
        hidden = _embed(modules["embed_tokens"], flat_ids)  # (tokens, 1, hidden)
        hidden = hidden.view(hidden.shape[0], hidden.shape[-1])
        attention: list[tuple[Any, ...]] = []
        caches: list[Any] = [cache for _, _, _, cache in parts]  # SlotLayer/DynamicLayer layers
        for (ids, mask, positions, _), cache, (_, length) in zip(
            parts, caches, shapes, strict=True
        ):
            past = cache.layers[0].get_seq_length()
            cos, sin = _rope(rotary, hidden, positions)
            attention.append(
                (_causal_mask(mask, ids, length, past), cos.unsqueeze(1), sin.unsqueeze(1))
            )
        for index, layer in enumerate(plan):
            norm_in, attn, q, k, v, o, norm_post, gate, up, down, act = layer
            residual = hidden
            normed = _rms_norm(norm_in, hidden)
            queries = _linear(q, normed).split(splits)
            keys = _linear(k, normed).split(splits)
            values = _linear(v, normed).split(splits)
            outs = []
            for i, (rows, length) in enumerate(shapes):
                mask, cos, sin = attention[i]
                shape = (rows, length, -1, attn.head_dim)
                query = queries[i].view(shape).transpose(1, 2)
                key = keys[i].view(shape).transpose(1, 2)
                value = values[i].view(shape).transpose(1, 2)
                query, key = _apply_rope(query, key, cos, sin)
                key, value = caches[i].layers[index].update(key, value)
                out = _sdpa(attn, query, key, value, mask, length)
                outs.append(out.reshape(rows * length, -1))
            hidden = residual + _linear(o, torch.cat(outs) if len(outs) > 1 else outs[0])
            residual = hidden
            normed = _rms_norm(norm_post, hidden)
            gated = _act(act, _linear(gate, normed))
            hidden = residual + _linear(down, gated * _linear(up, normed))
        final = _norm(modules["norm"])
        logits = []
        for part, (rows, length) in zip(hidden.split(splits), shapes, strict=True):
            # As ``__call__``: the norm over every position, then the last one's view (the
            # layout lm_head reads decides the bits of a matmul this small).
            normed = _rms_norm(final, part.view(rows, length, -1))
            logits.append(_lm_head(self.lm, normed[:, slice(-1, None), :]))
        return logits


# ---- the ops, as transformers' modules run them ----

# A projection: (forward, weight, bias); weight None = call ``forward`` (not a plain Linear).
# A module's ``forward`` is what its ``__call__`` runs when no hook is registered (checked).
Proj = tuple[Any, Any, Any]


def _proj(module: Any) -> Proj:
    if type(module) is nn.Linear:
        params = module._parameters
        return None, params["weight"], params["bias"]
    return module.forward, None, None


def _linear(proj: Proj, x: torch.Tensor) -> torch.Tensor:
    forward, weight, bias = proj
    if weight is not None:
        return functional.linear(x, weight, bias)  # nn.Linear.forward
    result: torch.Tensor = forward(x)  # a peft layer, a routed layer, ...: its own forward
    return result


def _norm(norm: Any) -> tuple[torch.Tensor, float]:
    return norm._parameters["weight"], norm.variance_epsilon


def _embed(module: Any, ids: torch.Tensor) -> torch.Tensor:
    weight: Any
    if type(module) is nn.Embedding:
        weight = module._parameters["weight"]
        return functional.embedding(  # nn.Embedding.forward
            ids,
            weight,
            module.padding_idx,
            module.max_norm,
            module.norm_type,
            module.scale_grad_by_freq,
            module.sparse,
        )
    result: torch.Tensor = module.forward(ids)
    return result


def _act(module: Any, x: torch.Tensor) -> torch.Tensor:
    if type(module) is SiLUActivation:
        return functional.silu(x)  # SiLUActivation.forward
    result: torch.Tensor = module.forward(x)
    return result


def _rms_norm(norm: tuple[torch.Tensor, float], hidden_states: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm.forward (Mistral's and Qwen2's are the same code).
    # ``Tensor.to`` a tensor's own dtype returns that tensor: skipped, it computes nothing.
    weight, variance_epsilon = norm
    input_dtype = hidden_states.dtype
    if input_dtype != torch.float32:
        hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + variance_epsilon)
    if input_dtype != torch.float32:
        hidden_states = hidden_states.to(input_dtype)
    return weight * hidden_states


def _rope(
    rotary: Any, x: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # LlamaRotaryEmbedding.forward, "default" rope type (dynamic_rope_update does nothing).
    freqs = position_ids[..., None].float() * rotary.inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * rotary.attention_scaling
    sin = emb.sin() * rotary.attention_scaling
    if x.dtype == torch.float32:
        return cos, sin  # already float32: ``.to`` would return them as they are
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _fast_all(tensor: torch.Tensor) -> bool:
    return bool(tensor.sum() == tensor.numel())  # masking_utils.fast_all


def _causal_mask(
    attention_mask: torch.Tensor | None, embeds: torch.Tensor, q_length: int, past: int
) -> torch.Tensor | None:
    """What ``create_causal_mask`` gives SDPA for a full-attention ``DynamicCache`` whose
    layers hold ``past`` columns (kv offset 0, kv length ``past + q_length``)."""
    kv_length = past + q_length
    padding = None
    if attention_mask is not None:
        # _preprocess_mask_arguments, then prepare_padding_mask.
        padding = attention_mask.to(device=embeds.device, dtype=torch.bool)
        if (extra := kv_length - padding.shape[-1]) > 0:
            padding = functional.pad(padding, (0, extra))
    # _ignore_causal_mask_sdpa: the cases where SDPA gets no mask at all.
    checked = padding
    if checked is not None and checked.shape[-1] > kv_length:
        checked = checked[:, :kv_length]
    if (q_length == 1 or kv_length == q_length) and (checked is None or _fast_all(checked)):
        return None
    if past == 0 and (
        checked is None or (_fast_all(checked[:, :q_length]) and _fast_all(~checked[:, q_length:]))
    ):
        return None
    # sdpa_mask without vmap: and_masks(causal, padding) over broadcast index tensors.
    device = embeds.device
    batch_size = embeds.shape[0]
    q_idx = (torch.arange(q_length, device=device) + past)[None, None, :, None]
    kv_idx = torch.arange(kv_length, device=device)[None, None, None, :]
    mask = embeds.new_ones((), dtype=torch.bool) & (kv_idx <= q_idx)
    if padding is not None:
        batch_idx = torch.arange(batch_size, device=device)[:, None, None, None]
        mask = mask & padding[batch_idx, kv_idx]
    return mask.expand(batch_size, -1, q_length, kv_length)


def _attention(
    attn: Any,
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache_layer: Any,
    q_length: int,
) -> torch.Tensor:
    # LlamaAttention.forward.
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    query = _linear(q_proj, hidden_states).view(hidden_shape).transpose(1, 2)
    key = _linear(k_proj, hidden_states).view(hidden_shape).transpose(1, 2)
    value = _linear(v_proj, hidden_states).view(hidden_shape).transpose(1, 2)
    query, key = _apply_rope(query, key, cos, sin)
    key, value = cache_layer.update(key, value)
    out = _sdpa(attn, query, key, value, attention_mask, q_length)
    out = out.reshape(*input_shape, -1).contiguous()
    return _linear(o_proj, out)


def _apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # apply_rotary_pos_emb, ``cos``/``sin`` already unsqueezed.
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


def _sdpa(
    attn: Any,
    query: Any,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Any,
    q_length: int,
) -> torch.Tensor:
    # sdpa_attention_forward (no position bias, softcap, NPU or tracing: refused or absent).
    sdpa_kwargs: dict[str, Any] = {}
    n_rep = attn.num_key_value_groups
    if n_rep > 1:
        if sdpa_attention.use_gqa_in_sdpa(mask, key, value):
            sdpa_kwargs["enable_gqa"] = True
        elif q_length == 1:
            query = sdpa_attention.pack_gqa(query, n_rep)
            mask = sdpa_attention.pack_gqa(mask, n_rep)
        else:
            key = sdpa_attention.repeat_kv(key, n_rep)
            value = sdpa_attention.repeat_kv(value, n_rep)
    kv_length = key.shape[2]
    is_causal = q_length > 1 and mask is None and attn.is_causal
    if is_causal and mask is None and q_length > 1 and kv_length > q_length:
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]
    out = functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=0.0,
        scale=attn.scaling,
        is_causal=is_causal,
        **sdpa_kwargs,
    )
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])
    return out.transpose(1, 2).contiguous()


def _lm_head(lm: Any, hidden: torch.Tensor) -> torch.Tensor:
    return _linear(_proj(lm._modules["lm_head"]), hidden)


def enabled_by_environment() -> bool:
    """False when ``PEFTSERVE_FAST_FORWARD=0``: every forward then runs the model's own code."""
    return os.environ.get("PEFTSERVE_FAST_FORWARD", "1") != "0"


def fusing_by_environment() -> bool:
    """False when ``PEFTSERVE_FUSED_FORWARD=0``: the step then never fuses forwards."""
    return os.environ.get("PEFTSERVE_FUSED_FORWARD", "1") != "0"


class FastForwards:
    """Each model's ``FastForward`` (or why it has none), decided at its first forward."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._plans: weakref.WeakKeyDictionary[Any, tuple[FastForward | None, str]] = (
            weakref.WeakKeyDictionary()
        )
        self.fallbacks: dict[str, int] = {}  # why -> forwards that took the model's own
        self.taken = 0  # forwards that took the fast one
        self.fuse = fusing_by_environment()
        self.fused_passes = 0  # fused passes (each counted in ``taken`` once per part)

    def plan(self, model: Any) -> tuple[FastForward | None, str]:
        found = self._plans.get(model)
        if found is None:
            found = FastForward.build(model)
            self._plans[model] = found
        return found

    def run(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor | None:
        """The fast forward's (rows, 1, vocab) logits, or None: run the model's own forward."""
        if not self.enabled:
            return None
        fast, problem = self.plan(model)
        plan = None
        if fast is not None:
            problem = fast.why_not(cache, attention_mask)
            if not problem:
                plan = fast.resolve()
                problem = "" if plan is not None else "a module of another class in a layer"
        if fast is None or plan is None:
            self.fallbacks[problem] = self.fallbacks.get(problem, 0) + 1
            return None
        self.taken += 1
        return fast(input_ids, attention_mask, position_ids, cache, plan)

    def run_fused(self, model: Any, parts: list[FusedPart]) -> list[torch.Tensor] | None:
        """Each part's (rows, 1, vocab) logits from one fused pass (``FastForward.fused``), or
        None when the fast forward would not take every part: run them one by one."""
        if not self.enabled or not self.fuse:
            return None
        fast, _ = self.plan(model)
        if fast is None:
            return None
        for _, mask, _, cache in parts:
            if fast.why_not(cache, mask):
                return None
        plan = fast.resolve()
        if plan is None:
            return None
        self.taken += len(parts)
        self.fused_passes += 1
        return fast.fused(parts, plan)
