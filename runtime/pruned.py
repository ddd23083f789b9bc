"""Where a runtime keeps a model narrowed to a pruning rate's widths: made once into the cache and reused.

The file is written by the backend's slicer (runtime/gguf_slice.py, runtime/onnx_slice.py) into
EDGEQ_CACHE/pruned/ (~/.cache/edgeq/pruned/), keyed by the artifact's SHA-256 and the widths, and the least recently
used files go once the folder passes EDGEQ_PRUNED_CACHE_MB (default 2048) MB. With the cache off (EDGEQ_CACHE=off)
or unwritable, the file is temporary and removed once the runtime has loaded it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from edgeq.core.cache import cache_dir
from edgeq.runtime.manifest import Pruning

PRUNED_CACHE_MB = 2048


@contextmanager
def pruned_file(sha256: str, pruning: Pruning, suffix: str, version: int,
                make: Callable[[Path], object]) -> Iterator[Path]:
    """A path holding the model at `pruning`'s widths; `make(path)` writes it (atomically) when it is not cached.
    `version`: of the slicer's output, part of the key."""
    parts = [version, sha256, pruning.widths, pruning.align]
    if pruning.qk is not None:
        parts += [pruning.qk, pruning.v]
    if pruning.bias is not None:          # --prune-compensate: the biases' bytes
        parts.append(hashlib.sha256(b"".join(b.astype("<f4").tobytes() for b in pruning.bias)).hexdigest())
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    root = cache_dir()
    path = None
    if root is not None:
        path = root / "pruned" / f"{key[:32]}{suffix}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                os.utime(path)                    # most recently used: evicted last
            else:
                make(path)
                evict(path.parent, keep=path)
        except OSError:
            path = None                           # an unwritable cache: a temporary file instead
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="edgeq-pruned-") as d:
        path = Path(d) / f"model{suffix}"
        make(path)
        yield path


def evict(folder: Path, keep: Path) -> None:
    """Least recently used files go until the folder holds at most EDGEQ_PRUNED_CACHE_MB MB, `keep` (the file just
    made) apart. A file a runtime has open or mapped stays readable after it is removed."""
    cap = float(os.environ.get("EDGEQ_PRUNED_CACHE_MB", PRUNED_CACHE_MB)) * 1e6
    files = sorted((f for f in folder.iterdir() if f.is_file() and f != keep and not f.name.startswith(".")),
                   key=lambda f: f.stat().st_mtime)
    total = keep.stat().st_size + sum(f.stat().st_size for f in files)
    for f in files:
        if total <= cap:
            break
        total -= f.stat().st_size
        f.unlink(missing_ok=True)
