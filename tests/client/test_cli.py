"""The CLI's own logic: target resolution, and ``serve`` delegating to the server lazily."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
from peftserve.client import cli


def test_target_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTSERVE_TARGET", "10.0.0.1:9")
    assert cli.build_parser().parse_args(["info"]).target == "10.0.0.1:9"
    assert cli.build_parser().parse_args(["--target", "h:1", "info"]).target == "h:1"
    # After the command as well, where it wins over the global position.
    args = cli.build_parser().parse_args(["--target", "h:1", "info", "--target", "h:2"])
    assert args.target == "h:2"
    monkeypatch.delenv("PEFTSERVE_TARGET")
    assert cli.build_parser().parse_args(["info"]).target == "127.0.0.1:50051"


def test_serve_hands_every_argument_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    fake = ModuleType("peftserve.server.__main__")

    def fake_main(argv: list[str]) -> int:
        received.append(argv)
        return 3

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "peftserve.server.__main__", fake)
    argv = ["--target", "x:1", "serve", "--port", "0", "--help"]
    assert cli.main(argv) == 3
    assert received == [["--port", "0", "--help"]]


def test_serve_without_the_server_extra_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry in sys.modules makes the import fail exactly like a missing module.
    monkeypatch.setitem(sys.modules, "peftserve.server.__main__", None)
    assert cli.main(["serve"]) == 1
    assert "pip install 'peftserve[server]'" in capsys.readouterr().err


def test_a_prompt_named_serve_is_not_the_serve_command() -> None:
    assert cli._serve_argv(["generate", "serve"]) is None
    assert cli._serve_argv(["--timeout", "5", "serve", "-v"]) == ["-v"]
