"""Where edgeq keeps what it computed once and can reuse: calibrations, cost tables, library sizes, tunings.

One root for every cache, so that one variable moves or disables them all.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path | None:
    """The cache root (EDGEQ_CACHE; 'off' disables caching): ~/.cache/edgeq by default."""
    root = os.environ.get("EDGEQ_CACHE")
    if root == "off":
        return None
    return Path(root) if root else Path.home() / ".cache" / "edgeq"
