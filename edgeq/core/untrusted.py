"""Values read from untrusted config files (config.json, GGUF metadata, adapter configs), checked on the way in.

`int("x")`, `int([1])`, `int(float("inf"))` and a missing key each raise a different Python exception deep in an
importer; these helpers turn every such value into the number it must be, or one line naming the key.
"""

from __future__ import annotations

import math
from typing import Any

from edgeq.core.errors import EdgeqError


def number(v: Any, key: str, path, kind: type = int, source: str = "config", lo: float | None = None,
           hi: float | None = None):
    """`v` as an int (an integral value) or a float (a finite number), within [lo, hi] when given."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    ok = ok and (not isinstance(v, float) or math.isfinite(v)) and (kind is float or float(v).is_integer())
    if not ok:
        raise EdgeqError(path, f"{key} in the {source} must be {'an integer' if kind is int else 'a number'}, "
                               f"not {str(v)[:40]!r}")
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise EdgeqError(path, f"implausible {key} = {v} in the {source} (expected {lo}..{hi})")
    return v


def required(d: dict, key: str, path, source: str = "config") -> Any:
    if key not in d:
        raise EdgeqError(path, f"the {source} lacks {key}")
    return d[key]
