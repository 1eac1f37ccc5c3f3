"""``buf breaking`` against the last released contract image: every change must be additive."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"
RELEASE = "releases/peftserve-v1.0.0.binpb"


def test_the_released_image_is_committed() -> None:
    # Without it the breaking check below would have nothing to compare against.
    assert (REPO_ROOT / "protos" / RELEASE).is_file()


@pytest.mark.skipif(not BUF.exists(), reason="buf is not installed (run `npm install`)")
def test_buf_breaking_against_the_last_release_passes() -> None:
    # Same invocation as `make lint`; fall back to the binary itself where npx is missing.
    buf = ["npx", "--no-install", "buf"] if shutil.which("npx") else [str(BUF)]
    result = subprocess.run(
        [*buf, "breaking", "--against", RELEASE],
        cwd=REPO_ROOT / "protos",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
