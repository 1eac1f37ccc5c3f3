"""Where a server's time goes: sample it with py-spy, then fold the stacks into a summary.

py-spy samples every thread of the running server process from outside (no code change, no
restart), so the engine's worker thread and the gRPC event loop are both visible. The summary
attributes each sample to the innermost frame's library (self time) and lists the functions
with the most inclusive time.

``worker_breakdown`` answers the engine's own question: of the worker thread's samples, how
many are inside the model's forward (a ``torch.nn`` module's code on the stack, or the engine's
bit-identical fast forward ``FastForward.__call__``, which runs the model's modules without
``nn.Module.__call__``) and how many
are the engine's Python work around it (scheduling, sampling, detokenizing, and for requests
that still go through ``generate``, its loop)? py-spy runs with ``--threads`` so each stack
names its thread.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CATEGORIES",
    "PySpyRecorder",
    "categorize",
    "summarize_collapsed",
    "worker_breakdown",
]

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# py-spy --threads puts the thread first: "thread (TID): NAME", or "thread (TID)" when unnamed.
THREAD_FRAME = re.compile(r"^thread \((?P<tid>[^)]*)\)(?::\s*(?P<name>.*))?$")
PROCESS_FRAME = re.compile(r'^process \d+:".*"$')
WORKER_THREAD_NAME = "peftserve-engine"
# A frame of a file here means the sample is inside a module's forward (the model, its layers,
# the adapters' layers): the work the engine exists to feed, not the engine's own. The whole
# package, not only module.py's ``__call__``: py-spy sometimes gets the innermost frame only
# (a bare ``Linear.forward``), and a torch.nn module's own code is the forward either way.
FORWARD_FILE = "torch/nn/modules/"
# The engine's fast forward (server/engine/fastpath.py) is the model's forward run without
# ``nn.Module.__call__`` (its projections, routed adapters included, are called by ``.forward``):
# a frame of one of its entry points (a forward, or a fused pass of several) marks a sample
# inside the forward just the same.
FORWARD_ENTRIES = ("FastForward.__call__", "FastForward.fused")
FORWARD_ENTRY_FILE = "server/engine/fastpath.py"
# First match wins: the path fragment of a frame's file -> the part of the stack it belongs to.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("server/engine/fastpath.py", "model forward (python)"),
    ("server/engine/routing.py", "adapter routing (in the forward)"),
    ("server/engine/", "peftserve engine (batcher, rows, detokenizer)"),
    ("peftserve/server/engine/", "peftserve engine (batcher, rows, detokenizer)"),
    ("server/", "peftserve servicer/convert"),
    ("peftserve/server/", "peftserve servicer/convert"),
    ("transformers/generation/", "transformers generate loop"),
    ("transformers/models/", "model forward (python)"),
    ("transformers/", "transformers other"),
    ("peft/", "peft layers"),
    ("torch/nn/", "model forward (python)"),
    ("torch/", "torch (ops and dispatch)"),
    ("grpc/", "gRPC"),
    ("google/protobuf", "protobuf"),
    ("asyncio/", "asyncio event loop"),
    ("threading.py", "threads and locks"),
    ("queue.py", "threads and locks"),
    ("tokenizers/", "tokenizer"),
)


def in_forward(frames: list[tuple[str, str]]) -> bool:
    """Whether a stack (frames as (function, file)) is inside the model's forward."""
    return any(
        FORWARD_FILE in file or (func in FORWARD_ENTRIES and FORWARD_ENTRY_FILE in file)
        for func, file in frames
    )


def categorize(file: str) -> str:
    for fragment, category in CATEGORIES:
        if fragment in file:
            return category
    return "other python"


def _parse_frame(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match.group("func"), match.group("file")


def _short_path(file: str) -> str:
    """The path from the package root on (``transformers/cache_utils.py``), for reading."""
    for marker in ("site-packages/", "/server/", "/lib/python3"):
        if marker in file:
            tail = file.split(marker, 1)[1]
            return ("server/" + tail) if marker == "/server/" else tail
    return file


def _read_stacks(path: Path) -> list[tuple[str, list[tuple[str, str]], int]]:
    """(thread, frames outermost first, samples) per line of py-spy's raw output."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        parts = [f for f in stack.split(";") if f]
        # --subprocesses puts the process chain first ("process PID:CMD"): the engine process
        # of --engine-process is sampled too; its worker thread has the same name.
        while parts and PROCESS_FRAME.match(parts[0].strip()):
            parts = parts[1:]
        thread = ""
        if parts and (match := THREAD_FRAME.match(parts[0].strip())):
            thread = match.group("name") or match.group("tid")
            parts = parts[1:]
        frames = [_parse_frame(f) for f in parts]
        if frames:
            stacks.append((thread, frames, int(count_text)))
    return stacks


def summarize_collapsed(path: Path, top: int = 15) -> dict[str, Any]:
    """Fold py-spy's ``--format raw`` stacks: self time by category, top inclusive functions."""
    total = 0
    by_category: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    self_files: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for _thread, frames, count in _read_stacks(path):
        total += count
        leaf_func, leaf_file = frames[-1]
        by_category[categorize(leaf_file)] += count
        self_time[f"{leaf_func} ({Path(leaf_file).name})"] += count
        self_files[_short_path(leaf_file)] += count
        # A recursive function counts once per sample, or inclusive time could exceed 100%.
        for name in {f"{func} ({Path(file).name})" for func, file in frames}:
            inclusive[name] += count

    def share(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"name": name, "samples": c, "percent": round(100.0 * c / total, 1)}
            for name, c in counter.most_common(n)
        ]

    return {
        "samples": total,
        "self_by_category": share(by_category, len(by_category)) if total else [],
        "top_self": share(self_time, top) if total else [],
        "top_self_files": share(self_files, top) if total else [],
        "top_inclusive": share(inclusive, top) if total else [],
        "worker": worker_breakdown(path, top),
    }


def worker_breakdown(path: Path, top: int = 12) -> dict[str, Any] | None:
    """The worker thread's samples: inside the model forward vs the engine's Python around it.

    The worker is the thread named ``peftserve-engine``; without thread names, the thread with
    the most forward samples. Outside the forward, samples are attributed to the innermost
    frame's file (a torch op called by the sampler shows as the sampler's line: py-spy sees
    Python frames only). None when no worker samples were taken.
    """
    stacks = _read_stacks(path)
    forward_by_thread: Counter[str] = Counter()
    for thread, frames, count in stacks:
        if in_forward(frames):
            forward_by_thread[thread] += count
    names = {thread for thread, _, _ in stacks}
    if WORKER_THREAD_NAME in names:
        worker = WORKER_THREAD_NAME
    elif forward_by_thread:
        worker = forward_by_thread.most_common(1)[0][0]
    else:
        return None
    total = forward = 0
    outside_files: Counter[str] = Counter()
    outside_categories: Counter[str] = Counter()
    outside_functions: Counter[str] = Counter()
    for thread, frames, count in stacks:
        if thread != worker:
            continue
        total += count
        if in_forward(frames):
            forward += count
            continue
        func, file = frames[-1]
        outside_files[_short_path(file)] += count
        outside_categories[categorize(file)] += count
        outside_functions[f"{func} ({Path(file).name})"] += count
    if total == 0:
        return None

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"name": name, "samples": c, "percent": round(100.0 * c / total, 1)}
            for name, c in counter.most_common(top)
        ]

    outside = total - forward
    return {
        "thread": worker,
        "samples": total,
        "forward_samples": forward,
        "forward_percent": round(100.0 * forward / total, 1),
        "engine_python_samples": outside,
        "engine_python_percent": round(100.0 * outside / total, 1),
        "engine_python_by_category": share(outside_categories),
        "engine_python_by_file": share(outside_files),
        "engine_python_by_function": share(outside_functions),
    }


@dataclass
class PySpyRecorder:
    """``py-spy record`` attached to ``pid`` until ``stop()``; writes collapsed stacks."""

    pid: int
    out_path: Path
    rate_hz: int = 100
    _process: subprocess.Popen[bytes] | None = None
    error: str = ""

    @staticmethod
    def executable() -> str | None:
        """py-spy next to this interpreter (a venv run without activation), else on PATH."""
        beside = Path(sys.executable).with_name("py-spy")
        return str(beside) if beside.is_file() else shutil.which("py-spy")

    def start(self) -> bool:
        executable = self.executable()
        if executable is None:
            self.error = "py-spy is not installed"
            return False
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                executable,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(self.rate_hz),
                "--format",
                "raw",
                # Sampling without pausing the server keeps the profiled run's timing honest.
                "--nonblocking",
                # Thread names in each stack: the worker's share is computed from them.
                "--threads",
                # The engine process (--engine-process) is a child of the server's.
                "--subprocesses",
                "--output",
                str(self.out_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        if self._process.poll() is not None:
            stderr = self._process.stderr.read().decode() if self._process.stderr else ""
            self.error = f"py-spy exited at once: {stderr.strip()[-300:]}"
            return False
        return True

    def stop(self) -> Path | None:
        if self._process is None:
            return None
        if self._process.poll() is None:
            # SIGINT makes py-spy stop sampling and write what it has.
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        if not self.out_path.exists():
            stderr = self._process.stderr.read().decode() if self._process.stderr else ""
            self.error = self.error or f"py-spy wrote no profile: {stderr.strip()[-300:]}"
            return None
        return self.out_path
