"""runtime/lora.py's factor store and runtime/arrays.py's aligned safetensors reader, on small arrays: what a
switch between adapters and combinations of them reads, holds and feeds (the runtimes' logits over it are
tests/test_adapters_separate.py's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgeq.runtime.arrays import ALIGNMENT, read_aligned_arrays
from edgeq.runtime.lora import HeldAdapter, LoraFactorStore
from edgeq.runtime.manifest import BundleError

SHAPES = {"w1": (24, 40), "w2": (40, 24)}


def factors(seed: int, ranks: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {w: (rng.standard_normal((SHAPES[w][0], r)).astype(np.float32),
                rng.standard_normal((r, SHAPES[w][1])).astype(np.float32)) for w, r in ranks.items()}


def delta(f: dict, w: str) -> np.ndarray:
    a, b = f.get(w, (np.zeros((SHAPES[w][0], 0), np.float32), np.zeros((0, SHAPES[w][1]), np.float32)))
    return a.astype(np.float64) @ b.astype(np.float64)


def test_store_switches_without_reading_members_at_scale_one():
    files = {"p": factors(1, {"w1": 4, "w2": 2}), "q": factors(2, {"w1": 3})}
    reads = []

    def read(path: Path) -> HeldAdapter:
        reads.append(path.name)
        return HeldAdapter({w: (a.copy(), b.copy()) for w, (a, b) in files[path.name].items()})

    store = LoraFactorStore(read)
    open_file = Path
    p = store.select([("p", 1.0)], open_file)
    assert reads == ["p"] and all(np.array_equal(p[w][i], files["p"][w][i]) for w in p for i in (0, 1))
    both = store.select([("p", 1.0), ("q", 2.0)], open_file)
    assert reads == ["p", "q"] and store.held_alone == []
    for w in SHAPES:        # several adapters add their deltas, each at its scale
        want = delta(files["p"], w) + 2.0 * delta(files["q"], w)
        got = delta(both, w) if w in both else np.zeros_like(want)
        assert np.allclose(got, want, atol=1e-5)
    assert both["w1"][0].shape == (24, 7) and both["w2"][0].shape == (40, 2)
    assert store.select([("p", 1.0), ("q", 2.0)], open_file) is both           # the same choice: nothing built
    again = store.select([("p", 1.0)], open_file)                             # copied out, no file read
    assert reads == ["p", "q"] and store.held_alone == ["p"]
    for w in files["p"]:
        for i in (0, 1):
            arr = again[w][i]
            assert np.array_equal(arr, files["p"][w][i]) and arr.flags.c_contiguous
            assert arr.ctypes.data % ALIGNMENT == 0
    store.select([("q", 2.0), ("p", 1.0)], open_file)                          # q (scale 2) was dropped: read
    assert reads == ["p", "q", "q"]
    store.select([], open_file)
    store.select([("q", 1.0)], open_file)                                     # q was at scale 2: read again
    assert reads == ["p", "q", "q", "q"] and store.held_alone == ["p", "q"]


def test_store_moves_between_combinations_without_reading():
    files = {"p": factors(3, {"w1": 4, "w2": 2}), "q": factors(4, {"w1": 3, "w2": 5})}
    reads = []

    def read(path: Path) -> HeldAdapter:
        reads.append(path.name)
        return HeldAdapter({w: (a.copy(), b.copy()) for w, (a, b) in files[path.name].items()})

    store = LoraFactorStore(read)
    store.select([("p", 1.0), ("q", 1.0)], Path)
    for scales in ((0.5, 1.0), (1.0, 3.0)):          # p at 0.5 and q at 1, then p from the first (re-read), q at 3
        got = store.select([("p", scales[0]), ("q", scales[1])], Path)
        for w in SHAPES:
            want = scales[0] * delta(files["p"], w) + scales[1] * delta(files["q"], w)
            assert np.allclose(delta(got, w), want, atol=1e-5)
    assert reads == ["p", "q", "p"] and store.held_alone == []
    alone = store.select([("p", 1.0)], Path)                                   # copied out of the last one
    assert reads == ["p", "q", "p"] and store.held_alone == ["p"]
    assert all(np.array_equal(alone[w][i], files["p"][w][i]) for w in files["p"] for i in (0, 1))


def test_store_keeps_an_owner_with_its_views():
    owner = np.arange(24 * 2 + 2 * 40, dtype=np.float32)
    held = HeldAdapter({"w1": (owner[:48].reshape(24, 2), owner[48:].reshape(2, 40))}, owner=owner)
    store = LoraFactorStore(lambda path: held)
    assert store.select([("p", 1.0)], Path)["w1"][0].base is owner
    assert store._held["p"].owner is owner


def write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    save_file(arrays, str(path))
    return path


def test_aligned_reader_equals_safetensors_and_aligns(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x.lora_a": rng.standard_normal((5, 3)).astype(np.float32), "y": rng.integers(0, 9, (2, 7)).astype(
        np.int32), "z": rng.standard_normal(3).astype(np.float16), "e": np.zeros((0, 4), np.float32)}
    path = write_safetensors(tmp_path / "a.safetensors", arrays)
    got, want = read_aligned_arrays(path), load_file(str(path))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
        assert got[k].flags.c_contiguous and got[k].flags.writeable
        assert got[k].size == 0 or got[k].ctypes.data % ALIGNMENT == 0


def _raw(header: dict, data: bytes, pad: int = 0) -> bytes:
    h = json.dumps(header).encode() + b" " * pad
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("bad", [
    b"\x01",                                                                         # shorter than its size field
    (10 ** 9).to_bytes(8, "little") + b"{}",                                         # header past the file
    _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),  # data past the file
    _raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),  # bytes not the shape's
    _raw({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),   # unknown dtype
    _raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, -8]}}, b""),     # negative shape
    _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),  # a hole
    _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),  # overlapping
    _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),  # bytes left over
    b"\x04\0\0\0\0\0\0\0[1,]",                                                       # not JSON
])
def test_aligned_reader_refuses_bad_files_in_one_line(tmp_path, bad):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bad)
    with pytest.raises(BundleError) as e:
        read_aligned_arrays(path)
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)
    if len(bad) > 8:
        with pytest.raises(Exception):
            load_file(str(path))        # the safetensors reader refuses them too
