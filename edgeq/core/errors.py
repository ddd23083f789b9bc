"""One error type for everything a user can get wrong.

The CLI turns it into a single line `edgeq: error: FILE: PROBLEM` and a
non-zero exit, so every raise site must name the file it is about.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

MAX_PROBLEM_CHARS = 600
# control characters (newlines included) and lone surrogates: what a message quoting a hostile file could carry
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def one_line(text: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    """`text` as one printable line: control characters escaped, cut at `limit` characters."""
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                            else f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class EdgeqError(Exception):
    """A problem with user input (a file, an option), reported as one line.

    Messages often quote what a file holds (a key, a name, a value); whatever it holds, the message stays one
    printable line of bounded length."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else one_line(os.fsdecode(os.fspath(path)), 300)
        self.problem = one_line(str(problem))
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


# --- values read from untrusted config files (config.json, GGUF metadata, adapter configs) -------------------
# `int("x")`, `int([1])`, `int(float("inf"))` and a missing key each raise a different Python exception deep in
# an importer; these turn every such value into the number it must be, or one line naming the key.

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


class RequestError(EdgeqError, ValueError):
    """A request to a loaded model that cannot be served as asked: a sampling value out of range, a prompt
    longer than the context, a malformed message list. One line in the CLI; a 400 from the server, whose error
    object names `param` and `code`. A ValueError too, for callers that catch those."""

    def __init__(self, problem: str, param: str | None = None, code: str | None = None):
        self.param = param
        self.code = code
        super().__init__(None, problem)
