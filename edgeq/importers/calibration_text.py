"""The text a model is calibrated on: pydoc's calibration half by default, or the user's own.

`--calib-text FILE|DIR` is plain UTF-8 text (a folder: every file in it, by path). `--calib-jsonl FILE` is one
conversation per line, `{"messages": [{"role": ..., "content": ...}, ...]}` (or the bare list), rendered
through the model's own chat template and tokenized with its special tokens parsed, as `edgeq run --chat`
does on the device, so calibration sees the prompt format the device will see. A source is named in
records by its file name and the SHA-256 of its bytes (a folder: of its files' paths and hashes), never by
its full path, so the same data gives the same bundle wherever it lies.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgeq.core.errors import EdgeqError
from edgeq.core.fs import sha256_file
from edgeq.evaluate.texts import CALIBRATION_TEXT_NAME, calibration_text

MAX_BYTES = 512 * 2**20      # calibration reads a few thousand tokens; more than this is a mistake


@dataclass(frozen=True)
class CalibrationText:
    kind: str                    # "default" (pydoc), "text" or "jsonl"
    name: str                    # what the plan and manifest say
    sha256: str
    path: Path | None = None

    @property
    def is_default(self) -> bool:
        return self.kind == "default"

    def text(self) -> str:
        """The whole text (kinds default and text)."""
        if self.kind == "default":
            return calibration_text()
        files = _files(self.path) if self.path.is_dir() else [self.path]
        return "\n\n".join(_read_utf8(f) for f in files)

    def conversations(self) -> list[list[dict[str, str]]]:
        """The conversations of a jsonl source, checked line by line."""
        out = []
        for n, line in enumerate(_read_utf8(self.path).splitlines(), 1):
            if line.strip():
                out.append(_messages(line, n, self.path))
        if not out:
            raise EdgeqError(self.path, "has no conversations (one JSON object with 'messages' per line)")
        return out

    def sentences(self) -> list[str]:
        """Short texts for encoders: the text's non-empty lines, or every message of the conversations."""
        if self.kind == "jsonl":
            return [m["content"] for conv in self.conversations() for m in conv if m["content"].strip()]
        return [line.strip() for line in self.text().splitlines() if line.strip()]

    def record(self) -> dict[str, Any]:
        return {"text": self.name, "text_sha256": self.sha256,
                **({} if self.is_default else {"text_kind": self.kind})}


@lru_cache(maxsize=1)
def default_calibration_text() -> CalibrationText:
    return CalibrationText("default", CALIBRATION_TEXT_NAME,
                           hashlib.sha256(calibration_text().encode()).hexdigest())


def calibration_source(text: str | os.PathLike | None = None, jsonl: str | os.PathLike | None = None
                       ) -> CalibrationText:
    """The calibration text the options name (checked and hashed now, read when a pass needs it)."""
    if text is not None and jsonl is not None:
        raise EdgeqError(None, "give either --calib-text or --calib-jsonl, not both")
    if text is None and jsonl is None:
        return default_calibration_text()
    path = Path(text if text is not None else jsonl).expanduser()
    if not path.exists():
        raise EdgeqError(path, "no such calibration file or folder")
    if jsonl is not None:
        if not path.is_file():
            raise EdgeqError(path, "--calib-jsonl takes a file (one conversation per line)")
        _check_size(path, path.stat().st_size)
        source = CalibrationText("jsonl", f"{path.name} (chat, rendered with the model's template)",
                                 sha256_file(path), path)
        source.conversations()       # refuse a malformed file before anything is computed
        return source
    if path.is_dir():
        files = _files(path)
        if not files:
            raise EdgeqError(path, "calibration folder has no files")
        _check_size(path, sum(f.stat().st_size for f in files))
        listing = "".join(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n" for f in files)
        return CalibrationText("text", f"{path.name}/ ({len(files)} files, plain text)",
                               hashlib.sha256(listing.encode()).hexdigest(), path)
    _check_size(path, path.stat().st_size)
    _read_utf8(path)
    return CalibrationText("text", f"{path.name} (plain text)", sha256_file(path), path)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _check_size(path: Path, n: int) -> None:
    if n > MAX_BYTES:
        raise EdgeqError(path, f"calibration data is {n} bytes, more than the {MAX_BYTES} edgeq reads")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeqError(path, f"is not UTF-8 text (byte {exc.start})") from None


def _messages(line: str, n: int, path: Path) -> list[dict[str, str]]:
    try:
        d = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EdgeqError(path, f"line {n} is not JSON ({exc})") from None
    msgs = d.get("messages") if isinstance(d, dict) else d
    if not isinstance(msgs, list) or not msgs:
        raise EdgeqError(path, f"line {n} has no 'messages' list")
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise EdgeqError(path, f"line {n}: every message needs a string 'role' and 'content', got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]
