"""Atomic file and folder writes: a failed export must leave nothing that looks finished."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgeq.core.errors import EdgeqError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Fail before any work if the output folder cannot be created where asked."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise EdgeqError(parent, "is a file, cannot create the output folder under it")
        if parent.exists():
            break
    if out.exists() and any(out.iterdir()) and not force:
        raise EdgeqError(out, "already exists and is not empty (pass --force to replace it)")
    return out


@contextmanager
def staged_dir(out: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; rename it to `out` only if the block succeeds."""
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files a source model consists of: the file itself, or a folder's regular files (not hidden)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def sha256_source(path: str | os.PathLike) -> str:
    """SHA-256 of a model file; for a folder, of its listing "<file sha256>  <name>\n" sorted by name."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    listing = "".join(f"{sha256_file(p)}  {p.name}\n" for p in source_files(path))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def source_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in source_files(path))
