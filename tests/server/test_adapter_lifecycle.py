"""LoadAdapter/UnloadAdapter/WatchAdapters, budgets and pins, lazy loading and admin tokens.

Each test gets its own adapters root under tmp_path (copies of the demo adapters), so loading
and unloading never disturbs the shared demo server.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from peftserve.client import PeftServeClient, PeftServeClientError

from ..conftest import DEMO_ADAPTERS, ServerThread

PROMPT = "the quick brown fox"


def make_root(tmp_path: Path, *names: str) -> Path:
    root = tmp_path / "adapters"
    root.mkdir()
    for name in names:
        shutil.copytree(DEMO_ADAPTERS / name, root / name)
    return root


@pytest.fixture
def server_factory() -> Iterator[Any]:
    servers: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        server = ServerThread(**overrides)
        server.wait_ready()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=1.0)


def states(client: PeftServeClient) -> dict[str, str]:
    return {a.name: a.state for a in client.list_adapters()}


def test_load_list_generate_unload_then_not_found(tmp_path: Path, server_factory: Any) -> None:
    root = make_root(tmp_path, "upper")
    shutil.copytree(DEMO_ADAPTERS / "upper", root / "team" / "upper-v2")
    server = server_factory(adapters_dir=root)
    with PeftServeClient(server.address, timeout_s=60) as client:
        assert states(client) == {"upper": "ready"}  # the nested copy is not discovered
        original = client.load_adapter("upper")  # already loaded at startup: returns it
        loaded = client.load_adapter("shout", "team/upper-v2")
        assert loaded.state == "ready" and loaded.peft_type == "LORA" and loaded.rank
        assert loaded.target_modules and loaded.path == "team/upper-v2"
        assert len(loaded.sha256) == 64
        assert loaded.sha256 == original.sha256  # same bytes under another name and path
        listed = {a.name: a for a in client.list_adapters()}["shout"]
        assert (listed.state, listed.sha256) == ("ready", loaded.sha256)
        kwargs: dict[str, Any] = {"max_new_tokens": len(PROMPT) + 1, "return_token_ids": True}
        out = client.generate(PROMPT, adapter="shout", **kwargs)
        assert out.adapter_sha256 == loaded.sha256
        assert PROMPT.upper() in out.text  # the adapter's effect, not the base model's
        reference = client.generate(PROMPT, adapter="upper", **kwargs)
        assert out.sequences[0].token_ids == reference.sequences[0].token_ids
        assert out.text == reference.text
        used = {a.name: a for a in client.list_adapters()}["shout"]
        assert used.last_used is not None and abs(used.last_used - time.time()) < 60
        assert used.in_flight_requests == 0
        # Loading the same name and path again is a no-op that returns it.
        assert client.load_adapter("shout", "team/upper-v2").sha256 == loaded.sha256
        with pytest.raises(PeftServeClientError) as exists:
            client.load_adapter("shout", "team")
        assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
        unloaded = client.unload_adapter("shout")
        assert unloaded.name == "shout"
        assert states(client) == {"upper": "ready"}  # the original is untouched
        assert client.generate(PROMPT, adapter="upper", **kwargs).text == reference.text
        with pytest.raises(PeftServeClientError) as gone:
            client.generate(PROMPT, adapter="shout", max_new_tokens=2)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(PeftServeClientError) as again:
            client.unload_adapter("shout")
        assert again.value.code == grpc.StatusCode.NOT_FOUND


def test_unsafe_paths_and_pickle_weights_are_refused_by_field(
    tmp_path: Path, server_factory: Any
) -> None:
    root = make_root(tmp_path, "upper")
    outside = tmp_path / "outside"
    shutil.copytree(DEMO_ADAPTERS / "title", outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(DEMO_ADAPTERS / "upper" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    weights_link = root / "weights-link"
    weights_link.mkdir()
    shutil.copy(DEMO_ADAPTERS / "upper" / "adapter_config.json", weights_link)
    (weights_link / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    server = server_factory(adapters_dir=root)
    cases = {
        str(outside): grpc.StatusCode.INVALID_ARGUMENT,  # absolute
        "../outside": grpc.StatusCode.INVALID_ARGUMENT,
        "upper/../../outside": grpc.StatusCode.INVALID_ARGUMENT,
        "escape": grpc.StatusCode.INVALID_ARGUMENT,  # symlink resolving outside the root
        "pickled": grpc.StatusCode.FAILED_PRECONDITION,
        "weights-link": grpc.StatusCode.FAILED_PRECONDITION,
        # A missing directory registers nothing (a FAILED entry per name grew the list).
        "missing": grpc.StatusCode.NOT_FOUND,
    }
    with PeftServeClient(server.address, timeout_s=60) as client:
        for path, code in cases.items():
            with pytest.raises(PeftServeClientError) as refused:
                client.load_adapter("x", path)
            assert refused.value.code == code, path
            assert refused.value.field == "path", (path, refused.value)
            if path == "pickled":
                assert "pickle" in refused.value.message
        with pytest.raises(PeftServeClientError) as bad_name:
            client.load_adapter("../x", "upper")
        assert (bad_name.value.code, bad_name.value.field) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "name",
        )
        # A failed load is listed with its reason, and the server keeps serving.
        failed = {a.name: a for a in client.list_adapters()}["x"]
        assert failed.state == "failed" and "outside" in failed.error, failed
        assert client.generate(PROMPT, adapter="upper", max_new_tokens=3).text
        with pytest.raises(PeftServeClientError) as not_ready:
            client.generate(PROMPT, adapter="x", max_new_tokens=2)
        assert not_ready.value.code == grpc.StatusCode.NOT_FOUND


def test_startup_discovery_refuses_adapters_that_resolve_outside_the_root(
    tmp_path: Path, server_factory: Any
) -> None:
    root = make_root(tmp_path, "upper")
    outside = tmp_path / "outside"
    shutil.copytree(DEMO_ADAPTERS / "title", outside / "title")
    # A directory symlink leading out, and a real directory whose weights file links out.
    (root / "escape").symlink_to(outside / "title", target_is_directory=True)
    (root / "weights-link").mkdir()
    shutil.copy(DEMO_ADAPTERS / "title" / "adapter_config.json", root / "weights-link")
    (root / "weights-link" / "adapter_model.safetensors").symlink_to(
        outside / "title" / "adapter_model.safetensors"
    )
    server = server_factory(adapters_dir=root)
    with PeftServeClient(server.address, timeout_s=60) as client:
        listed = {a.name: a for a in client.list_adapters()}
        assert {n: a.state for n, a in listed.items()} == {
            "escape": "failed",
            "upper": "ready",
            "weights-link": "failed",
        }
        assert "outside the adapters root" in listed["escape"].error
        assert "outside the adapters root" in listed["weights-link"].error
        for name in ("escape", "weights-link"):
            with pytest.raises(PeftServeClientError) as refused:
                client.generate(PROMPT, adapter=name, max_new_tokens=2)
            assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert client.generate(PROMPT, adapter="upper", max_new_tokens=3).text


def test_lru_eviction_under_a_budget_spares_pinned(tmp_path: Path, server_factory: Any) -> None:
    root = make_root(tmp_path, "upper", "title", "reverse")
    server = server_factory(adapters_dir=root, max_loaded_adapters=2, pinned_adapters=("reverse",))
    with PeftServeClient(server.address, timeout_s=60) as client:
        # Startup: the pinned one first, then the budget's remainder in name order.
        assert states(client) == {"reverse": "ready", "title": "ready"}
        assert {a.name: a.pinned for a in client.list_adapters()} == {
            "reverse": True,
            "title": False,
        }
        # Using the pinned adapter makes it the most recent; eviction still picks title.
        client.generate(PROMPT, adapter="reverse", max_new_tokens=2)
        client.load_adapter("upper")
        assert states(client) == {"reverse": "ready", "upper": "ready"}
        client.load_adapter("title", pinned=True)
        assert states(client) == {"reverse": "ready", "title": "ready"}
        with pytest.raises(PeftServeClientError) as full:
            client.load_adapter("upper")
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert full.value.reason == "ADAPTER_BUDGET_EXHAUSTED"
        # Pins protect from eviction only: an explicit unload still works.
        client.unload_adapter("title")
        assert client.load_adapter("upper").state == "ready"


def test_lru_evicts_the_least_recently_used(tmp_path: Path, server_factory: Any) -> None:
    root = make_root(tmp_path, "upper", "title", "reverse")
    server = server_factory(adapters_dir=root, max_loaded_adapters=2)
    with PeftServeClient(server.address, timeout_s=60) as client:
        assert set(states(client)) == {"reverse", "title"}
        client.generate(PROMPT, adapter="reverse", max_new_tokens=2)  # title is now the LRU
        client.load_adapter("upper")
        assert set(states(client)) == {"reverse", "upper"}


def test_watch_sees_the_current_set_then_load_and_unload(
    tmp_path: Path, server_factory: Any
) -> None:
    root = make_root(tmp_path, "upper", "title")
    server = server_factory(adapters_dir=root, pinned_adapters=("upper",), max_loaded_adapters=1)
    events: list[tuple[str, str, str]] = []
    synced = threading.Event()
    done = threading.Event()

    def watch() -> None:
        with PeftServeClient(server.address, timeout_s=60) as watcher:
            for event in watcher.watch_adapters():
                adapter = event.adapter
                events.append(
                    (event.kind, adapter.name if adapter else "", adapter.state if adapter else "")
                )
                if event.kind == "synced":
                    synced.set()
                if event.kind == "removed" and adapter is not None and adapter.name == "title":
                    done.set()
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert synced.wait(30)
    with PeftServeClient(server.address, timeout_s=60) as client:
        client.unload_adapter("upper")
        client.load_adapter("title")
        client.unload_adapter("title")
    assert done.wait(30), events
    thread.join(10)
    assert events[:2] == [("existing", "upper", "ready"), ("synced", "", "")]
    assert events[2:] == [
        ("changed", "upper", "unloading"),
        ("removed", "upper", "unloading"),
        ("changed", "title", "loading"),
        ("changed", "title", "ready"),
        ("changed", "title", "unloading"),
        ("removed", "title", "unloading"),
    ]


def test_watch_ends_normally_when_the_server_stops(tmp_path: Path) -> None:
    server = ServerThread(adapters_dir=make_root(tmp_path, "upper"))
    server.wait_ready()
    kinds: list[str] = []
    outcome: list[BaseException | None] = []
    synced = threading.Event()

    def watch() -> None:
        try:
            with PeftServeClient(server.address, timeout_s=60) as watcher:
                for event in watcher.watch_adapters():
                    kinds.append(event.kind)
                    synced.set()
        except BaseException as error:  # reported to the test below
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        assert synced.wait(30)
    finally:
        server.stop(grace_s=5.0)
    thread.join(10)
    # The stream completed (status OK) rather than being cancelled at the end of the grace.
    assert outcome == [None] and kinds[-1] == "synced"


def test_unload_waits_for_in_flight_requests(tmp_path: Path, server_factory: Any) -> None:
    root = make_root(tmp_path, "upper")
    server = server_factory(adapters_dir=root, engine_process=False)  # reaches the worker
    # Hold the worker thread between batches, so the request below stays admitted (in flight)
    # until the test says so: no race against how fast this machine generates.
    gate = threading.Event()
    server.server.engine()._batcher.run_between_steps(lambda: gate.wait(60))
    results: list[Any] = []
    unloaded: list[Any] = []
    try:
        with PeftServeClient(server.address, timeout_s=60) as client:
            long = threading.Thread(
                target=lambda: results.append(
                    client.generate(PROMPT, adapter="upper", max_new_tokens=50, min_new_tokens=50)
                ),
                daemon=True,
            )
            long.start()
            deadline = time.monotonic() + 30
            while client.list_adapters()[0].in_flight_requests == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # Too short a deadline: the unload is refused and changes nothing.
            with pytest.raises(PeftServeClientError) as early:
                client.unload_adapter("upper", timeout_s=0.2)
            assert early.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            while states(client) != {"upper": "ready"}:  # noticed on the server's next poll
                assert time.monotonic() < deadline
                time.sleep(0.01)
            unloader = threading.Thread(
                target=lambda: unloaded.append(client.unload_adapter("upper")), daemon=True
            )
            unloader.start()
            while states(client) != {"upper": "unloading"}:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # While it waits, new requests naming the adapter are refused at once...
            with pytest.raises(PeftServeClientError) as refused:
                client.generate(PROMPT, adapter="upper", max_new_tokens=2)
            assert refused.value.code == grpc.StatusCode.NOT_FOUND
            # ...and it does not return while the admitted request is still unfinished.
            time.sleep(0.2)
            assert not unloaded and not results
            gate.set()
            long.join(60)
            unloader.join(60)
            assert results and results[0].sequences[0].finish_reason == "length"
            assert results[0].text.startswith(PROMPT.upper())  # it ran with the adapter
            assert unloaded and unloaded[0].name == "upper" and client.list_adapters() == ()
    finally:
        gate.set()


@pytest.mark.parametrize("lazy", [True, False])
def test_lazy_loading_on_first_use_fails_closed(
    tmp_path: Path, server_factory: Any, lazy: bool
) -> None:
    root = make_root(tmp_path, "upper")
    server = server_factory(adapters_dir=root, lazy_load_adapters=lazy, max_loaded_adapters=1)
    with PeftServeClient(server.address, timeout_s=60) as client:
        client.unload_adapter("upper")
        assert client.list_adapters() == ()
        if lazy:
            out = client.generate(PROMPT, adapter="upper", max_new_tokens=len(PROMPT) + 1)
            assert PROMPT.upper() in out.text
            assert states(client) == {"upper": "ready"}
        else:
            with pytest.raises(PeftServeClientError) as off:
                client.generate(PROMPT, adapter="upper", max_new_tokens=2)
            assert off.value.code == grpc.StatusCode.NOT_FOUND
        # Unknown names and escapes stay NOT_FOUND either way.
        for name in ("nope", "..", "upper/../upper"):
            with pytest.raises(PeftServeClientError) as unknown:
                client.generate(PROMPT, adapter=name, max_new_tokens=2)
            assert unknown.value.code == grpc.StatusCode.NOT_FOUND, name


def test_admin_token_is_required_when_configured(tmp_path: Path, server_factory: Any) -> None:
    root = make_root(tmp_path, "upper")
    admin = "admin-" + "a" * 32
    caller = "caller-" + "c" * 32
    server = server_factory(adapters_dir=root, admin_tokens=(admin,), auth_tokens=(caller,))
    with PeftServeClient(server.address, token=caller, timeout_s=60) as as_caller:
        assert as_caller.list_adapters()[0].name == "upper"
        with pytest.raises(PeftServeClientError) as denied:
            as_caller.unload_adapter("upper")
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    with PeftServeClient(server.address, timeout_s=60) as anonymous:
        with pytest.raises(PeftServeClientError) as missing:
            anonymous.load_adapter("upper")
        assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
    with PeftServeClient(server.address, token=admin, timeout_s=60) as as_admin:
        assert as_admin.unload_adapter("upper").name == "upper"
        assert as_admin.load_adapter("upper").state == "ready"
        # The admin token is not a caller token.
        with pytest.raises(PeftServeClientError) as not_caller:
            as_admin.list_adapters()
        assert not_caller.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_admin_tokens_alone_guard_only_load_and_unload(tmp_path: Path, server_factory: Any) -> None:
    from peftserve.server.config import config_from_args

    root = make_root(tmp_path, "upper")
    admin, other = "admin-" + "a" * 32, "other-" + "o" * 32
    tokens_file = tmp_path / "admin-tokens"
    tokens_file.write_text(f"# operators\n{admin}\n")
    # The flag and the environment variable both reach the config.
    parsed = config_from_args(
        ["--admin-tokens-file", str(tokens_file)], env={"PEFTSERVE_ADMIN_TOKENS": f" {other} "}
    )
    assert (parsed.admin_tokens_file, parsed.admin_tokens) == (tokens_file, (other,))
    server = server_factory(adapters_dir=root, admin_tokens_file=tokens_file)
    with PeftServeClient(server.address, timeout_s=60) as anonymous:
        # No caller tokens configured: everything but the admin RPCs stays open.
        assert anonymous.generate(PROMPT, adapter="upper", max_new_tokens=2).sequences
        assert [a.name for a in anonymous.list_adapters()] == ["upper"]
        with pytest.raises(PeftServeClientError) as missing:
            anonymous.unload_adapter("upper")
        assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
    with PeftServeClient(server.address, token=other, timeout_s=60) as wrong:
        with pytest.raises(PeftServeClientError) as denied:
            wrong.load_adapter("again", "upper")
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    with PeftServeClient(server.address, token=admin, timeout_s=60) as as_admin:
        assert as_admin.load_adapter("again", "upper").state == "ready"
        assert as_admin.unload_adapter("again").name == "again"


def test_cli_load_and_unload_adapter(
    tmp_path: Path, server_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from peftserve.client.cli import main

    root = make_root(tmp_path, "upper")
    server = server_factory(adapters_dir=root)
    target = ["--target", server.address]
    assert main([*target, "load-adapter", "shout", "upper", "--pin"]) == 0
    loaded = capsys.readouterr().out
    assert loaded.startswith("loaded: shout\tLORA\trank=") and "\tready\tpinned" in loaded
    assert main([*target, "adapters"]) == 0
    assert capsys.readouterr().out.startswith("shout\tLORA\trank=")
    assert main([*target, "unload-adapter", "shout"]) == 0
    assert capsys.readouterr().out.startswith("unloaded: shout")
    assert main([*target, "load-adapter", "bad", "../upper"]) == 2
    assert "path: must not contain '..'" in capsys.readouterr().err


@pytest.mark.parametrize("new_adapter", ["upper", "title"])  # same PEFT type group / a new one
def test_loading_during_a_running_stream_leaves_its_tokens_unchanged(
    tmp_path: Path, server_factory: Any, new_adapter: str
) -> None:
    root = make_root(tmp_path, "reverse")
    # Nested, so it is not discovered at startup: for "title" (LoHa) the load creates a new
    # PEFT type group over the shared base weights while the LoRA batch runs.
    shutil.copytree(DEMO_ADAPTERS / new_adapter, root / "pending" / new_adapter)
    server = server_factory(adapters_dir=root)
    kwargs: dict[str, Any] = {"adapter": "reverse", "max_new_tokens": 150, "min_new_tokens": 150}
    with PeftServeClient(server.address, timeout_s=60) as client:
        reference = client.generate(PROMPT, return_token_ids=True, **kwargs)
        events = client.stream_events(PROMPT, return_token_ids=True, **kwargs)
        next(iter(events))  # the stream's batch is running now
        loader = threading.Thread(
            target=client.load_adapter, args=("late", f"pending/{new_adapter}")
        )
        loader.start()
        rest = list(events)
        loader.join(60)
        summary = rest[-1].output
        assert summary.sequences[0].token_ids == reference.sequences[0].token_ids
        assert states(client)["late"] == "ready"
        # The late adapter serves exactly like the original directory would.
        expected = {"upper": PROMPT.upper(), "title": PROMPT.title()}[new_adapter]
        assert client.generate(PROMPT, adapter="late").text == expected
