"""``buf lint`` (STANDARD + COMMENTS) passes on the contract; needs the npm-installed buf."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"


@pytest.mark.skipif(not BUF.exists(), reason="buf is not installed (run `npm install`)")
def test_buf_lint_passes() -> None:
    # Same invocation as `make lint`; fall back to the binary itself where npx is missing.
    command = ["npx", "--no-install", "buf", "lint"] if shutil.which("npx") else [str(BUF), "lint"]
    result = subprocess.run(
        command, cwd=REPO_ROOT / "protos", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
