"""The format registry: exact sizes, and quantizers bit-identical to gguf-py's and to ggml's row sizes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from edgeq.core.formats import ggml
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import FORMATS, formats_for, get_format

GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k",
              "iq4_nl", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"]


def weights(rows=64, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * np.linspace(0.01, 1.0, cols)).astype(np.float32)


def test_every_gguf_type_is_registered():
    assert sorted(f.name for f in formats_for("gguf")) == sorted(GGUF_TYPES)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_sizes_match_ggml(name):
    fmt = get_format(name)
    for cols in (256, 512, 1536):
        assert fmt.nbytes((3, cols)) == 3 * ggml.row_size(fmt.ggml_type, cols)
    w = weights()
    if fmt.requires_imatrix:        # refused in one line without one (ggml itself would abort the process)
        with pytest.raises(EdgeqError, match="importance matrix"):
            fmt.quantize(w)
    q = fmt.quantize(w, np.ones(w.shape[1], dtype=np.float32) if fmt.requires_imatrix else None)
    assert q.dtype == np.uint8 and q.nbytes == fmt.nbytes(w.shape)


def test_bits_per_weight_include_scales():
    assert get_format("q8_0").bits_per_weight == pytest.approx(8.5)
    assert get_format("q4_0").bits_per_weight == pytest.approx(4.5)
    assert get_format("q4_k").bits_per_weight == pytest.approx(4.5)
    assert get_format("q6_k").bits_per_weight == pytest.approx(6.5625)
    assert get_format("q2_k").bits_per_weight == pytest.approx(2.625)


def test_k_types_need_256_wide_rows():
    assert not get_format("q4_k").can_carry((576, 576))
    assert get_format("q4_k").can_carry((576, 1536))
    assert get_format("q4_0").can_carry((576, 576))


@pytest.mark.parametrize("name", ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "bf16"])
def test_ggml_quantizer_equals_gguf_py(name):
    """Two independent implementations of the same bytes: ggml's C code and gguf-py's numpy port."""
    fmt = get_format(name)
    w = weights(seed=3)
    ours = fmt.quantize(w)
    theirs = gq.quantize(w, GGMLQuantizationType(fmt.ggml_type))
    assert np.array_equal(ours.reshape(-1), np.asarray(theirs).view(np.uint8).reshape(-1))


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_roundtrip_error_shrinks_with_bits(name):
    w = weights(seed=5)
    fmt = get_format(name)
    rel = np.linalg.norm(fmt.roundtrip(w, np.ones(w.shape[1], dtype=np.float32) if fmt.requires_imatrix else None)
                         - w) / np.linalg.norm(w)
    bound = {"f32": 0.0, "f16": 1e-3, "bf16": 5e-3, "q8_0": 1e-2, "q6_k": 2e-2, "q5_0": 5e-2, "q5_1": 5e-2,
             "q5_k": 5e-2, "q4_0": 0.1, "q4_1": 0.1, "q4_k": 0.1, "q3_k": 0.2, "q2_k": 0.4,
             "iq4_nl": 0.09, "iq4_xs": 0.09, "iq3_s": 0.18, "iq3_xxs": 0.2, "iq2_s": 0.28, "iq2_xs": 0.33,
             "iq2_xxs": 0.38, "iq1_m": 0.5, "iq1_s": 0.53}[name]
    assert rel <= bound


def test_blockwise_formats_quantize_each_block_as_their_row_does():
    """`Format.blockwise` (GPTQ's pricing reads the compensated round trip off its block loop, passes/gptq.py) holds for every
    GGUF format that claims it, with and without an importance matrix; llama.cpp's row-scaled 32-block types do not
    claim it, and they do differ."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((48, 1024)) * np.exp(rng.standard_normal(1024))).astype(np.float32)
    w[:3, :40] = 0.0
    imp = rng.uniform(0.05, 3.0, 1024).astype(np.float32)
    claims = {}
    for f in formats_for("gguf"):
        if f.block[1] == 1:
            continue
        step = f.block[1]
        for im in ([imp] if f.requires_imatrix else [None, imp]) if f.takes_imatrix else [None]:
            whole = f.quantize(w, im)
            parts = np.concatenate([f.quantize(np.ascontiguousarray(w[:, s:s + step]), None if im is None else
                                               im[s:s + step]) for s in range(0, w.shape[1], step)], axis=1)
            claims.setdefault(f.name, []).append(np.array_equal(whole, parts))
    assert {n for n, same in claims.items() if all(same)} == {f.name for f in formats_for("gguf")
                                                              if f.blockwise}
    assert set(claims) - {f.name for f in formats_for("gguf") if f.blockwise} == {"q4_0", "q4_1", "q5_0",
                                                                                         "q5_1"}


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_ggml_dequantizer_equals_gguf_py(name):
    """Dequantizing is ggml's C code (fast); gguf-py's numpy port gives the same floats, bit for bit."""
    fmt = get_format(name)
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((24, 768)) * np.exp(rng.standard_normal(768))).astype(np.float32)
    w[:2, :300] = 0.0
    w[5] *= 30.0
    data = fmt.quantize(w, rng.uniform(0.01, 4.0, 768).astype(np.float32) if fmt.takes_imatrix else None)
    ours = fmt.dequantize(data, w.shape)
    theirs = np.asarray(gq.dequantize(data, GGMLQuantizationType(fmt.ggml_type)), dtype=np.float32).reshape(w.shape)
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_threaded_quantization_is_deterministic():
    w = weights(rows=300, cols=768, seed=9)
    a = ggml.quantize(int(GGMLQuantizationType.Q4_K), w, threads=1)
    b = ggml.quantize(int(GGMLQuantizationType.Q4_K), w, threads=2)
    assert np.array_equal(a, b)


def test_imatrix_changes_k_quants():
    w = weights(seed=11)
    imat = np.linspace(0.01, 10, w.shape[1]).astype(np.float32)
    fmt = get_format("q4_k")
    assert not np.array_equal(fmt.quantize(w), fmt.quantize(w, imat))


def test_unknown_format_is_a_clear_error():
    with pytest.raises(EdgeqError, match="unknown format 'q7_z'"):
        get_format("q7_z")
    assert "q4_k" in FORMATS
