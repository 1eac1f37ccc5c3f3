"""Engine.load_adapter/unload_adapter/watch_adapters without gRPC, on both test models."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from peftserve.server.engine import Engine
from peftserve.server.engine.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    InvalidRequestError,
)
from peftserve.server.engine.registry import shares_base_weights
from peftserve.server.engine.types import (
    AdapterEvent,
    AdapterEventKind,
    AdapterState,
    GenerationParams,
    GenerationRequest,
)

from .conftest import ModelFiles, engine_config


def request(adapter: str) -> GenerationRequest:
    return GenerationRequest(
        f"r-{adapter or 'base'}",
        text="the quick brown fox",
        adapter=adapter,
        parameters=GenerationParams(max_new_tokens=12, min_new_tokens=12),
    )


def drain(queue: asyncio.Queue[AdapterEvent]) -> list[tuple[AdapterEventKind, str, AdapterState]]:
    seen = []
    while not queue.empty():
        event = queue.get_nowait()
        seen.append((event.kind, event.status.name, event.status.state))
    return seen


def test_load_generate_unload_with_a_watch(
    model_files: ModelFiles, aio: asyncio.Runner, tmp_path: Path
) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(model_files.adapters / "upper", root / "upper")
    # Nested: not discovered at startup, only loadable by path.
    shutil.copytree(model_files.adapters / "upper", root / "team" / "upper-v2")
    engine = Engine(engine_config(model_files, adapters_dir=root))
    aio.run(engine.start())

    async def body() -> None:
        with engine.watch_adapters() as watch:
            assert [s.name for s in watch.snapshot] == ["upper"]
            loaded = await engine.load_adapter("shout", "team/upper-v2", pinned=True)
            assert loaded.state is AdapterState.READY and loaded.pinned
            assert loaded.path == "team/upper-v2" and loaded.info is not None
            original = engine.registry.get("upper")
            assert original is not None and loaded.info.sha256 == original.sha256
            copy, upper, base = [
                await engine.submit(request(name)).result() for name in ("shout", "upper", "")
            ]
            # Same weights under another name: the same tokens; and the adapter really acts.
            assert copy.sequences[0].token_ids == upper.sequences[0].token_ids
            assert copy.sequences[0].token_ids != base.sequences[0].token_ids
            last = await engine.unload_adapter("shout")
            assert last.last_used is not None and last.in_flight == 0
            assert [s.name for s in engine.adapter_statuses()] == ["upper"]
            with pytest.raises(AdapterNotFoundError):
                engine.submit(request("shout"))
            with pytest.raises(AdapterNotFoundError):
                await engine.unload_adapter("shout")
            with pytest.raises(InvalidRequestError, match="name: must not be empty"):
                await engine.unload_adapter("")
            with pytest.raises(AdapterLoadError):
                await engine.load_adapter("nothing", "team")  # no adapter_config.json there
            failed = engine.registry.entry("nothing")
            assert failed is not None and failed.state is AdapterState.FAILED and failed.error
            assert drain(watch.events) == [
                (AdapterEventKind.CHANGED, "shout", AdapterState.LOADING),
                (AdapterEventKind.CHANGED, "shout", AdapterState.READY),
                (AdapterEventKind.CHANGED, "shout", AdapterState.UNLOADING),
                (AdapterEventKind.REMOVED, "shout", AdapterState.UNLOADING),
                (AdapterEventKind.CHANGED, "nothing", AdapterState.LOADING),
                (AdapterEventKind.CHANGED, "nothing", AdapterState.FAILED),
            ]
        # The watch has ended: later changes reach no queue.
        await engine.unload_adapter("nothing")
        assert watch.events.empty()

    try:
        aio.run(body())
    finally:
        aio.run(engine.stop())


def test_loading_a_new_peft_type_creates_its_group_over_the_shared_base(
    model_files: ModelFiles, aio: asyncio.Runner, tmp_path: Path
) -> None:
    # The demo model's second type is LoHa ("title"); the random model's is IA3 ("scale").
    other = "title" if model_files.demo else "scale"
    root = tmp_path / "adapters"
    shutil.copytree(model_files.adapters / "upper", root / "upper")
    shutil.copytree(model_files.adapters / other, root / "later" / other)
    engine = Engine(engine_config(model_files, adapters_dir=root))
    aio.run(engine.start())
    try:
        assert set(engine.registry.groups) == {"LORA"}
        status = aio.run(engine.load_adapter("late", f"later/{other}"))
        assert status.info is not None and status.info.peft_type != "LORA"
        group = engine.registry.groups[status.info.peft_type]
        assert shares_base_weights(engine.registry.base, group.model)
        result = aio.run(engine.submit(request("late")).result())
        assert len(result.sequences[0].token_ids) == 12
    finally:
        aio.run(engine.stop())


def test_drain_ends_open_watches(model_files: ModelFiles, aio: asyncio.Runner) -> None:
    engine = Engine(engine_config(model_files))
    aio.run(engine.start())

    async def body() -> None:
        with engine.watch_adapters() as watch:
            assert watch.snapshot
            await engine.drain(1.0)
            assert await asyncio.wait_for(watch.events.get(), 5) is None
        # A watch opened while draining is over at once.
        with engine.watch_adapters() as late:
            assert late.events.get_nowait() is None

    try:
        aio.run(body())
    finally:
        aio.run(engine.stop())
