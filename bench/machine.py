"""What the benchmark ran on: CPU model, core count, memory, package versions, machine load.

The reference machine is shared: the load average at the start and end of a run, and per cell
the CPU used by processes other than the server and the load generator (``bench.cells``), say
how much the figures were disturbed.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["VERSIONED_PACKAGES", "environment", "load_average"]

VERSIONED_PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "peft",
    "grpcio",
    "protobuf",
    "tqdm",
    "matplotlib",
    "fastapi",
    "uvicorn",
    "openai",
    "py-spy",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes; 2 = two busy cores here)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _other_processes(top: int = 5) -> list[dict[str, Any]]:
    """The busiest other processes right now (``ps``), to name what shared the machine."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,etimes,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.splitlines()[:top]:
        parts = line.split(None, 2)
        if len(parts) == 3:
            rows.append(
                {"cpu_percent": float(parts[0]), "seconds": int(parts[1]), "comm": parts[2]}
            )
    return rows


def environment() -> dict[str, Any]:
    """A JSON-ready description of this machine and the relevant package versions."""
    versions = {"python": platform.python_version()}
    versions.update({p: v for p in VERSIONED_PACKAGES if (v := _version(p)) is not None})
    return {
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "gpu": _gpu(),
        "load_average": load_average(),
        "busiest_processes": _other_processes(),
        "versions": versions,
    }
