"""The ``peftserve`` command: generate, list adapters, describe the model, tokenize, serve.

A thin shell over ``PeftServeClient``; ``serve`` hands its arguments to the server's own entry
point, imported only then because the client install has no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from .channel import DEFAULT_TARGET
from .client import DEFAULT_TIMEOUT_S, PeftServeClient
from .errors import PeftServeClientError
from .types import AdapterInfo, GenerateOptions, SequenceDelta, StreamSummary

__all__ = ["build_parser", "main"]

TARGET_ENV = "PEFTSERVE_TARGET"
# Codes that mean "your request is wrong", as opposed to "the service could not serve it":
# scripts can tell the two apart by exit status, like argparse's own usage errors (2).
_USAGE_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})
_GLOBAL_OPTIONS_WITH_VALUE = frozenset({"--target", "--address", "--timeout"})
TARGET_HELP = (
    "server to call: host:port, dns:///host:port (every address of the name, e.g. a headless "
    "Service) or ipv4:host:port,host:port; calls are balanced round_robin over the healthy ones"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``serve``'s own flags belong to the server and are not parsed)."""
    parser = argparse.ArgumentParser(prog="peftserve", description=__doc__)
    # --address is what ``serve`` calls its own listening address, so a user tries it here too.
    parser.add_argument(
        "--target",
        "--address",
        dest="target",
        default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
        help=f"{TARGET_HELP} (env {TARGET_ENV}; default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="deadline per call (default %(default)s)",
    )
    # The same options after the command too ("peftserve generate hi --address h:1"); SUPPRESS
    # keeps an absent one from overwriting the global value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", "--address", dest="target", default=argparse.SUPPRESS, help=TARGET_HELP
    )
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", parents=[common], help="generate text from a prompt")
    generate.add_argument("text", nargs="?", help="the prompt (omit it with --message)")
    generate.add_argument("--adapter", default="", help="adapter name (default: base model)")
    generate.add_argument("--stream", action="store_true", help="print tokens as they come")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--min-new-tokens", type=int)
    generate.add_argument(
        "--sample",
        dest="do_sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample instead of greedy decoding (default: the model's)",
    )
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--repetition-penalty", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--num-beams", type=int)
    generate.add_argument("--num-return-sequences", type=int)
    generate.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop sequence (repeatable)",
    )
    generate.add_argument("--request-id", default="")
    generate.add_argument("--json", action="store_true", help="print the full result as JSON")
    constraint = generate.add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema",
        metavar="SCHEMA",
        help="output must match this JSON Schema (@FILE reads one)",
    )
    constraint.add_argument("--json-object", action="store_true", help="output is a JSON object")
    constraint.add_argument("--regex", help="output must match this regular expression")
    constraint.add_argument(
        "--grammar",
        help="output must match this Lark grammar (llguidance dialect; @FILE reads one)",
    )
    constraint.add_argument(
        "--choice", action="append", metavar="TEXT", help="output is one of these (repeatable)"
    )
    generate.add_argument(
        "--message",
        action="append",
        type=_message,
        metavar="ROLE:CONTENT",
        help="a chat message instead of the prompt, rendered by the server's chat template "
        "(repeatable, in order), e.g. --message 'user:hello'",
    )
    generate.add_argument(
        "--no-generation-prompt",
        dest="add_generation_prompt",
        action="store_false",
        default=None,
        help="with --message: do not cue the assistant's reply",
    )
    generate.add_argument(
        "--continue-final-message",
        action="store_true",
        help="with --message: the reply continues the final (assistant) message",
    )

    adapters = commands.add_parser("adapters", parents=[common], help="list the loaded adapters")
    adapters.add_argument("--json", action="store_true")

    load = commands.add_parser(
        "load-adapter",
        parents=[common],
        help="load an adapter directory (relative to the server's adapters root)",
    )
    load.add_argument("name", help="the name requests will use")
    load.add_argument(
        "path", nargs="?", default="", help="directory under the adapters root (default: NAME)"
    )
    load.add_argument("--pin", action="store_true", help="never evict it to make room")
    load.add_argument("--json", action="store_true")

    unload = commands.add_parser(
        "unload-adapter", parents=[common], help="unload an adapter once its requests finish"
    )
    unload.add_argument("name")
    unload.add_argument("--json", action="store_true")

    info = commands.add_parser(
        "info", parents=[common], help="describe the served model and limits"
    )
    info.add_argument("--json", action="store_true")

    tokenize = commands.add_parser("tokenize", parents=[common], help="tokenize text")
    tokenize.add_argument("text")
    tokenize.add_argument(
        "--no-special-tokens",
        dest="add_special_tokens",
        action="store_false",
        help="do not add the model's special tokens",
    )
    tokenize.add_argument("--json", action="store_true")

    # Listed for --help only: main() hands everything after "serve" to the server untouched.
    commands.add_parser("serve", help="run the server (needs the 'server' extra)", add_help=False)
    return parser


def _serve_argv(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``serve`` when the command is serve, else None."""
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            index += 2
            continue
        if arg.startswith("-"):
            index += 1
            continue
        return list(argv[index + 1 :]) if arg == "serve" else None
    return None


def serve(argv: list[str]) -> int:
    """Run the server's entry point with ``argv``; a clear message if it is not installed."""
    try:
        from peftserve.server.__main__ import main as serve_main
    except ImportError as error:
        missing = error.name or str(error)
        print(
            f"error: the server is not installed (missing {missing}); "
            "install it with: pip install 'peftserve[server]'",
            file=sys.stderr,
        )
        return 1
    return int(serve_main(argv) or 0)


def _generate_options(args: argparse.Namespace) -> GenerateOptions:
    options: GenerateOptions = {
        "adapter": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "num_beams": args.num_beams,
        "num_return_sequences": args.num_return_sequences,
        "stop_sequences": args.stop,
        "request_id": args.request_id,
        "json_schema": _text_or_file(args.json_schema),
        "json_object": args.json_object,
        "regex": args.regex,
        "grammar": _text_or_file(args.grammar),
        "choice": args.choice,
    }
    if args.message:
        options["messages"] = args.message
        options["add_generation_prompt"] = args.add_generation_prompt
        options["continue_final_message"] = args.continue_final_message
    return options


def _text_or_file(value: str | None) -> str | None:
    if value is not None and value.startswith("@"):
        with open(value[1:], encoding="utf-8") as file:
            return file.read()
    return value


def _message(value: str) -> dict[str, str]:
    role, sep, content = value.partition(":")
    if not sep or not role:
        raise argparse.ArgumentTypeError(f"--message wants ROLE:CONTENT, got {value!r}")
    return {"role": role, "content": content}


def _print_json(value: Any) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, tuple):
        value = [dataclasses.asdict(v) for v in value]
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _generate(client: PeftServeClient, args: argparse.Namespace) -> None:
    options = _generate_options(args)
    if args.stream and args.json:
        # One JSON object per line, so a consumer can act on each event as it arrives.
        for event in client.stream_events(args.text, **options):
            kind = "delta" if isinstance(event, SequenceDelta) else "summary"
            payload = dataclasses.asdict(event)
            print(json.dumps({"event": kind, **payload}, ensure_ascii=False), flush=True)
    elif args.stream:
        summary: StreamSummary | None = None
        for event in client.stream_events(args.text, **options):
            if isinstance(event, SequenceDelta):
                if event.index == 0:
                    print(event.text, end="", flush=True)
            else:
                summary = event
        print()
        # Further sequences cannot be interleaved with the first on one terminal line.
        if summary is not None:
            for sequence in summary.output.sequences[1:]:
                print(f"--- sequence {sequence.index}\n{sequence.text}")
    else:
        output = client.generate(args.text, **options)
        if args.json:
            _print_json(output)
        elif len(output.sequences) == 1:
            print(output.text)
        else:
            for sequence in output.sequences:
                print(f"--- sequence {sequence.index}\n{sequence.text}")


def _run(args: argparse.Namespace) -> None:
    with PeftServeClient(args.target, timeout_s=args.timeout) as client:
        if args.command == "generate":
            _generate(client, args)
        elif args.command == "adapters":
            adapters = client.list_adapters()
            if args.json:
                _print_json(adapters)
            elif not adapters:
                print("(no adapters loaded)")
            for adapter in [] if args.json else adapters:
                print(_adapter_line(adapter))
        elif args.command in ("load-adapter", "unload-adapter"):
            if args.command == "load-adapter":
                adapter = client.load_adapter(args.name, args.path, pinned=args.pin)
            else:
                adapter = client.unload_adapter(args.name)
            if args.json:
                _print_json(adapter)
            else:
                verb = "loaded" if args.command == "load-adapter" else "unloaded"
                print(f"{verb}: {_adapter_line(adapter)}")
        elif args.command == "info":
            info = client.model_info()
            if args.json:
                _print_json(info)
            else:
                for key, value in dataclasses.asdict(info).items():
                    print(f"{key}: {value}")
        elif args.command == "tokenize":
            tokens = client.tokenize(args.text, add_special_tokens=args.add_special_tokens)
            if args.json:
                _print_json(tokens)
            else:
                for token_id, token in zip(tokens.token_ids, tokens.tokens, strict=True):
                    print(f"{token_id}\t{token!r}")


def _adapter_line(adapter: AdapterInfo) -> str:
    # The first four columns are the pre-lifecycle format (scripts parse it); state is appended.
    rank = "-" if adapter.rank is None else str(adapter.rank)
    pinned = "\tpinned" if adapter.pinned else ""
    return (
        f"{adapter.name}\t{adapter.peft_type or '-'}\trank={rank}"
        f"\t{adapter.sha256[:12] or '-'}\t{adapter.state}{pinned}"
    )


def _report(error: PeftServeClientError) -> int:
    print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
    for field, description in error.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)
    if error.retry_after_s is not None:
        print(f"  retry after {error.retry_after_s:g}s", file=sys.stderr)
    if error.request_id:
        print(f"  request_id: {error.request_id}", file=sys.stderr)
    return 2 if error.code in _USAGE_CODES else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftserve`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_argv = _serve_argv(argv)
    if serve_argv is not None:
        return serve(serve_argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and (args.text is None) == (not args.message):
        parser.error("generate: give a prompt or --message, exactly one of them")
    try:
        _run(args)
    except PeftServeClientError as error:
        return _report(error)
    except ValueError as error:
        # Values protobuf cannot hold (e.g. a negative --seed), named by field.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
