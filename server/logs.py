"""Logging set-up: human-readable text or one JSON object per line, request fields included.

Log lines carry caller-chosen values (request ids, adapter names, paths, peers). Neither format
lets such a value forge or hide a line: JSON escapes it, and the text format escapes every
control, format and line-separator character and quotes values with spaces, ``=`` or quotes
(logfmt style), so ``abc status=INTERNAL`` stays one value. Continuation lines of a record (a
traceback) start with ``  | ``, never with a timestamp.

With ``--log-format json`` everything the process writes to stdout/stderr is JSON: third-party
loggers (transformers, peft, huggingface_hub, torch, grpc) go through the root handler,
Python warnings are captured, progress bars are off, and native output on file descriptor 2
(gRPC core's own log lines) is read back and re-emitted as JSON records.

``GrpcLogFilter`` (installed by the server) redacts grpc's "Invalid encoding" records, which
print a non-UTF-8 metadata value, possibly an ``authorization`` token, and drops its ERROR for
a write to a caller that already left (the request line records CANCELLED).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from typing import IO, Any

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is printed,
# except private (``_``-prefixed) ones, which record factories of other libraries add to every
# record (Ray's ``_ray_timestamp_ns`` once ``ray`` is imported): never ours, never a field.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_QUOTES = re.compile(r'[\s="]')


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v
        for k, v in record.__dict__.items()
        if k not in _STANDARD_ATTRS and not k.startswith("_")
    }


def escape(text: str) -> str:
    """``text`` with every non-printable character (controls, ANSI ESC, NUL, U+2028, bidi
    overrides) written as a Python-style escape; printable text is returned unchanged."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[char])
        else:
            code = ord(char)
            out.append(
                f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
    return "".join(out)


def format_value(value: object) -> str:
    """One logfmt value: escaped, and quoted when it could be read as more than one field."""
    text = str(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        # Inside quotes the escapes are unambiguous: \\ is a backslash, \" a quote.
        return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    return escape(text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ensure_ascii (the default) also escapes U+2028/U+2029, which some readers split on.
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={format_value(v)}" for k, v in extras.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "".join(f"\n  | {escape(part)}" for part in record.exc_text.splitlines())
        if record.stack_info:
            line += "".join(f"\n  | {escape(part)}" for part in record.stack_info.splitlines())
        return line


class RateLimit:
    """At most ``burst`` lines per ``interval_s``; counts what it held back (thread-safe)."""

    def __init__(self, burst: int, interval_s: float) -> None:
        self._burst = burst
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._used = 0
        self._suppressed = 0

    def allow(self) -> int | None:
        """None to hold this line back, else how many were held back since the last one."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self._interval_s:
                self._window_start, self._used = now, 0
            if self._used >= self._burst:
                self._suppressed += 1
                return None
            self._used += 1
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


class GrpcLogFilter(logging.Filter):
    """Keeps grpc's own Python log records from leaking caller bytes or flooding the log."""

    def __init__(self) -> None:
        super().__init__()
        self._invalid_encoding = RateLimit(burst=1, interval_s=10.0)

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Invalid encoding on"):
            # The record's text is the raw metadata value: for ``authorization``, the token.
            suppressed = self._invalid_encoding.allow()
            if suppressed is None:
                return False
            record.msg = "a call carried a metadata value that is not valid UTF-8 (redacted)"
            if suppressed:
                record.msg += f"; {suppressed} more since the last such line"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        # A write to a caller that already left: the request line already says CANCELLED.
        return not message.startswith("ExecuteBatchError raised in core by servicer method")


_GRPC_LOGGERS = ("grpc._cython.cygrpc", "grpc.aio._server", "grpc._server")
_grpc_filter = GrpcLogFilter()


def install_grpc_log_filter() -> None:
    """Attach the grpc filter (idempotent); the server does this whenever it is created."""
    for name in _GRPC_LOGGERS:
        target = logging.getLogger(name)
        if _grpc_filter not in target.filters:
            target.addFilter(_grpc_filter)


# gRPC core (absl) lines: "E1201 08:42:20.888206   18326 hpack_parser.cc:1048] message".
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]\s]+)\] ?(.*)$")
_NATIVE_LEVELS = {
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}


def _relay_native_stderr(pipe_read: int) -> None:
    """Turn each line written to fd 2 by native code (or raw writes) into a log record."""
    native = logging.getLogger("grpc.core")
    raw = logging.getLogger("stderr")
    with os.fdopen(pipe_read, "r", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            text = line.rstrip("\n")
            if not text:
                continue
            match = _NATIVE_LINE.match(text)
            if match:
                native.log(
                    _NATIVE_LEVELS[match.group(1)],
                    "%s",
                    match.group(3),
                    extra={"source": match.group(2)},
                )
            else:
                raw.warning("%s", text)


def _capture_native_stderr() -> IO[str]:
    """Point fd 2 at a pipe relayed as JSON; return a stream on the real stderr for our handler."""
    sys.stderr.flush()
    real = os.dup(2)
    pipe_read, pipe_write = os.pipe()
    os.dup2(pipe_write, 2)
    os.close(pipe_write)
    threading.Thread(
        target=_relay_native_stderr, args=(pipe_read,), name="peftserve-stderr", daemon=True
    ).start()
    return os.fdopen(real, "w", buffering=1, encoding="utf-8")


def _route_library_loggers() -> None:
    """Send transformers', huggingface_hub's, torch's (...) records through the root handler."""
    for name, existing in list(logging.root.manager.loggerDict.items()):
        if isinstance(existing, logging.Logger) and not name.startswith("peftserve"):
            for handler in list(existing.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler, logging.FileHandler
                ):
                    existing.removeHandler(handler)
            existing.propagate = True


def _progress_bars_off() -> None:
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a server dependency
        pass


def configure_logging(level: str, fmt: str) -> None:
    """Install the root handler for the process (``peftserve serve``)."""
    _progress_bars_off()
    install_grpc_log_filter()
    stream: IO[str] = sys.stderr
    if fmt == "json":
        _route_library_loggers()
        logging.captureWarnings(True)
        warnings.simplefilter("default")
        stream = _capture_native_stderr()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def stdout_line(fmt: str, message: str, **fields: Any) -> str:
    """A line for standard output in the configured format (the "ready" line)."""
    if fmt != "json":
        return message
    entry = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
        "level": "INFO",
        "logger": "peftserve.server",
        "message": message,
        **fields,
    }
    return json.dumps(entry)
