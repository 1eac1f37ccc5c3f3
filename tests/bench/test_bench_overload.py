"""Smoke check of ``bench/overload.py``: its floor server starts, refuses a small flood and
the script reports every call as refused (nothing about speed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_overload_bench_reports_a_refused_flood() -> None:
    completed = subprocess.run(
        [sys.executable, "bench/overload.py", "--modes", "floor", "--runs", "1", "--flood", "50"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = re.search(
        r"floor run 0: 0 admitted, 50 rejected; first \d+ ms, p50 \d+ ms", completed.stdout
    )
    assert line, completed.stdout
    assert re.search(r"server CPU \d+ us/rejection", completed.stdout), completed.stdout
