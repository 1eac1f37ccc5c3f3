"""Domain errors raised by the engine; the server maps each to one gRPC status in one place.

Every error carries a stable machine-readable ``reason`` (AIP-193 ``ErrorInfo.reason``) and an
English message for developers. Errors about a request field name its path as the client sees
it in the contract (``parameters.top_p``, ``adapter``, ``text``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class PeftServeError(Exception):
    """Base class of every error the engine raises on purpose."""

    reason: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other constructor arguments than ``args`` holds, so pickling (the
        # engine process sends errors to the front, engine_proc) rebuilds from the state.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[PeftServeError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class InvalidRequestError(PeftServeError):
    """One or more request fields are invalid (gRPC INVALID_ARGUMENT)."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        if not violations:
            raise ValueError("InvalidRequestError needs at least one violation")
        self.violations = tuple(violations)
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message)

    @classmethod
    def single(cls, field: str, description: str) -> InvalidRequestError:
        return cls([FieldViolation(field, description)])


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested new tokens do not fit the model's context window."""

    reason = "CONTEXT_LENGTH_EXCEEDED"


MAX_LISTED_ADAPTERS = 3


class AdapterNotFoundError(PeftServeError):
    """The request names an adapter that is not loaded (gRPC NOT_FOUND). Never falls back."""

    reason = "ADAPTER_NOT_FOUND"

    def __init__(self, adapter: str, available: list[str]) -> None:
        self.adapter = adapter
        self.available = tuple(available)
        # A few names help a developer; the full list (ListAdapters) would make the error
        # outgrow a client's metadata limit once many adapters are loaded.
        name = adapter if len(adapter) <= 64 else adapter[:61] + "..."
        if not available:
            loaded = "no adapters are loaded"
        elif len(available) <= MAX_LISTED_ADAPTERS:
            loaded = "loaded adapters: " + ", ".join(available)
        else:
            loaded = f"{len(available)} adapters are loaded, see ListAdapters; e.g. " + ", ".join(
                available[:MAX_LISTED_ADAPTERS]
            )
        super().__init__(f"adapter {name!r} is not loaded ({loaded})")


class AdapterPathNotFoundError(PeftServeError):
    """LoadAdapter's directory does not exist under the adapters root (gRPC NOT_FOUND on
    ``path``). Nothing is registered for it."""

    reason = "ADAPTER_PATH_NOT_FOUND"

    def __init__(self, path: str, field: str = "path") -> None:
        self.path = path
        self.field = field
        shown = path if len(path) <= 64 else path[:61] + "..."
        super().__init__(f"no adapter directory {shown!r} under the server's adapters root")


class QueueFullError(PeftServeError):
    """The bounded request queue is full (gRPC RESOURCE_EXHAUSTED with RetryInfo)."""

    reason = "QUEUE_FULL"

    def __init__(self, queue_size: int, retry_after_s: float) -> None:
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the request queue is full ({queue_size} waiting); retry after {retry_after_s:.1f}s"
        )


class DeadlineExceededError(PeftServeError):
    """The caller's deadline passed before the request could run (gRPC DEADLINE_EXCEEDED)."""

    reason = "DEADLINE_EXCEEDED"


class EngineUnavailableError(PeftServeError):
    """The engine is loading or draining and admits no requests (gRPC UNAVAILABLE)."""

    reason = "UNAVAILABLE"


class RequestCancelledError(PeftServeError):
    """The request was cancelled before it produced a result (gRPC CANCELLED)."""

    reason = "CANCELLED"


class AdapterLoadError(PeftServeError):
    """An adapter directory could not be loaded (bad path, pickle weights, peft failure).

    ``field`` names the request field at fault when a caller chose the directory (LoadAdapter's
    ``path``); the server reports it as a ``PreconditionFailure`` violation subject.
    """

    reason = "ADAPTER_LOAD_FAILED"

    def __init__(self, adapter: str, message: str, field: str = "") -> None:
        self.adapter = adapter
        self.detail = message
        self.field = field
        super().__init__(f"adapter {adapter!r} could not be loaded: {message}")


class AdapterStateError(PeftServeError):
    """The adapter's lifecycle state forbids the call, e.g. unloading one that is still loading
    (gRPC FAILED_PRECONDITION)."""

    reason = "ADAPTER_STATE_CONFLICT"


class AdapterExistsError(PeftServeError):
    """LoadAdapter names a loaded adapter with a different path (gRPC ALREADY_EXISTS)."""

    reason = "ADAPTER_EXISTS"


class AdapterBudgetError(PeftServeError):
    """The adapter budget is full and nothing can be evicted (gRPC RESOURCE_EXHAUSTED)."""

    reason = "ADAPTER_BUDGET_EXHAUSTED"


class BatchOutOfMemoryError(PeftServeError):
    """The accelerator ran out of memory even for this request alone, or after its tokens had
    started to stream (gRPC RESOURCE_EXHAUSTED)."""

    reason = "OUT_OF_MEMORY"


class ConstraintTimeoutError(PeftServeError):
    """A request's constraint did not compile within the server's time limit
    (gRPC RESOURCE_EXHAUSTED). Only that request fails; the compile finishes in its thread and
    is cached, so a retry of the same constraint may find it ready."""

    reason = "CONSTRAINT_COMPILE_TIMEOUT"

    def __init__(self, field: str, timeout_s: float) -> None:
        self.field = field
        self.timeout_s = timeout_s
        super().__init__(
            f"{field}: did not compile within the server's limit of {timeout_s:g} s; "
            "simplify the constraint, or retry later (a finished compile is cached)"
        )


class ChatTemplateMissingError(PeftServeError):
    """Chat input for a model whose directory has no chat template (gRPC FAILED_PRECONDITION).

    The server never guesses a template and never takes one from a request."""

    reason = "CHAT_TEMPLATE_MISSING"

    def __init__(self, field: str = "chat") -> None:
        self.field = field
        super().__init__(
            f"{field}: the served model has no chat template in its directory; send text or "
            "token_ids instead"
        )


class SlowConsumerError(PeftServeError):
    """A stream's caller reads too slowly: its undelivered output (tokens of a generation
    stream, or changes of an adapter watch) passed its bound, so the server stopped the stream
    and freed what it held (gRPC RESOURCE_EXHAUSTED). A watcher should watch again."""

    reason = "SLOW_CONSUMER"
