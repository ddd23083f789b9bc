"""One error type for everything a user can get wrong.

The CLI turns it into a single line `edgeq: error: FILE: PROBLEM` and a
non-zero exit, so every raise site must name the file it is about.
"""

from __future__ import annotations

import os
import re

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
