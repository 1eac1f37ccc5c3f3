"""Failure safety for model calls: whatever is raised, the shared models stay as they were.

Why: peft installs per-call state on the *shared* ``PeftModel`` and removes it only on the
happy path. ``LoraModel._enable_peft_forward_hooks`` registers one ``adapter_names`` forward
pre-hook on every LoRA layer, ``yield``s without ``try``/``finally`` and removes them after the
``yield``: an exception inside a mixed batch (an accelerator OOM, a bug, a peft ``KeyError``)
leaves them installed, and from then on every forward of that model is routed with the failed
batch's ``adapter_names`` ("Length of adapter_names should be the same as the number of
inputs", or silently wrong rows when the lengths happen to agree). The runner also switches
the active adapter of a group before a batch.

``guard_models(models)`` wraps any model call -- today's ``generate``, a decode loop's
per-step forward with ``adapter_names`` -- so that on any exception (``BaseException``
included) it

* removes every hook registered on any module of ``models`` since the call began. torch hands
  out hook ids from one global counter (``RemovableHandle.next_id``), so "registered since"
  is "id >= the counter at entry": nothing is walked on the success path;
* restores each ``PeftModel``'s active adapter, its disabled-adapters flag and the
  ``prepare_inputs_for_generation`` that peft's ``generate`` swaps in;
* puts every model back in eval mode;
* runs the caller's own ``on_failure`` callbacks (a decode loop drops the failed step's KV
  writes there), then re-raises the original exception unchanged.

The success path costs a few attribute reads. ``leftover_hooks`` lets tests (and a paranoid
caller) check that a model carries no call-scoped hook.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

# Every per-module hook dict torch keeps, keyed by RemovableHandle id (the fast forward and the
# routed tree's layers also read it, in ``has_hooks``: a module with any entry here is not run
# without ``nn.Module.__call__``).
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
# torch's process-wide module hook dicts (``register_module_forward_hook`` ...).
GLOBAL_HOOK_DICTS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether ``nn.Module.__call__`` of ``model`` or of any module inside it runs a hook."""
    if any(getattr(torch_module, name, None) for name in GLOBAL_HOOK_DICTS):
        return True
    return any(getattr(m, name, None) for m in model.modules() for name in HOOK_DICTS)


class HookWatch:
    """``has_hooks(module)``, rescanned only when the answer may have changed: after a hook was
    registered anywhere (handle ids come from one counter, ``RemovableHandle.next_id``) or while
    the last scan found one (removing a hook moves no counter, so the answer turns back at the
    first call after). The fast forward and the routed layers ask it on every call."""

    __slots__ = ("_hook_id", "_hooked", "_module")

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        self._hook_id = -1
        self._hooked = True

    def hooked(self) -> bool:
        if self._hooked or RemovableHandle.next_id != self._hook_id:
            self._hook_id = RemovableHandle.next_id
            self._hooked = has_hooks(self._module)
        return self._hooked


@dataclass
class _PeftState:
    """What a failed call may have changed on one ``PeftModel``."""

    model: Any
    active_adapter: Any
    adapters_disabled: bool | None
    prepare_inputs: Any


def _snapshot(model: Any) -> _PeftState | None:
    if not hasattr(model, "peft_config"):
        return None  # a plain transformers model: no adapter state
    base_model = getattr(model, "base_model", None)
    return _PeftState(
        model=model,
        active_adapter=getattr(model, "active_adapter", None),
        adapters_disabled=getattr(model, "_adapters_disabled", None),
        prepare_inputs=getattr(base_model, "prepare_inputs_for_generation", None),
    )


def remove_hooks_since(model: torch.nn.Module, first_id: int) -> int:
    """Remove every hook with id >= ``first_id`` from every module of ``model``; the count."""
    removed: set[tuple[int, int]] = set()
    for module in model.modules():
        for name in HOOK_DICTS:
            hooks = getattr(module, name, None)
            if not hooks:
                continue
            for hook_id in [k for k in hooks if isinstance(k, int) and k >= first_id]:
                del hooks[hook_id]  # the with_kwargs/always_called dicts share the id
                removed.add((id(module), hook_id))
    return len(removed)


def leftover_hooks(model: torch.nn.Module) -> list[str]:
    """Modules of ``model`` carrying a peft call-scoped forward pre-hook (should be none)."""
    found = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            func = getattr(hook, "func", hook)  # peft registers functools.partial objects
            if getattr(func, "__module__", "").startswith("peft.") and "pre_forward_hook" in (
                getattr(func, "__name__", "")
            ):
                found.append(name)
    return found


def _restore(state: _PeftState) -> None:
    model = state.model
    if state.prepare_inputs is not None:
        model.base_model.prepare_inputs_for_generation = state.prepare_inputs
    if state.adapters_disabled is not None:
        model._adapters_disabled = state.adapters_disabled
    current = getattr(model, "active_adapter", None)
    if state.active_adapter is not None and current != state.active_adapter:
        name = state.active_adapter
        if isinstance(name, str) and name in model.peft_config:
            model.set_adapter(name, inference_mode=True)


@contextlib.contextmanager
def guard_models(
    models: Iterable[torch.nn.Module],
    on_failure: Iterable[Callable[[], None]] = (),
) -> Iterator[None]:
    """Run the body; if it raises, put ``models`` back as they were, then re-raise."""
    models = list(models)
    first_id = RemovableHandle.next_id
    states = [s for m in models if (s := _snapshot(m)) is not None]
    try:
        yield
    except BaseException:
        for model in models:
            try:
                removed = remove_hooks_since(model, first_id)
                if removed:
                    logger.warning(
                        "removed %d hook(s) a failed model call left on %s",
                        removed,
                        type(model).__name__,
                    )
                model.eval()
            except Exception:  # cleanup must never hide the original error
                logger.exception("could not clean up after a failed model call")
        for state in states:
            try:
                _restore(state)
            except Exception:
                logger.exception("could not restore the adapter state after a failed call")
        for callback in on_failure:
            try:
                callback()
            except Exception:
                logger.exception("on_failure callback failed")
        raise
