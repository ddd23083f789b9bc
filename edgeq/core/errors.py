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


class RequestError(EdgeqError, ValueError):
    """A request to a loaded model that cannot be served as asked: a sampling value out of range, a prompt
    longer than the context, a malformed message list. One line in the CLI; a 400 from the server, whose error
    object names `param` and `code`. A ValueError too, for callers that catch those."""

    def __init__(self, problem: str, param: str | None = None, code: str | None = None):
        self.param = param
        self.code = code
        super().__init__(None, problem)
