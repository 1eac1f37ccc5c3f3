"""Servers under test as subprocesses on 127.0.0.1: start, wait until ready, stop with SIGTERM.

Each server gets its own process so its CPU time, threads and profile are its own, exactly as
an operator would run it. Their stderr goes to a log file: peftserve's JSON request log is where
the batch size of every request is read back from.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "ServerProcess",
    "child_env",
    "free_port",
    "peftserve_command",
    "transformers_serve_command",
]

READY_LINE = re.compile(r"peftserve ready on (\S+:\d+)")
STOP_TIMEOUT_S = 30.0


def child_env(torch_threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a model-running child: fixed thread count, never any network."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(torch_threads),
            "MKL_NUM_THREADS": str(torch_threads),
            # Everything is local; a hub lookup would be a bug (and cannot work offline).
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (for servers that cannot bind port 0 and say so)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peftserve_command(
    model_path: Path,
    adapters_dir: Path | None,
    max_batch_size: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``python -m peftserve.server`` on an ephemeral loopback port with a JSON request log."""
    command = [
        sys.executable,
        "-m",
        "peftserve.server",
        "--address",
        "127.0.0.1:0",
        "--model-path",
        str(model_path),
        "--max-batch-size",
        str(max_batch_size),
        # Open-loop runs may queue more than the default allows; a rejection is not a result.
        "--max-queue-size",
        "4096",
        "--log-format",
        "json",
        "--log-level",
        "INFO",
        "--shutdown-grace-s",
        "5",
    ]
    # An empty value means "no adapters" (the flag's default is the demo adapters directory).
    command += ["--adapters-dir", "" if adapters_dir is None else str(adapters_dir)]
    return command + list(extra_args)


def transformers_serve_command(model_path: Path, port: int, device: str = "cpu") -> list[str]:
    """``transformers serve`` pinned to the local model, continuous batching on."""
    executable = Path(sys.executable).with_name("transformers")
    return [
        str(executable),
        "serve",
        str(model_path),
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        "float32",
        "--log-level",
        "warning",
    ]


class ServerProcess:
    """One server subprocess. ``start`` returns its ``127.0.0.1:PORT`` address once ready."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        ready_url: str | None = None,
        metrics_port: int | None = None,
    ) -> None:
        # ready_url None: wait for peftserve's "ready" line on stdout; else poll that URL.
        # metrics_port: where the server serves Prometheus metrics, if it was asked to.
        self.name = name
        self.metrics_port = metrics_port
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log_path
        self.ready_url = ready_url
        self.process: subprocess.Popen[str] | None = None
        self.address: str | None = None
        self._ready = threading.Event()
        self._stdout_tail: list[str] = []

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.process.pid

    def start(self, timeout_s: float = 180.0) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            text=True,
        )
        log.close()
        # A reader thread keeps draining stdout so the child can never block on a full pipe.
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} before it was ready; "
                    f"see {self.log_path}: {self.log_tail()}"
                )
            if self.ready_url is None:
                if self._ready.wait(0.2):
                    break
            elif self._http_ready():
                self.address = self.ready_url.split("://", 1)[1].split("/", 1)[0]
                break
            else:
                time.sleep(0.5)
        else:
            self.stop()
            raise TimeoutError(
                f"{self.name} not ready within {timeout_s:.0f}s; see {self.log_path}"
            )
        assert self.address is not None
        return self.address

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._stdout_tail = [*self._stdout_tail[-20:], line.rstrip()]
            match = READY_LINE.search(line)
            if match and not self._ready.is_set():
                self.address = match.group(1)
                self._ready.set()

    def _http_ready(self) -> bool:
        import httpx2

        assert self.ready_url is not None
        try:
            response = httpx2.get(self.ready_url, timeout=2.0, trust_env=False)
        except Exception:  # not listening yet
            return False
        return response.status_code == 200

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:] + self._stdout_tail[-5:])

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the server drains and exits 0), SIGKILL only if it overstays."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
