"""llama.cpp's importance-matrix files, read and written.

The format is what `llama-imatrix` writes (tools/imatrix/imatrix.cpp, llama.cpp
as vendored in llama-cpp-python 0.3.36) and `llama-quantize --imatrix` reads
(common/imatrix-loader.cpp): a GGUF with `general.type = "imatrix"`, the keys
`imatrix.datasets` (strings), `imatrix.chunk_count` and `imatrix.chunk_size`
(u32), and per weight two F32 tensors, `<name>.in_sum2` (ne = [width, n_mat],
raw sums of squared inputs) and `<name>.counts` (ne = [1, n_mat], tokens seen),
names sorted. The importance llama.cpp hands to ggml is in_sum2 / counts.
The legacy `.dat` layout is read too.

Names are GGUF tensor names (`blk.0.attn_q.weight`). llama-imatrix collects
`blk.*` weights (and `output.weight` with --process-output); edgeq also writes
`token_embd.weight` for a tied embedding (the output head's input), which
llama-quantize applies to that tensor like any other entry.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.importers.gguf_metadata import open_gguf

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


@dataclass
class ImatrixEntry:
    sums: np.ndarray       # float32, (n_mat * width,)
    counts: np.ndarray     # float (n_mat,)

    def importance(self) -> np.ndarray:
        """What llama-quantize passes to ggml: in_sum2 / counts per matrix (1 where nothing was counted)."""
        n_mat = self.counts.size
        sums = self.sums.reshape(n_mat, -1).astype(np.float32)
        out = np.ones_like(sums)
        for j, c in enumerate(self.counts):
            if c > 0:
                out[j] = sums[j] / np.float32(c)
        return out.reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False


def write_imatrix(path: str | os.PathLike, im: Imatrix) -> None:
    """Write `im` as llama-imatrix does (same keys, names, shapes, order)."""
    from gguf import GGUFWriter

    path = Path(path)
    w = GGUFWriter(path, arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)     # llama-imatrix writes no architecture
    w.add_string("general.type", "imatrix")
    w.add_array(KEY_DATASETS, list(im.datasets))
    w.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat = int(e.counts.size)
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32).reshape(n_mat, -1))
        w.add_tensor(f"{name}.counts", np.asarray(e.counts, dtype=np.float32).reshape(n_mat, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(path, "no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    """Through edgeq's bounded GGUF reader (gguf_metadata), never gguf-py's: the file is untrusted."""
    from gguf import GGMLQuantizationType

    r = open_gguf(path)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.tensor_type != GGMLQuantizationType.F32:
            raise EdgeqError(path, f"imatrix tensor {t.name} must be F32")
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise EdgeqError(path, "no imatrix data (no <name>.in_sum2 tensors)")
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise EdgeqError(path, f"mismatched sums and counts for {name}")
        c = counts[name]
        if not np.isfinite(c).all() or (c < 0).any() or (c > 2**53).any():
            raise EdgeqError(path, f"{name}: token counts must be finite and non-negative")
        c = np.round(c).astype(np.int64)
        if not np.isfinite(sums[name]).all():
            raise EdgeqError(path, f"{name}: sums hold NaN or infinite values")
        if sums[name].size % c.size:
            raise EdgeqError(path, f"{name}: {sums[name].size} sums do not split into {c.size} matrices")
        entries[name] = ImatrixEntry(sums[name], c)
    meta = r.metadata

    def field(key: str, want: type, default):
        v = meta.get(key, default)
        if want is int and (type(v) is not int or v < 0):
            raise EdgeqError(path, f"{key} must be a non-negative integer")
        if want is list and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            raise EdgeqError(path, f"{key} must be a list of strings")
        return v

    return Imatrix(entries, list(field(KEY_DATASETS, list, [])), field(KEY_CHUNK_COUNT, int, 0),
                   field(KEY_CHUNK_SIZE, int, 0))


def _read_legacy(path: Path) -> Imatrix:
    """The old `.dat` layout: n_entries, then per entry name, ncall, nval, values (already sum/count*ncall)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise EdgeqError(path, "truncated imatrix file (neither GGUF nor complete legacy .dat)")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v

    (n,) = take("<i")
    if n < 1 or n > 1 << 20:
        raise EdgeqError(path, "not an imatrix file (neither GGUF nor legacy .dat)")
    entries = {}
    for _ in range(n):
        (ln,) = take("<i")
        if ln <= 0 or ln > 4096:
            raise EdgeqError(path, "not an imatrix file (bad entry name length)")
        name = bytes(take(f"<{ln}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1 or ncall < 0:
            raise EdgeqError(path, f"entry {name} has {nval} values from {ncall} calls")
        if pos + 4 * nval > len(data):
            raise EdgeqError(path, "truncated imatrix file (neither GGUF nor complete legacy .dat)")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        if not np.isfinite(vals).all():
            raise EdgeqError(path, f"entry {name} holds NaN or infinite values")
        if name in entries:
            raise EdgeqError(path, f"entry {name} appears twice")
        # legacy sums are (raw / count) * ncall: importance = sums / ncall, i.e. counts = ncall
        entries[name] = ImatrixEntry(vals, np.array([ncall], dtype=np.int64))
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            if ln > 0 and pos + ln <= len(data):
                datasets.append(data[pos:pos + ln].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunks, 0, legacy=True)
