"""The wheel installs and the client works in a fresh venv that has no torch.

Fast and offline: the wheel is built without isolation, and the fresh venv reaches only the
wheel's base requirements (and theirs) from this environment, through symlinks a .pth file adds.
The wheel's declared requirements are checked separately, so a torch dependency sneaking
into the base install fails here too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SMOKE = """
import importlib.util, sys
assert importlib.util.find_spec("torch") is None, "torch is importable"
from peftserve.client import AsyncPeftServeClient, PeftServeClient, build_generate_request
from peftserve.v1 import generation_pb2
request = build_generate_request("hi", temperature=0.0)
assert isinstance(request, generation_pb2.GenerateRequest)
assert request.parameters.HasField("temperature")
client = PeftServeClient("127.0.0.1:1")
client.close()
assert "torch" not in sys.modules
print("ok")
"""


def _requirement_closure(requirements: list[str]) -> set[str]:
    """Installed distributions needed by ``requirements``, transitively, extras left out."""
    seen: set[str] = set()
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        if "extra ==" in requirement:
            continue
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match is not None, requirement
        name = re.sub(r"[-_.]+", "-", match.group(0)).lower()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(importlib.metadata.requires(name) or [])
    return seen


def _link_top_level(names: set[str], into: Path) -> None:
    """Symlink every top-level module or package that belongs to the distributions ``names``."""
    for top_level, distributions in importlib.metadata.packages_distributions().items():
        owners = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions}
        if not owners & names:
            continue
        spec = importlib.util.find_spec(top_level)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            location = Path(next(iter(spec.submodule_search_locations)))
        else:
            assert spec.origin is not None
            location = Path(spec.origin)
        if not (into / location.name).exists():
            (into / location.name).symlink_to(location)


def _site_packages(env: Path) -> Path:
    (path,) = env.glob("lib/python3*/site-packages")
    return path


def test_wheel_installs_and_imports_without_torch(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(wheel_dir),
            str(REPO_ROOT),
        ],
        check=True,
        timeout=180,
    )
    (wheel,) = wheel_dir.glob("peftserve-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert "peftserve/v1/generation_pb2.pyi" in names
    assert "peftserve/v1/generation_pb2_grpc.pyi" in names
    assert "peftserve/client/py.typed" in names
    assert not [n for n in names if n.startswith(("models/", "tests/", "peftserve/models/"))]
    assert not [n for n in names if "/tests/" in n or n.endswith((".safetensors", ".bin"))]
    base_requirements = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert base_requirements, "the client's gRPC requirements are missing"
    assert not [r for r in base_requirements if r.lower().startswith("torch")]

    env = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env)
    python = env / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        check=True,
        timeout=120,
    )
    # Only what the wheel's base requirements pull in, linked from this environment.
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    closure = _requirement_closure(base_requirements)
    assert "torch" not in closure
    _link_top_level(closure, runtime)
    (_site_packages(env) / "client_runtime.pth").write_text(f"{runtime}\n")

    result = subprocess.run(
        [str(python), "-c", SMOKE], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

    # The console script works, and `serve` explains what is missing instead of a traceback.
    script = env / "bin" / "peftserve"
    assert subprocess.run([str(script), "--help"], capture_output=True, timeout=60).returncode == 0
    serve = subprocess.run(
        [str(script), "serve"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert serve.returncode == 1
    assert "pip install 'peftserve[server]'" in serve.stderr
