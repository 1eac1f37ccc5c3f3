"""Structured output: constraints compiled off the decode loop, one matcher per constrained row.

Two nouns, each with a small verb set, so they plug into whichever sampler runs the batch:

* ``ConstraintCompiler`` turns a request's ``Constraint`` into a ``CompiledConstraint`` in a
  thread pool, never on the decode loop: ``submit`` (a shared future, cached by the grammar
  text), ``compile`` (blocking, within the time limit) and ``compile_async``. The text is
  bounded by ``max_text_length`` (longer: ``InvalidRequestError``); a compile that misses the
  time limit raises ``ConstraintTimeoutError`` for that request only (it keeps running in its
  thread and lands in the cache, so a retry may find it ready). An invalid schema, regex or
  grammar is an ``InvalidRequestError`` naming the field (``constraint.regex``) with the
  compiler's message, which carries its position.
* ``RowConstraint`` is one row's matcher: ``allowed()`` (a boolean vocabulary mask in which
  the row's stop tokens are allowed only where the constraint is complete), ``apply_mask``
  (masks one row of logits in place), ``accept(token)``, ``is_complete`` and ``is_dead_end``.
  ``stack_masks`` builds the masks of several rows at once for a vectorised sampler.

The library is llguidance (see ``docs/engine.md``, "Structured output", for the measurements
behind that choice): it builds a matcher in well under a millisecond and computes masks
lazily, so a large vocabulary costs no up-front compile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from .errors import ConstraintTimeoutError, InvalidRequestError
from .types import Constraint, ConstraintKind

# Any JSON object: what ``json_object`` means (OpenAI's response_format json_object).
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# Compact JSON (separators "," and ":", no free whitespace): a small model cannot loop on
# blanks, and the output is the same bytes whatever the model's fondness for spaces.
JSON_OPTIONS: Any = {"whitespace_flexible": False}


@dataclass(frozen=True)
class CompiledConstraint:
    """A validated grammar and a matcher in its start state; rows take copies of it."""

    constraint: Constraint
    grammar: str  # llguidance's grammar JSON
    prototype: Any  # llguidance.LLMatcher, never advanced
    vocab_size: int
    # The end-of-sequence tokens llguidance itself allows exactly where the grammar is complete.
    eos_ids: frozenset[int] = frozenset()

    def matcher(self) -> Any:
        return self.prototype.deep_copy()


def grammar_for(constraint: Constraint) -> str:
    """The llguidance grammar of ``constraint``; raises ``InvalidRequestError`` for bad JSON."""
    kind, field = constraint.kind, constraint.field
    from_schema = llguidance.LLMatcher.grammar_from_json_schema
    if kind is ConstraintKind.JSON_SCHEMA:
        try:
            schema = json.loads(constraint.text)
        except json.JSONDecodeError as error:
            raise InvalidRequestError.single(
                field,
                f"not valid JSON at line {error.lineno} column {error.colno}: {error.msg}",
            ) from None
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError.single(field, "must be a JSON object (a JSON Schema)")
        return str(from_schema(constraint.text, overrides=JSON_OPTIONS))
    if kind is ConstraintKind.JSON_OBJECT:
        return str(from_schema(JSON_OBJECT_SCHEMA, overrides=JSON_OPTIONS))
    if kind is ConstraintKind.REGEX:
        return str(llguidance.LLMatcher.grammar_from_regex(constraint.text))
    if kind is ConstraintKind.GRAMMAR:
        return str(llguidance.LLMatcher.grammar_from_lark(constraint.text))
    # CHOICE: Lark string literals take JSON escapes, so any text is spelled exactly.
    alternatives = " | ".join(json.dumps(choice) for choice in constraint.choices)
    return str(llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}"))


def check_constraint(constraint: Constraint, max_text_length: int, max_choices: int) -> None:
    """Shape and size checks that need no compiler; each failure names the field."""
    field = constraint.field
    if constraint.kind is ConstraintKind.CHOICE:
        if not constraint.choices:
            raise InvalidRequestError.single(field, "needs at least one choice")
        if len(constraint.choices) > max_choices:
            raise InvalidRequestError.single(field, f"at most {max_choices} choices")
        for i, choice in enumerate(constraint.choices):
            if not choice:
                raise InvalidRequestError.single(f"{field}.choices[{i}]", "must not be empty")
        size = sum(len(c) for c in constraint.choices)
    elif constraint.kind is ConstraintKind.JSON_OBJECT:
        size = 0
    else:
        if not constraint.text:
            raise InvalidRequestError.single(field, "must not be empty")
        size = len(constraint.text)
    if size > max_text_length:
        raise InvalidRequestError.single(
            field,
            f"{size} characters exceed the server's constraint size limit of {max_text_length}",
        )


class ConstraintCompiler:
    """Compiles constraints in a thread pool, bounded in size and time, cached by grammar text."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        max_text_length: int,
        timeout_s: float,
        cache_size: int,
        threads: int,
        max_choices: int,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_text_length = max_text_length
        self.timeout_s = timeout_s
        self.max_choices = max_choices
        self._cache_size = cache_size
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="peftserve-grammar"
        )
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], concurrent.futures.Future[CompiledConstraint]]
        self._cache = OrderedDict()
        self._ll_tokenizer: Any = None

    def _tokenizer(self) -> Any:
        # Built on first use, in a pool thread: about a second for a 128k vocabulary.
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size
                )
            return self._ll_tokenizer

    def _build(self, constraint: Constraint, grammar: str) -> CompiledConstraint:
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if not matcher.is_error():
            # The first mask builds the lexer's start states: here, not in the decode loop
            # (rows' copies share what it built). It does not advance the matcher.
            matcher.compute_bitmask()
        if matcher.is_error():
            raise InvalidRequestError.single(constraint.field, _compiler_message(matcher))
        eos = frozenset(int(t) for t in self._tokenizer().eos_tokens)
        return CompiledConstraint(constraint, grammar, matcher, self.vocab_size, eos)

    def submit(self, constraint: Constraint) -> concurrent.futures.Future[CompiledConstraint]:
        """The compile of ``constraint``: cached, started in the pool if new. Raises
        ``InvalidRequestError`` at once for shape/size errors and unparsable JSON."""
        check_constraint(constraint, self.max_text_length, self.max_choices)
        grammar = grammar_for(constraint)
        key = (constraint.kind.value, grammar)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._build, constraint, grammar)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """Blocking compile within the time limit (call it off the event loop)."""
        future = self.submit(constraint)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise ConstraintTimeoutError(constraint.field, self.timeout_s) from None

    async def compile_async(self, constraint: Constraint) -> CompiledConstraint:
        """Like ``compile``, awaiting the pool instead of blocking the calling thread."""
        future = self.submit(constraint)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            raise ConstraintTimeoutError(constraint.field, self.timeout_s) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _compiler_message(matcher: Any) -> str:
    message = str(matcher.get_error()).strip()
    return f"does not compile: {message}" if message else "does not compile"


class RowConstraint:
    """One row's matcher: masks its logits, advances on its tokens, knows when it is done."""

    def __init__(self, compiled: CompiledConstraint, stop_ids: Iterable[int]) -> None:
        self.compiled = compiled
        self._matcher = compiled.matcher()
        self._stop_set = frozenset(int(t) for t in stop_ids)
        # Only the stops llguidance does not already treat as its own end of sequence.
        self._stop_list = sorted(self._stop_set - compiled.eos_ids)
        self._failed = False

    @property
    def is_complete(self) -> bool:
        """The tokens so far satisfy the constraint (a stop token may end the row here)."""
        return not self._failed and bool(self._matcher.is_accepting())

    @property
    def is_stopped(self) -> bool:
        """Complete and nothing may follow: only a stop token is allowed next."""
        return not self._failed and bool(self._matcher.is_stopped())

    def _live(self) -> bool:
        return not self._failed and not self._matcher.is_error()

    def allowed(self) -> torch.Tensor:
        """Boolean mask over the vocabulary of the tokens this row may produce next."""
        return stack_masks([self])[0]

    def apply_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of disallowed tokens of this row (1-D) to -inf, in place."""
        apply_masks(logits.unsqueeze(0), [self])
        return logits

    def is_dead_end(self, logits: torch.Tensor) -> bool:
        """No token is left to choose in these (masked and processed) logits."""
        return not bool(torch.isfinite(logits).any())

    def accept(self, token: int) -> None:
        """Advance past the row's chosen token (a stop token ends the row and is not fed)."""
        if self._failed or int(token) in self._stop_set:
            return
        if not self._matcher.consume_token(int(token)):
            self._failed = True


_EXECUTOR: Any = None


def _executor() -> Any:
    # One Rust thread: the masks of a step are microseconds each, and the cores are the model's.
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor(num_threads=1)
    return _EXECUTOR


def _allowed_block(constraints: Sequence[RowConstraint]) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Every live matcher writes its bitmask into one shared buffer in a single call (the GIL
    released), and one unpack turns the buffer into a (rows, vocab) boolean array: the per-row
    Python cost is a tuple, not a mask."""
    vocab = constraints[0].compiled.vocab_size
    words = (vocab + 31) // 32
    bits = np.zeros((len(constraints), words), dtype=np.int32)
    live = [(c._matcher, j) for j, c in enumerate(constraints) if c._live()]
    if live:
        _executor().unsafe_compute_mask_ptr(live, bits.ctypes.data, words * 4, len(constraints))
    unpacked = np.unpackbits(bits.view(np.uint8), axis=1, count=vocab, bitorder="little")
    allowed: np.ndarray[Any, np.dtype[np.bool_]] = unpacked.view(np.bool_)
    for j, c in enumerate(constraints):
        if c._stop_list:
            allowed[j, c._stop_list] = c.is_complete
    return allowed


def stack_masks(constraints: Sequence[RowConstraint]) -> torch.Tensor:
    """The ``allowed()`` masks of several rows as one (rows, vocab) tensor (vectorised use)."""
    return torch.from_numpy(_allowed_block(constraints))


def apply_masks(logits: torch.Tensor, constraints: Sequence[RowConstraint]) -> list[bool]:
    """Mask a (rows, vocab) block of logits in place, row i by ``constraints[i]``, in one
    tensor operation; returns which rows are dead ends (their constraint allows no token).

    A row's own processors may still remove the tokens left (bad words, min tokens): check
    those rows again after them (``dead_ends``)."""
    allowed = _allowed_block(constraints)
    dead: list[bool] = [not a for a in np.any(allowed, axis=1).tolist()]
    blocked = torch.from_numpy(~allowed)
    if blocked.device != logits.device:
        blocked = blocked.to(logits.device, non_blocking=True)
    width = min(blocked.shape[1], logits.shape[1])
    logits[:, :width].masked_fill_(blocked[:, :width], float("-inf"))
    if logits.shape[1] > width:
        logits[:, width:] = float("-inf")
    return dead


def dead_ends(logits: torch.Tensor) -> list[bool]:
    """Which rows of a (rows, vocab) block have no finite logit left, in one operation."""
    return [not bool(f) for f in torch.isfinite(logits).any(dim=1).tolist()]
