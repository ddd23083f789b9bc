"""edgeq's bounded GGUF header reader: same answers as gguf-py, clear errors on damaged files."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from edgeq.core.errors import EdgeqError
from edgeq.importers.gguf_metadata import open_gguf, read_metadata


def test_same_as_gguf_py(smollm_path):
    ours = open_gguf(smollm_path)
    theirs = gguf.GGUFReader(smollm_path)
    by_name = {t.name: t for t in ours.tensors}
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        o = by_name[t.name]
        assert o.tensor_type == t.tensor_type and list(o.shape) == list(t.shape) and o.data_offset == t.data_offset
        assert o.data.dtype == t.data.dtype and np.array_equal(o.data, t.data)
    meta = read_metadata(ours)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        v = field.contents()
        if isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        assert meta[key] == pytest.approx(v) if isinstance(v, float) else meta[key] == v, key


@pytest.mark.parametrize("cut", [3, 10, 23, 30, 100, 5_000, 700_000, 1_500_000, 1_700_000, 50_000_000])
def test_truncated_anywhere_is_a_clear_error(smollm_path, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as f:
        bad.write_bytes(f.read(cut))
    with pytest.raises(EdgeqError) as e:
        open_gguf(bad)
    assert "cut.gguf" in str(e.value)


def test_lying_counts_fail_fast_without_allocating(tmp_path):
    bad = tmp_path / "liar.gguf"
    # header claiming 2^60 tensors and 2^60 key/values
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 1 << 60) + b"\0" * 64)
    with pytest.raises(EdgeqError, match="runs past the end"):
        open_gguf(bad)
    # one key whose string length is 2^62
    bad.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 62) + b"\0" * 64)
    with pytest.raises(EdgeqError, match="runs past the end"):
        open_gguf(bad)
