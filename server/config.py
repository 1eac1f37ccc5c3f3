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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .admin import ADMIN_TOKENS_ENV
from .auth import AUTH_TOKENS_ENV, parse_token_list, read_tokens_file, token_problem
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
    # HTTP/2 streams one connection may have open; at least what the engine admits
    # (max_batch_size + max_queue_size) plus headroom, so that overload is answered by the
    # engine (RESOURCE_EXHAUSTED with RetryInfo) and not by grpc refusing streams.
    max_concurrent_streams: int = 1024
    # On SIGTERM/SIGINT: how long in-flight requests may take to finish before being cancelled.
    shutdown_grace_s: float = 30.0
    # Send each client connection GOAWAY after this long (0 = never): clients then reconnect
    # and re-resolve the target, so replicas added by scale-up get calls from long-lived
    # clients too. In-flight calls on the old connection finish normally.
    max_connection_age_s: float = 0.0
    # A streamed message whose write has not completed after this long (the caller stopped
    # reading) cancels the stream and frees its output; 0 = never.
    stream_stall_timeout_s: float = 60.0
    log_level: str = "INFO"
    log_format: str = "text"  # "text" | "json"
    # TLS (PEM files). No certificate = plaintext: fine on loopback, see SECURITY.md otherwise.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # CA that client certificates must chain to; only used with tls_require_client_auth, as
    # gRPC does not even ask for a client certificate without it.
    tls_client_ca_file: Path | None = None
    tls_require_client_auth: bool = False
    # Bearer tokens: the file's (one per line) plus ``auth_tokens`` (PEFTSERVE_AUTH_TOKENS,
    # deliberately no flag). None configured = no token auth.
    auth_tokens_file: Path | None = None
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    # Admin tokens for LoadAdapter/UnloadAdapter: the file's plus ``admin_tokens``
    # (PEFTSERVE_ADMIN_TOKENS, no flag). None configured = those RPCs follow the caller auth.
    admin_tokens_file: Path | None = None
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    # host:port of the Prometheus /metrics HTTP endpoint; "" = no metrics endpoint.
    metrics_address: str = ""
    # Run the engine (model, decode loop, adapters) in a child process of its own, so the
    # gRPC front and the model loop do not share one GIL (docs/engine.md "Engine process");
    # false: in the server's own process (tests that inject faults into the engine object).
    engine_process: bool = True


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
    _Option(
        "server",
        "engine_process",
        "run the engine in a child process of its own, apart from the gRPC front (true/false)",
    ),
    _Option("engine", "device", "device: auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
    _Option("engine", "dtype", "weights dtype", choices=("float32", "bfloat16", "float16")),
    _Option("engine", "max_batch_size", "most model rows decoding at once"),
    _Option(
        "engine",
        "max_batch_tokens",
        "KV-cache budget in tokens; each running request reserves rows x (prompt + max_new_tokens)",
    ),
    _Option(
        "engine",
        "max_prefill_tokens",
        "most prompt tokens fed per step; longer prompts are prefilled in chunks",
    ),
    _Option("engine", "max_wait_ms", "when idle, how long the first request waits for companions"),
    _Option("engine", "max_queue_size", "waiting requests beyond this get RESOURCE_EXHAUSTED"),
    _Option("engine", "max_prompt_tokens", "most prompt tokens per request (default: context)"),
    _Option(
        "engine",
        "max_prompt_bytes",
        "longest prompt text in UTF-8 bytes, refused before tokenizing "
        "(default: max prompt tokens x the longest vocabulary entry)",
    ),
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
    _Option(
        "engine",
        "max_loaded_adapters",
        "most adapters loaded at once, least recently used idle ones evicted (0 = unlimited)",
    ),
    _Option(
        "engine",
        "pinned_adapters",
        "comma-separated adapters (subdirectories of --adapters-dir) never evicted",
    ),
    _Option(
        "engine",
        "lazy_load_adapters",
        "load a subdirectory of --adapters-dir when a request first names it (true/false)",
    ),
    _Option("engine", "max_constraints", "most bad_words / sequence_bias entries per request"),
    _Option("engine", "max_constraint_length", "longest bad word or biased text, in characters"),
    _Option(
        "engine",
        "max_constraint_text_length",
        "longest constraint (JSON schema, regex, grammar, all choices), in characters",
    ),
    _Option(
        "engine",
        "constraint_compile_timeout_s",
        "seconds a constraint may take to compile before its request is RESOURCE_EXHAUSTED",
    ),
    _Option("engine", "constraint_cache_size", "compiled constraints cached, by grammar text"),
    _Option("engine", "constraint_compile_threads", "threads that compile constraints"),
    _Option("server", "max_receive_message_bytes", "largest gRPC message accepted, in bytes"),
    _Option("server", "max_send_message_bytes", "largest gRPC message sent, in bytes"),
    _Option(
        "server",
        "max_concurrent_streams",
        "HTTP/2 streams per connection; raised to max batch size + max queue size + 16 if lower",
    ),
    _Option("server", "shutdown_grace_s", "seconds in-flight requests get to finish on SIGTERM"),
    _Option(
        "server",
        "max_connection_age_s",
        "close client connections after this many seconds (GOAWAY) so clients re-resolve and "
        "reach new replicas; in-flight calls finish (0 = never)",
    ),
    _Option(
        "server",
        "stream_stall_timeout_s",
        "cancel a stream whose next message has waited this long for the caller to read it "
        "(0 = never)",
    ),
    _Option(
        "engine",
        "max_stream_buffered_tokens",
        "generated tokens a stream may hold unread before the request is stopped "
        "(RESOURCE_EXHAUSTED SLOW_CONSUMER; 0 = unbounded)",
    ),
    _Option(
        "engine",
        "max_watch_buffered_events",
        "adapter changes a WatchAdapters caller may leave unread before it is dropped",
    ),
    _Option("server", "log_level", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    _Option("server", "log_format", "log line format", choices=("text", "json")),
    _Option("server", "tls_cert_file", "PEM certificate chain of the server; enables TLS"),
    _Option("server", "tls_key_file", "PEM private key of --tls-cert-file"),
    _Option(
        "server",
        "tls_client_ca_file",
        "PEM CA bundle that client certificates must chain to (mutual TLS)",
    ),
    _Option(
        "server",
        "tls_require_client_auth",
        "require a client certificate signed by --tls-client-ca-file (true/false)",
    ),
    _Option(
        "server",
        "auth_tokens_file",
        f"file of accepted bearer tokens, one per line (also: {AUTH_TOKENS_ENV}, comma-separated)",
    ),
    _Option(
        "server",
        "admin_tokens_file",
        "file of admin bearer tokens required by LoadAdapter/UnloadAdapter, one per line "
        f"(also: {ADMIN_TOKENS_ENV}, comma-separated)",
    ),
    _Option(
        "server",
        "metrics_address",
        "host:port of the Prometheus /metrics endpoint, e.g. 127.0.0.1:9464 (empty: off)",
    ),
)


def _field_types(cls: type) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_bool(raw: str) -> bool:
    try:
        return _BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"expected true/false/1/0/yes/no, got {raw!r}") from None


def _base_type(annotation: str) -> str:
    return annotation.replace(" | None", "").strip()


def _parser_for(annotation: str) -> Any:
    """Turn a field's (string) annotation into a value parser for argparse."""
    parsers = {
        "int": int,
        "float": float,
        "str": str,
        "Path": Path,
        "bool": _parse_bool,
        "tuple[str, ...]": parse_token_list,  # comma-separated
    }
    return parsers[_base_type(annotation)]


def _parse_value(option: _Option, raw: str, annotation: str) -> Any:
    if raw == "" and "None" in annotation:
        return None
    try:
        return _parser_for(annotation)(raw)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--{option.name.replace('_', '-')}: {err}") from err


def _value_parser(option: _Option, annotation: str) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        return _parse_value(option, raw, annotation)

    return parse


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
        # A bare boolean flag (``--tls-require-client-auth``) means true.
        bool_kwargs: dict[str, Any] = (
            {"nargs": "?", "const": True} if _base_type(annotation) == "bool" else {}
        )
        parser.add_argument(
            f"--{option.name.replace('_', '-')}",
            dest=option.name,
            type=_value_parser(option, annotation),
            default=default,
            choices=option.choices,
            metavar=option.name.upper() if option.choices is None else None,
            help=f"{option.help} [env {env_name}; default: {default}]",
            **bool_kwargs,
        )
    return parser


def config_from_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """Parse flags (and the environment) into a validated ``ServerConfig``."""
    env = os.environ if env is None else env
    parser = build_arg_parser(env)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    engine_kwargs = {o.name: values[o.name] for o in _OPTIONS if o.owner == "engine"}
    server_kwargs = {o.name: values[o.name] for o in _OPTIONS if o.owner == "server"}
    config = ServerConfig(
        engine=EngineConfig(**engine_kwargs),
        auth_tokens=parse_token_list(env.get(AUTH_TOKENS_ENV, "")),
        admin_tokens=parse_token_list(env.get(ADMIN_TOKENS_ENV, "")),
        **server_kwargs,
    )
    problems = validate_config(config)
    if problems:
        parser.error("; ".join(problems))
    return config


def _tokens_from_file(flag: str, path: Path | None, problems: list[str]) -> tuple[str, ...]:
    """The tokens of a tokens file; unreadable or empty files are reported in ``problems``."""
    if path is None or not path.is_file():
        return ()  # a missing file is reported with the other file checks
    try:
        tokens = read_tokens_file(path)
    except (OSError, UnicodeError) as err:
        problems.append(f"{flag} {path}: {err}")
        return ()
    if not tokens:
        # An empty file must not silently mean "auth off".
        problems.append(f"{flag} {path} holds no tokens")
    return tokens


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
    for name in ("max_batch_size", "max_batch_tokens", "max_prefill_tokens", "max_queue_size"):
        if getattr(engine, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if engine.max_prompt_bytes is not None and engine.max_prompt_bytes < 1:
        problems.append("--max-prompt-bytes must be >= 1")
    if engine.max_wait_ms < 0:
        problems.append("--max-wait-ms must be >= 0")
    for name in (
        "max_constraint_text_length",
        "constraint_cache_size",
        "constraint_compile_threads",
    ):
        if getattr(engine, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if not engine.constraint_compile_timeout_s > 0:
        problems.append("--constraint-compile-timeout-s must be > 0")
    if config.shutdown_grace_s < 0:
        problems.append("--shutdown-grace-s must be >= 0")
    if config.max_connection_age_s < 0:
        problems.append("--max-connection-age-s must be >= 0")
    if config.max_concurrent_streams < 1:
        problems.append("--max-concurrent-streams must be >= 1")
    if config.stream_stall_timeout_s < 0:
        problems.append("--stream-stall-timeout-s must be >= 0")
    if engine.max_stream_buffered_tokens < 0:
        problems.append("--max-stream-buffered-tokens must be >= 0")
    if engine.max_watch_buffered_events < 1:
        problems.append("--max-watch-buffered-events must be >= 1")
    if engine.max_loaded_adapters < 0:
        problems.append("--max-loaded-adapters must be >= 0")
    elif 0 < engine.max_loaded_adapters < len(engine.pinned_adapters):
        problems.append("--pinned-adapters names more adapters than --max-loaded-adapters")
    if engine.pinned_adapters and engine.adapters_dir is not None:
        missing = [n for n in engine.pinned_adapters if not (engine.adapters_dir / n).is_dir()]
        if missing:
            problems.append(f"--pinned-adapters not in --adapters-dir: {', '.join(missing)}")
    if config.metrics_address and ":" not in config.metrics_address:
        problems.append(f"--metrics-address {config.metrics_address!r} must be host:port")
    problems.extend(validate_security(config))
    return problems


def validate_security(config: ServerConfig) -> list[str]:
    """TLS and token settings that cannot work; the server refuses to start on any of them.

    Separate from ``validate_config`` because ``create_server`` runs it too: a half-configured
    TLS or auth setting must never quietly fall back to plaintext or to no auth.
    """
    problems: list[str] = []
    files = {
        "--tls-cert-file": config.tls_cert_file,
        "--tls-key-file": config.tls_key_file,
        "--tls-client-ca-file": config.tls_client_ca_file,
        "--auth-tokens-file": config.auth_tokens_file,
        "--admin-tokens-file": config.admin_tokens_file,
    }
    for flag, path in files.items():
        if path is not None and not path.is_file():
            problems.append(f"{flag} {path} is not a readable file")
    if (config.tls_cert_file is None) != (config.tls_key_file is None):
        problems.append("--tls-cert-file and --tls-key-file must be set together")
    if config.tls_cert_file is None and (
        config.tls_client_ca_file is not None or config.tls_require_client_auth
    ):
        problems.append("client certificate settings need --tls-cert-file and --tls-key-file")
    if config.tls_require_client_auth and config.tls_client_ca_file is None:
        problems.append("--tls-require-client-auth needs --tls-client-ca-file")
    if config.tls_client_ca_file is not None and not config.tls_require_client_auth:
        problems.append(
            "--tls-client-ca-file has no effect without --tls-require-client-auth "
            "(gRPC would not ask for client certificates)"
        )
    tokens = [
        *config.auth_tokens,
        *_tokens_from_file("--auth-tokens-file", config.auth_tokens_file, problems),
        *_tokens_from_file("--admin-tokens-file", config.admin_tokens_file, problems),
    ]
    tokens.extend(config.admin_tokens)
    token_problems = {p for p in map(token_problem, tokens) if p is not None}
    problems.extend(f"auth tokens: {p}" for p in sorted(token_problems))
    return problems
