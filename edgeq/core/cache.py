"""Where edgeq keeps what it computed once and can reuse: calibrations, cost tables, library sizes, tunings.

One root for every cache, so that one variable moves or disables them all.

A cache entry is never trusted as it lies on disk: a process killed while writing, a full disk, a power cut
or a stray edit would otherwise feed an export numbers nobody computed. Every entry is written whole (a
temporary file, flushed, renamed into place) and carries its own length and SHA-256 (`write_entry`);
`read_entry` checks both, and an entry that fails is removed and reported as absent, so the caller computes
it again. Writes are best effort: a cache that cannot be written costs time, never a failed export.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from edgeq.core.fs import atomic_write_bytes

MAGIC = b"EDGEQ-CACHE-1\n"
_HEADER = len(MAGIC) + 8 + 32


def cache_dir() -> Path | None:
    """The cache root (EDGEQ_CACHE; 'off' disables caching): ~/.cache/edgeq by default."""
    root = os.environ.get("EDGEQ_CACHE")
    if root == "off":
        return None
    return Path(root) if root else Path.home() / ".cache" / "edgeq"


def encode_entry(payload: bytes) -> bytes:
    return MAGIC + struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest() + payload


def decode_entry(blob: bytes) -> bytes | None:
    """The payload of an entry, or None when its header, length or SHA-256 does not hold."""
    if len(blob) < _HEADER or not blob.startswith(MAGIC):
        return None
    (n,) = struct.unpack_from("<Q", blob, len(MAGIC))
    payload = blob[_HEADER:]
    if n != len(payload) or hashlib.sha256(payload).digest() != blob[len(MAGIC) + 8:_HEADER]:
        return None
    return payload


def write_entry(path: Path, payload: bytes) -> bool:
    """Store `payload` at `path` whole, with its checksum; False (nothing written) when the disk refuses."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encode_entry(payload))
        return True
    except OSError:
        return False


def read_entry(path: Path | None) -> bytes | None:
    """The payload stored at `path`; None when there is none or it is torn (a torn entry is removed)."""
    if path is None:
        return None
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    payload = decode_entry(blob)
    if payload is None:
        try:
            path.unlink()
        except OSError:
            pass
    return payload


def read_json_entry(path: Path | None) -> Any | None:
    payload = read_entry(path)
    if payload is None:
        return None
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def write_json_entry(path: Path | None, value: Any) -> bool:
    return path is not None and write_entry(path, json.dumps(value).encode("utf-8"))
