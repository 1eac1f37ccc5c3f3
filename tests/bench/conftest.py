"""Make the repository's ``bench`` package importable however pytest is started.

``bench/`` is not part of the installed ``peftserve`` distribution; ``python -m pytest`` from the
repository root finds it through the working directory, a bare ``pytest`` would not.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
