"""Server configuration: one frozen dataclass, built from flags and ``PEFTSERVE_*`` variables.

Every default lives in exactly one place: engine settings in ``EngineConfig``, server settings
in ``ServerConfig`` below. Flags are generated from both dataclasses, so ``--help`` lists every
setting with its environment variable and default, and the two can never disagree.
Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine.config import EngineConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
# The embedded demo model, present in a source checkout (not in wheels).
DEMO_MODEL_PATH = REPO_ROOT / "models" / "demo" / "base"
DEMO_ADAPTERS_DIR = REPO_ROOT / "models" / "demo" / "adapters"
ENV_PREFIX = "PEFTSERVE_"


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the gRPC process; ``engine`` holds the model and scheduling settings."""

    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(
            model_path=DEMO_MODEL_PATH, adapters_dir=DEMO_ADAPTERS_DIR
        )
    )
    # host:port to listen on; port 0 picks a free port (tests).
    address: str = "127.0.0.1:50051"
    # Largest gRPC message accepted or sent, in bytes.
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_send_message_bytes: int = 16 * 1024 * 1024
    # On SIGTERM/SIGINT: how long in-flight requests may take to finish before being cancelled.
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"  # "text" | "json"


@dataclass(frozen=True)
class _Option:
    """One command-line flag bound to a dataclass field."""

    owner: str  # "server" | "engine"
    name: str
    help: str
    choices: tuple[str, ...] | None = None


_OPTIONS: tuple[_Option, ...] = (
    _Option("server", "address", "host:port to listen on (port 0 picks a free port)"),
    _Option("engine", "model_path", "directory of the base model (transformers format)"),
    _Option(
        "engine",
        "adapters_dir",
        "directory whose subdirectories are PEFT adapters, each served under its name",
    ),
    _Option("engine", "model_id", "model id reported to clients (default: directory name)"),
    _Option("engine", "device", "device: auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
    _Option("engine", "dtype", "weights dtype", choices=("float32", "bfloat16", "float16")),
    _Option("engine", "max_batch_size", "most requests in one batch"),
    _Option("engine", "max_batch_tokens", "padded-token budget of one batch"),
    _Option("engine", "max_wait_ms", "how long a batch's first request waits for companions"),
    _Option("engine", "max_queue_size", "waiting requests beyond this get RESOURCE_EXHAUSTED"),
    _Option("engine", "max_prompt_tokens", "most prompt tokens per request (default: context)"),
    _Option("engine", "max_new_tokens", "largest max_new_tokens accepted (default: context)"),
    _Option(
        "engine",
        "default_max_new_tokens",
        "max_new_tokens when a request sets neither it nor max_length",
    ),
    _Option("engine", "max_beams_times_sequences", "largest num_beams x num_return_sequences"),
    _Option("engine", "max_stop_sequences", "most stop sequences per request"),
    _Option("engine", "max_stop_sequence_length", "longest stop sequence, in characters"),
    _Option("engine", "max_top_logprobs", "largest options.top_logprobs"),
    _Option("server", "max_receive_message_bytes", "largest gRPC message accepted, in bytes"),
    _Option("server", "max_send_message_bytes", "largest gRPC message sent, in bytes"),
    _Option("server", "shutdown_grace_s", "seconds in-flight requests get to finish on SIGTERM"),
    _Option("server", "log_level", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    _Option("server", "log_format", "log line format", choices=("text", "json")),
)


def _field_types(cls: type) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _parser_for(annotation: str) -> Any:
    """Turn a field's (string) annotation into a value parser for argparse."""
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str, "Path": Path}[base]


def _parse_value(option: _Option, raw: str, annotation: str) -> Any:
    if raw == "" and "None" in annotation:
        return None
    try:
        return _parser_for(annotation)(raw)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--{option.name.replace('_', '-')}: {err}") from err


def build_arg_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The ``peftserve serve`` argument parser; defaults come from ``env`` then dataclasses."""
    env = os.environ if env is None else env
    defaults = ServerConfig()
    server_fields = _field_types(ServerConfig)
    engine_fields = _field_types(EngineConfig)
    parser = argparse.ArgumentParser(
        prog="peftserve serve",
        description="Serve text generation from a base model and its PEFT adapters over gRPC.",
        epilog="Every flag can also be set with the environment variable shown; "
        "flags win over the environment.",
    )
    for option in _OPTIONS:
        fields = server_fields if option.owner == "server" else engine_fields
        f = fields[option.name]
        annotation = str(f.type)
        default = getattr(defaults if option.owner == "server" else defaults.engine, option.name)
        env_name = ENV_PREFIX + option.name.upper()
        if env_name in env:
            default = _parse_value(option, env[env_name], annotation)
        parser.add_argument(
            f"--{option.name.replace('_', '-')}",
            dest=option.name,
            type=lambda raw, o=option, a=annotation: _parse_value(o, raw, a),
            default=default,
            choices=option.choices,
            metavar=option.name.upper() if option.choices is None else None,
            help=f"{option.help} [env {env_name}; default: {default}]",
        )
    return parser


def config_from_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """Parse flags (and the environment) into a validated ``ServerConfig``."""
    parser = build_arg_parser(env)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    engine_kwargs = {o.name: values[o.name] for o in _OPTIONS if o.owner == "engine"}
    server_kwargs = {o.name: values[o.name] for o in _OPTIONS if o.owner == "server"}
    config = ServerConfig(engine=EngineConfig(**engine_kwargs), **server_kwargs)
    problems = validate_config(config)
    if problems:
        parser.error("; ".join(problems))
    return config


def validate_config(config: ServerConfig) -> list[str]:
    """Sanity checks that would otherwise surface as confusing failures after startup."""
    problems: list[str] = []
    engine = config.engine
    if not engine.model_path.is_dir():
        problems.append(f"--model-path {engine.model_path} is not a directory")
    if engine.adapters_dir is not None and not engine.adapters_dir.is_dir():
        problems.append(f"--adapters-dir {engine.adapters_dir} is not a directory")
    if ":" not in config.address:
        problems.append(f"--address {config.address!r} must be host:port")
    for name in ("max_batch_size", "max_batch_tokens", "max_queue_size"):
        if getattr(engine, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if engine.max_wait_ms < 0:
        problems.append("--max-wait-ms must be >= 0")
    if config.shutdown_grace_s < 0:
        problems.append("--shutdown-grace-s must be >= 0")
    return problems
