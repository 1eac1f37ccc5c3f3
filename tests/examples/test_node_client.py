"""The Node.js client (examples/node), built from the .proto alone, against a live server."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from ..conftest import REPO_ROOT, ServerThread

NODE_DIR = REPO_ROOT / "examples" / "node"
PROMPT = "the quick brown fox"


def _node_client_ready() -> str | None:
    """None when the client can run, else why not (installing its packages if npm can)."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        if shutil.which("npm") is None:
            return "examples/node/node_modules is missing and npm is not installed"
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            return f"npm ci failed in examples/node: {result.stderr[-500:]}"
    return None


def run_client(address: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        ["node", "client.js", address, *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_node_client_generates_and_streams(demo_server: ServerThread) -> None:
    reason = _node_client_ready()
    if reason is not None:
        pytest.skip(reason)
    # The client's default max_new_tokens (32) leaves room for the whole echo and its EOS.
    code, output = run_client(demo_server.address, PROMPT, "upper")
    assert code == 0, output
    generated = output["generate"]
    assert generated["sequences"][0]["text"] == PROMPT.upper()
    assert generated["sequences"][0]["finish_reason"] == "FINISH_REASON_EOS"
    assert generated["provenance"]["adapter"] == "upper"
    assert len(generated["provenance"]["adapter_sha256"]) == 64
    stream = output["stream"]
    assert stream["text"] == PROMPT.upper()
    assert stream["summary"]["sequences"][0]["finish_reason"] == "FINISH_REASON_EOS"
    # Several deltas, not one message with everything: the stream really streamed.
    assert stream["deltas"] > 1
    assert stream["summary"]["usage"] == generated["usage"]
    # The constrained call: schema-valid JSON, though the demo model never saw JSON.
    constrained = output["constrained"]
    assert constrained["sequence"]["finish_reason"] == "FINISH_REASON_EOS"
    assert not constrained["sequence"].get("incomplete", False)
    assert constrained["value"]["animal"] in ("fox", "dog", "cat")
    assert 0 <= constrained["value"]["legs"] <= 8

    code, failure = run_client(demo_server.address, PROMPT, "no-such-adapter")
    assert code == 1
    assert failure["error"]["name"] == "NOT_FOUND"
