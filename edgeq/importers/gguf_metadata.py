"""Read and sanity-check a GGUF file's header with gguf-py's reader.

GGUF files are untrusted input: the reader is memory-mapped and bounds are
checked here (tensor data inside the file) before anything dereferences them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError


def open_gguf(path: str | os.PathLike):
    """Open a GGUF file with gguf-py, turning every parse failure into an EdgeqError."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise EdgeqError(path, "no such file")
    if path.is_dir():
        raise EdgeqError(path, "is a directory, expected a GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EdgeqError(path, "not a GGUF file (bad magic)")
    try:
        reader = GGUFReader(path, "r")
    except EdgeqError:
        raise
    except Exception as exc:  # truncated or corrupt header: gguf-py raises many types
        raise EdgeqError(path, f"corrupt or truncated GGUF header ({type(exc).__name__}: {exc})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise EdgeqError(path, f"tensor {t.name} data runs past the end of the file ({end} > {size} bytes)")
    return reader


def read_metadata(reader) -> dict[str, Any]:
    """All key/value fields as plain Python values (str, int, float, bool, lists)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8", errors="replace") for v in value]
        out[key] = value
    return out
