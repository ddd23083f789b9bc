"""Hostile files: crafted GGUFs refused in under a second without allocating, and a short seeded fuzz run of every
reader (fuzz/run.py; the long campaign is `python fuzz/run.py --cases 10000`)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from edgeq.cli import main as cli_main
from edgeq.core.errors import EdgeqError
from edgeq.importers.gguf_metadata import open_gguf

ROOT = Path(__file__).resolve().parents[1]


def _s(x: bytes) -> bytes:
    return struct.pack("<Q", len(x)) + x


def _kv_u32(key: bytes, v: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, v)


def _tensor_info(name: bytes, dims: list[int], gtype: int, offset: int) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", gtype, offset)


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _padded(b: bytes) -> bytes:
    return b + bytes(-len(b) % 32)


CRAFTED = {
    # 2**63 tensors: a reader that allocates per count, or loops, before checking the file's size is done for
    "tensor_count_2_63": (_header(2**63, 1) + _kv_u32(b"general.alignment", 32) + bytes(64),
                          "tensor infos runs past the end of the file"),
    # a string claiming 2**40 bytes, in the first metadata value
    "string_2_40": (_header(0, 1) + _s(b"general.name") + struct.pack("<I", 8) + struct.pack("<Q", 2**40) + b"x" * 64,
                    "runs past the end of the file (needs 1099511627776 bytes"),
    # an array of 2**62 u32 elements: its byte size overflows 64 bits
    "array_2_62": (_header(0, 1) + _s(b"tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 4, 2**62) + bytes(64),
                   "runs past the end of the file"),
    # two F32 tensors of 16 floats whose data ranges overlap (offsets 0 and 32 of 64-byte spans)
    "overlapping_data": (_padded(_header(2, 0) + _tensor_info(b"a.weight", [16], 0, 0) +
                                 _tensor_info(b"b.weight", [16], 0, 32)) + bytes(128),
                         "tensors a.weight and b.weight have overlapping data"),
    # one tensor whose element count's byte size overflows: dims 2**32 x 2**32 x 2**32
    "element_count_overflow": (_padded(_header(1, 0) + _tensor_info(b"a.weight", [2**32, 2**32, 2**32], 0, 0))
                               + bytes(64), "impossible shape"),
    # n_dims 2**31
    "n_dims_2_31": (_padded(_header(1, 0) + _s(b"a.weight") + struct.pack("<I", 2**31)) + bytes(64),
                    "has 2147483648 dimensions"),
    # data past the end of the file
    "data_out_of_file": (_padded(_header(1, 0) + _tensor_info(b"a.weight", [1024], 0, 0)) + bytes(64),
                         "data runs past the end of the file"),
    # arrays nested deeper than any GGUF writer nests them
    "nested_arrays": (_header(0, 1) + _s(b"x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000,
                      "arrays nested more than 4 deep"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_gguf_is_refused_fast_without_allocating(name, tmp_path):
    data, msg = CRAFTED[name]
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(EdgeqError) as e:
            open_gguf(p)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 1 << 20, f"{peak} bytes allocated"        # Python and numpy allocations, all of them
    assert msg in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(str(p))


@pytest.mark.parametrize("name", ["tensor_count_2_63", "string_2_40", "overlapping_data"])
def test_edgeq_inspect_refuses_crafted_gguf_with_exit_status_2(name, tmp_path, capsys):
    data, msg = CRAFTED[name]
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(data)
    assert cli_main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"edgeq: error: {p}: ") and msg in err[0]


def test_error_messages_quoting_a_file_stay_one_printable_line():
    e = EdgeqError("a\nb.gguf", "key 'x\ny\x00z' " + "w" * 5000)
    assert "\n" not in str(e) and "\x00" not in str(e) and len(str(e)) < 1000


def test_short_fuzz_run_of_every_reader(tmp_path):
    """Every target's seeds and saved regressions, then 200 seeded mutations each: parsed or refused only."""
    env = {**os.environ, "EDGEQ_FUZZ_SEEDS": str(tmp_path / "seeds"), "EDGEQ_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "fuzz.json"
    res = subprocess.run([sys.executable, str(ROOT / "fuzz" / "run.py"), "--cases", "200", "--seed", "1",
                          "--out", str(out), "--crashes", str(tmp_path / "crashes")],
                         env=env, capture_output=True, text=True, timeout=1800)
    rows = json.loads(out.read_text())["targets"] if out.exists() else []
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(rows) == 13
    for r in rows:
        assert r["cases"] >= 200 and r["crash"] == r["hang"] == r["memory"] == 0, r
        assert r["parsed"] > 0 and r["refused"] > 0, r        # both outcomes really exercised


@pytest.mark.parametrize("name", ["unknown-op.pt2", "corrupt-zip-torch-logs.pt2"])
def test_a_pt2_torch_cannot_load_is_one_line(name):
    """torch.export.load logs a traceback per failure; the user sees edgeq's one line and torch's reason."""
    p = ROOT / "fuzz" / "corpus" / "pt2" / name
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", "inspect", str(p)], capture_output=True, text=True,
                         timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith(f"edgeq: error: {p}: torch.export.load failed: ")
