"""One error type for everything a user can get wrong.

The CLI turns it into a single line `edgeq: error: FILE: PROBLEM` and a
non-zero exit, so every raise site must name the file it is about.
"""

from __future__ import annotations

import os


class EdgeqError(Exception):
    """A problem with user input (a file, an option), reported as one line."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
