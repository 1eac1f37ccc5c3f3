"""README's configuration table lists exactly the flags ``peftserve serve --help`` prints."""

from __future__ import annotations

import re

from peftserve.server.config import build_arg_parser

from ..conftest import REPO_ROOT


def test_readme_lists_exactly_the_flags_of_help() -> None:
    parser = build_arg_parser({})
    flags = {
        action.option_strings[-1]
        for action in parser._actions
        if action.option_strings and "--help" not in action.option_strings
    }
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(--[a-z0-9-]+)`", readme, re.M))
    assert sorted(flags - rows) == [], "flags missing from README's table"
    assert sorted(rows - flags) == [], "README rows for flags that do not exist"
