"""Adapter registry: loads every adapter directory and groups adapters by PEFT type.

Why groups: one ``PeftModel`` cannot hold adapters of different PEFT types (LoRA + IA3 raises
``ValueError``), so each type gets its own ``PeftModel``. The groups must not each hold a copy
of the base weights, so every group wraps its own *module tree* whose parameters and buffers
are the very tensors of the base model (a ``deepcopy`` whose memo maps each tensor to itself;
``shares_base_weights`` checks it by ``data_ptr``).

Why ``mixed_batching`` and the routed tree: rows of mixed adapters share forwards on
``self.routed`` (``routing.py``), which routes each row through its own adapter, but only for
some adapter kinds and only where every adapted layer of the model sees one input row per
batch row. ``mixing.py`` holds the table (decided by ``tests/families``); ``attach`` applies it
and probes the served model (see its docstring), so an adapter is mixed only where mixing was
shown to equal solo runs. Adapters that cannot share
a model with others (``modules_to_save``, DoRA, failed probes) get a ``PeftModel`` of their own.

Lifecycle: besides the loaded adapters the registry keeps one ``_Entry`` per known adapter
(state, pin, in-flight count, last use) for ``Engine.load_adapter``/``unload_adapter``. Only
``attach``/``detach`` touch a ``PeftModel``, and the engine runs them on its worker thread
between decode steps (see docs/engine.md); ``_lock`` guards the dictionaries, which the event loop,
the worker and the metrics thread all read.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from peft import PeftModel
from transformers import GenerationConfig

from . import mixing
from .errors import AdapterLoadError, InvalidRequestError
from .peft_guard import guard_models
from .routing import BASE_ROW_MARKER, RoutedTree
from .types import AdapterEvent, AdapterEventKind, AdapterInfo, AdapterState, AdapterStatus

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
CONFIG_FILE = "adapter_config.json"
# The group whose PeftModel holds the plain LoRA adapters.
MIXED_GROUP = "LORA"
# The sub-batch group of rows on the routed tree (mixed adapters of any type, and base rows).
ROUTED_GROUP = "routed"
# Token ids of the load-time probes (taken modulo the vocabulary size).
PROBE_IDS = (3, 5, 7, 11, 13)
# Adapter names travel in requests, logs and metric labels: keep them short and plain.
MAX_ADAPTER_PATH_CHARS = 1024
MAX_PATH_COMPONENT_BYTES = 255
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_adapter_name(name: str, field_path: str = "name") -> None:
    """Refuse names that are empty, reserved, or not plain identifiers."""
    if not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise InvalidRequestError.single(
            field_path, "must be 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    if name == BASE_ROW_MARKER:
        raise InvalidRequestError.single(field_path, f"{BASE_ROW_MARKER!r} is reserved")


def resolve_adapter_dir(root: Path, relative: str, field_path: str = "path") -> Path:
    """The adapter directory ``relative`` names under ``root``, refusing every escape.

    Refused with the field named: empty, absolute (POSIX or Windows), any ``..`` component,
    and anything whose real path (symlinks resolved) is outside the real ``root``. The
    existence of the directory is checked later, by ``inspect_adapter``.
    """
    if not relative:
        raise InvalidRequestError.single(field_path, "must not be empty")
    if len(relative) > MAX_ADAPTER_PATH_CHARS or any(
        len(part.encode("utf-8", "surrogatepass")) > MAX_PATH_COMPONENT_BYTES
        for part in relative.replace("\\", "/").split("/")
    ):
        # Longer ones fail in the OS (ENAMETOOLONG), which surfaced as INTERNAL.
        raise InvalidRequestError.single(
            field_path,
            f"must be at most {MAX_ADAPTER_PATH_CHARS} characters, "
            f"{MAX_PATH_COMPONENT_BYTES} bytes per component",
        )
    if "\x00" in relative:
        raise InvalidRequestError.single(field_path, "must not contain NUL")
    posix = PurePosixPath(relative)
    if posix.is_absolute() or PureWindowsPath(relative).is_absolute() or relative.startswith("\\"):
        raise InvalidRequestError.single(
            field_path, "must be relative to the server's adapters root, not absolute"
        )
    if ".." in posix.parts or ".." in PureWindowsPath(relative).parts:
        raise InvalidRequestError.single(field_path, "must not contain '..'")
    real_root = root.resolve()
    resolved = (real_root / posix).resolve()
    if not resolved.is_relative_to(real_root):
        raise InvalidRequestError.single(
            field_path, "resolves (through a symlink) outside the server's adapters root"
        )
    return resolved


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


def inspect_adapter(
    path: Path, name: str | None = None, root: Path | None = None, field_path: str = ""
) -> AdapterInfo:
    """Read an adapter directory's config and weights file; refuse anything but safetensors.

    ``name`` defaults to the directory's name. With ``root``, the config and weights files must
    also really live under it (a symlinked file pointing elsewhere is refused). ``field_path``
    is the request field the directory came from, named in the error.
    """
    name = path.name if name is None else name
    if name in ("", BASE_ROW_MARKER):
        raise AdapterLoadError(name, "reserved adapter name", field_path)
    if not path.is_dir():
        raise AdapterLoadError(name, "no such adapter directory", field_path)
    config_path = path / CONFIG_FILE
    weights = path / WEIGHTS_FILE
    if root is not None:
        real_root = root.resolve()
        for file in (config_path, weights):
            if file.exists() and not file.resolve().is_relative_to(real_root):
                raise AdapterLoadError(
                    name, f"{file.name} resolves outside the adapters root", field_path
                )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterLoadError(name, f"cannot read {config_path.name}: {e}", field_path) from e
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS_FILE).is_file():
            # Pickle files can run arbitrary code on load: never touch them.
            raise AdapterLoadError(
                name,
                f"only pickle weights ({PICKLE_WEIGHTS_FILE}); need {WEIGHTS_FILE}",
                field_path,
            )
        raise AdapterLoadError(name, f"no {WEIGHTS_FILE}", field_path)
    if not isinstance(config, dict):
        raise AdapterLoadError(name, f"{CONFIG_FILE} is not a JSON object", field_path)
    peft_type = str(config.get("peft_type", "")).upper()
    if not peft_type:
        raise AdapterLoadError(name, "adapter_config.json has no peft_type", field_path)
    # No code from the adapter is ever run: only adapter_config.json (JSON) and safetensors are
    # read, onto a base model the server built itself (its auto_mapping is ignored).
    targets = config.get("target_modules") or ()
    target_modules = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    rank = config.get("r")
    rule = mixing.rule_for(config)
    return AdapterInfo(
        name=name,
        peft_type=peft_type,
        path=str(path),
        sha256=sha256_file(weights),
        rank=int(rank) if isinstance(rank, int) else None,
        target_modules=target_modules,
        # Provisional: attach() probes it on the served model before it is ever used.
        mixed_batching=rule.mixed,
        group=f"{peft_type}:{name}" if rule.own_model else peft_type,
        same_prompt_length=rule.same_prompt_length,
        mixing=f"{rule.kind}: {rule.why}",
    )


def _read_config(info: AdapterInfo) -> dict[str, Any]:
    try:
        config = json.loads((Path(info.path) / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterLoadError(info.name, f"cannot read {CONFIG_FILE}: {e}") from e
    return config if isinstance(config, dict) else {}


@dataclass
class TypeGroup:
    """One ``PeftModel`` holding every loaded adapter of one PEFT type."""

    peft_type: str
    model: PeftModel
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)


@dataclass
class _Entry:
    """The registry's mutable record of one known adapter (see ``AdapterStatus``)."""

    name: str
    path: str
    state: AdapterState
    pinned: bool = False
    info: AdapterInfo | None = None
    in_flight: int = 0
    last_used: float | None = None
    error: str = ""
    # Monotonic time of the last use, or of loading: the LRU order (never-used count as loaded).
    lru_stamp: float = field(default_factory=time.monotonic)

    def status(self) -> AdapterStatus:
        return AdapterStatus(
            name=self.name,
            state=self.state,
            path=self.path,
            info=self.info,
            pinned=self.pinned,
            in_flight=self.in_flight,
            last_used=self.last_used,
            error=self.error,
        )


AdapterListener = Callable[[AdapterEvent], None]


class AdapterRegistry:
    """Loaded adapters by name, the type group each lives in, and the plain base model."""

    def __init__(
        self,
        base: torch.nn.Module,
        adapters_dir: Path | None,
        pinned: Iterable[str] = (),
        max_loaded: int = 0,
        preload: bool = True,
    ) -> None:
        self.base = base
        self.root = adapters_dir
        self.max_loaded = max_loaded
        self.groups: dict[str, TypeGroup] = {}
        # Rows of every mixed adapter (any type) and base rows share forwards here.
        self.routed = RoutedTree(share_weights_copy(base))
        self._by_name: dict[str, AdapterInfo] = {}
        self._entries: dict[str, _Entry] = {}
        self.load_errors: dict[str, AdapterLoadError] = {}
        self._lock = threading.RLock()
        self._listeners: list[AdapterListener] = []
        if adapters_dir is not None:
            self._load_all(adapters_dir, tuple(pinned), preload)
        elif pinned:
            raise ValueError("pinned adapters need an adapters directory")

    def _load_all(self, adapters_dir: Path, pinned: tuple[str, ...], preload: bool) -> None:
        candidates = sorted(p for p in adapters_dir.iterdir() if p.is_dir())
        candidates = [p for p in candidates if (p / CONFIG_FILE).is_file()]
        unknown = sorted(set(pinned) - {p.name for p in candidates})
        if unknown:
            raise ValueError(f"pinned adapters not found in {adapters_dir}: {', '.join(unknown)}")
        if not preload:
            candidates = [p for p in candidates if p.name in pinned]
        # Pinned adapters first, so a budget smaller than the directory never leaves them out.
        candidates.sort(key=lambda p: p.name not in pinned)
        infos: list[AdapterInfo] = []
        for path in candidates:
            is_pinned = path.name in pinned
            if self.max_loaded and len(infos) >= self.max_loaded and not is_pinned:
                logger.info("adapter budget full at startup; %s stays unloaded", path.name)
                continue
            try:
                infos.append(inspect_adapter(path, root=adapters_dir))
            except AdapterLoadError as e:
                self._refuse(e, path.name)
        for candidate in infos:
            try:
                info = self.attach(candidate)
            except AdapterLoadError as e:
                self._refuse(e, candidate.name)
            else:
                self._entries[info.name] = _Entry(
                    info.name, info.name, AdapterState.READY, info.name in pinned, info
                )

    def _refuse(self, error: AdapterLoadError, directory: str) -> None:
        # The server keeps running without the adapter; requests naming it get NOT_FOUND.
        logger.error("skipping adapter: %s", error.message)
        self.load_errors[error.adapter] = error
        self._entries[error.adapter] = _Entry(
            error.adapter, directory, AdapterState.FAILED, error=error.detail
        )

    # ---- model mutation: the engine runs these on its worker thread, between decode steps ----
    def attach(self, info: AdapterInfo) -> AdapterInfo:
        """Load ``info``'s weights into its type group (creating the group) and serve it.

        The adapter is first loaded into a scratch ``PeftModel`` of its own (a module tree over
        the shared base tensors) and probed there, so a failing probe never touches a model
        that serves requests: a prompt-learning adapter that ``generate`` cannot apply, or
        ignores, is refused; a LoRA adapter the table calls mixable but whose per-row routing
        does not hold on this model is served alone, in its own group. Returns the info as
        served (group and ``mixed_batching`` final).
        """
        rule = mixing.rule_for(_read_config(info))
        try:
            scratch: Any = PeftModel.from_pretrained(
                share_weights_copy(self.base), info.path, adapter_name=info.name, is_trainable=False
            )
        except Exception as e:  # peft raises many types; all mean "this adapter is unusable"
            raise AdapterLoadError(info.name, f"{type(e).__name__}: {e}") from e
        device = next(self.base.parameters()).device
        scratch.to(device)
        scratch.eval()
        if rule.probe_effect:
            problem = self._probe_effect(scratch, info)
            if problem:
                raise AdapterLoadError(info.name, problem)
        if info.mixed_batching:
            problem = self.routed.why_not(scratch, info.name)
            if not problem:
                self.routed.add(scratch, info.name)
                problem = self._probe_mixed(scratch, info.name)
                if problem:
                    self.routed.remove(info.name)
            if problem:
                logger.warning(
                    "adapter %s: per-row routing fails on this model (%s); served alone",
                    info.name,
                    problem,
                )
                info = replace(
                    info,
                    mixed_batching=False,
                    group=f"{info.peft_type}:{info.name}",
                    mixing=f"{rule.kind}: probe failed on this model: {problem}",
                )
        elif info.peft_type == MIXED_GROUP and info.group == MIXED_GROUP:
            # A LoRA adapter that is not mixed must not sit in the mixed group: during a mixed
            # batch peft routes *every* LoRA layer of the model, its layers included.
            info = replace(info, group=f"{info.peft_type}:{info.name}")
        with self._lock:
            group = self.groups.get(info.group)
        if group is None:
            group = TypeGroup(peft_type=info.peft_type, model=scratch)
        else:
            try:
                group.model.load_adapter(info.path, adapter_name=info.name, is_trainable=False)
            except Exception as e:
                self.routed.remove(info.name)
                raise AdapterLoadError(
                    info.name, f"conflicts with the adapters of group {info.group}: {e}"
                ) from e
            group.model.to(device)
            group.model.eval()
            if info.mixed_batching:
                # Route through the group's layers (the scratch model's weights go with it).
                self.routed.add(group.model, info.name)
        with self._lock:
            self.groups[info.group] = group
            group.adapters[info.name] = info
            self._by_name[info.name] = info
        return info

    def _probe_ids(self, rows: int) -> torch.Tensor:
        base: Any = self.base  # a PreTrainedModel; its attributes confuse mypy
        vocab = int(base.config.get_text_config().vocab_size)
        device = next(self.base.parameters()).device
        ids = [i % vocab for i in PROBE_IDS]
        return torch.tensor([ids] * rows, dtype=torch.long, device=device)

    def _probe_mixed(self, scratch: Any, name: str) -> str:
        """Why a row routed on the routed tree differs from its solo forward ("" = it does not).

        Two rows of the same tokens, one for the adapter and one for the base model, against
        the adapter's own forward and the plain base model's.
        """
        ids = self._probe_ids(2)
        tree = self.routed
        try:
            with torch.inference_mode(), guard_models([scratch, tree.model]):
                tree.assign([name, BASE_ROW_MARKER])
                mixed = tree.model(input_ids=ids).logits
                solo = scratch(input_ids=ids[:1]).logits
                base = self.base(input_ids=ids[:1]).logits
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        delta = float((solo[0] - base[0]).abs().max())
        scale = float(base.abs().max()) + 1.0
        tolerance = 16 * torch.finfo(base.dtype).eps * scale + 0.05 * delta
        errors = (float((mixed[0] - solo[0]).abs().max()), float((mixed[1] - base[0]).abs().max()))
        if max(errors) > tolerance:
            return f"mixed rows differ from solo rows by {max(errors):.3g} (> {tolerance:.3g})"
        return ""

    def _probe_effect(self, scratch: Any, info: AdapterInfo) -> str:
        """Why ``generate`` cannot serve this adapter ("" = it can): it raises, or it leaves
        the logits as the base model's while a plain forward shows the adapter does change
        them (``generate`` silently ignores it, e.g. prefix tuning on Llama-style models).

        Comparing with the adapter's own forward, not with a fixed tolerance, keeps the test
        independent of the dtype: an ignored prefix still moves the last bits of the logits.
        """
        ids = self._probe_ids(1)
        base: Any = self.base
        model_type = base.config.model_type
        settings = GenerationConfig(
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
        mask = torch.ones_like(ids)
        try:
            with torch.inference_mode(), guard_models([scratch]):
                kwargs = {"input_ids": ids, "attention_mask": mask, "generation_config": settings}
                served = scratch.generate(**kwargs).logits[0][0]
                plain = base.generate(**kwargs).logits[0][0]
                forward = scratch(input_ids=ids, attention_mask=mask).logits[0, -1]
        except Exception as e:
            return (
                f"the pinned transformers/peft cannot run {info.peft_type} on "
                f"{model_type} through generate: {type(e).__name__}: {e}"
            )
        through_generate = float((served - plain).abs().max())
        through_forward = float((forward - plain).abs().max())
        if through_forward > 0 and through_generate <= 0.01 * through_forward:
            return (
                f"generate ignores this {info.peft_type} adapter on {model_type} with the "
                f"pinned transformers/peft (logits move {through_generate:.2g} through generate, "
                f"{through_forward:.2g} through forward): its tokens would be the base model's"
            )
        return ""

    def detach(self, name: str) -> None:
        """Remove a loaded adapter's weights from its group (an own group goes with it)."""
        self.routed.remove(name)
        with self._lock:
            info = self._by_name.pop(name, None)
            group = self.groups.get(info.group) if info is not None else None
            if group is not None:
                group.adapters.pop(name, None)
                if info is not None and info.group != info.peft_type:
                    # A model of its own: nothing else lives in it.
                    del self.groups[info.group]
                    return
        if group is not None and name in group.model.peft_config:
            # An emptied group keeps its PeftModel: base rows of batches keyed to it before it
            # emptied still run there (no adapter = base output), and a later load reuses it.
            group.model.delete_adapter(name)

    # ---- bookkeeping: the engine calls these on the event-loop thread ----
    def subscribe(self, listener: AdapterListener) -> Callable[[], None]:
        """Call ``listener`` on every state change; returns the unsubscribe function."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _notify(self, kind: AdapterEventKind, entry: _Entry) -> None:
        event = AdapterEvent(kind, entry.status())
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def entry(self, name: str) -> AdapterStatus | None:
        with self._lock:
            entry = self._entries.get(name)
            return entry.status() if entry is not None else None

    def statuses(self) -> list[AdapterStatus]:
        with self._lock:
            return [self._entries[n].status() for n in sorted(self._entries)]

    def set_state(
        self,
        name: str,
        state: AdapterState,
        *,
        path: str | None = None,
        pinned: bool | None = None,
        info: AdapterInfo | None = None,
        error: str = "",
    ) -> AdapterStatus:
        """Create or update ``name``'s entry and tell the listeners."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = _Entry(name, path or name, state)
                self._entries[name] = entry
            entry.state = state
            entry.error = error
            if path is not None:
                entry.path = path
            if pinned is not None:
                entry.pinned = pinned
            if info is not None:
                entry.info = info
            if state is AdapterState.READY:
                entry.lru_stamp = time.monotonic()
                self.load_errors.pop(name, None)
        self._notify(AdapterEventKind.CHANGED, entry)
        return entry.status()

    def remove(self, name: str) -> AdapterStatus | None:
        """Forget ``name`` (after ``detach``) and tell the listeners."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            return None
        self._notify(AdapterEventKind.REMOVED, entry)
        return entry.status()

    def acquire(self, name: str) -> None:
        """A request naming ``name`` was admitted."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.in_flight += 1
                entry.last_used = time.time()
                entry.lru_stamp = time.monotonic()

    def release(self, name: str) -> None:
        """A request naming ``name`` finished (any outcome)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.in_flight > 0:
                entry.in_flight -= 1

    def occupying(self) -> int:
        """Adapters holding (or about to hold) memory: everything but FAILED."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.state is not AdapterState.FAILED)

    def eviction_candidate(self) -> str | None:
        """The least recently used READY adapter that is idle and unpinned, if any."""
        with self._lock:
            idle = [
                e
                for e in self._entries.values()
                if e.state is AdapterState.READY and not e.pinned and e.in_flight == 0
            ]
            return min(idle, key=lambda e: e.lru_stamp).name if idle else None

    def count_by_state(self) -> dict[AdapterState, int]:
        with self._lock:
            counts = dict.fromkeys(AdapterState, 0)
            for entry in self._entries.values():
                counts[entry.state] += 1
            return counts

    # ---- lookups (any thread) ----
    def get(self, name: str) -> AdapterInfo | None:
        """The adapter if requests may use it now: READY (not loading, failed or unloading)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.state is not AdapterState.READY:
                return None
            return self._by_name.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(
                n
                for n in self._by_name
                if (e := self._entries.get(n)) is None or e.state is AdapterState.READY
            )

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._by_name[n] for n in self.names()]

    def models(self) -> list[torch.nn.Module]:
        """The plain base model and every type group's ``PeftModel`` (separate module trees)."""
        with self._lock:
            return [self.base, self.routed.model, *(g.model for g in self.groups.values())]

    @property
    def routes_adapters(self) -> bool:
        """Whether any mixed adapter is routed (then base rows join its sub-batches)."""
        return bool(self.routed.adapters)

    def type_group(self, name: str) -> str:
        """The type group whose ``PeftModel`` holds adapter ``name``'s weights."""
        with self._lock:
            return self._by_name[name].group
