"""Build a link tree that mirrors the installed ``peftserve`` package, for mypy.

setuptools maps ``server/`` to ``peftserve.server`` and ``client/`` to ``peftserve.client``;
editable installs resolve that with an import hook mypy cannot follow, so ``make typecheck``
points mypy at this tree of symlinks instead.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def build(dest: Path) -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_dirs: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    if dest.exists():
        shutil.rmtree(dest)
    for package, source in sorted(package_dirs.items()):
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for entry in (REPO_ROOT / source).iterdir():
            # Subpackages get their own entry in package-dir; link modules only.
            if entry.is_file() and entry.suffix in {".py", ".pyi", ".typed"}:
                (target / entry.name).symlink_to(entry)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
