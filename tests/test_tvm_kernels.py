"""The hand-written CPU kernels of TVM encoders against numpy: the f32 linear (f32_linear.py: row blocks, input
chunks, the bias and fused GELU after) and the residual add + LayerNorm (layernorm.py), on row counts that are not
whole blocks."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgeq.targets.profiles import get_profile                     # noqa: E402
from edgeq.targets.tvm.build import resolve_target                 # noqa: E402

HOST = tvm.target.Target(resolve_target(get_profile("cpu")))


def _run(func, arrays):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("batch,seq,k_dim,n_dim,gelu", [(1, 5, 64, 64, False), (2, 19, 192, 128, True)])
def test_f32_linear_kernel(batch, seq, k_dim, n_dim, gelu):
    from scipy.special import erf

    from edgeq.targets.tvm.f32_linear import f32_linear_kernel
    from edgeq.targets.tvm.ops import panels

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, seq, k_dim)).astype(np.float32)
    w = rng.standard_normal((n_dim, k_dim)).astype(np.float32)
    b = rng.standard_normal(n_dim).astype(np.float32)
    got = _run(f32_linear_kernel(k_dim, n_dim, gelu), [x, panels(w.T), b, np.zeros((batch, seq, n_dim), np.float32)])
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    ref = ref * 0.5 * (1 + erf(ref / np.sqrt(2))) if gelu else ref
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_add_layer_norm_kernel():
    from edgeq.targets.tvm.layernorm import add_layer_norm_kernel

    rng = np.random.default_rng(1)
    a, r = (rng.standard_normal((2, 7, 96)).astype(np.float32) * 3 + 1 for _ in range(2))
    g, b = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    got = _run(add_layer_norm_kernel(96, 1e-12), [a, r, g, b, np.zeros_like(a)])
    v = (a + r).astype(np.float64)
    ref = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-12) * g + b
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _act_groups(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows quantized per group of 32 as the VNNI kernels do (q8_0's scheme): (int codes, f32 scales)."""
    g = x.reshape(x.shape[0], -1, 32)
    xs = (np.abs(g).max(-1) / np.float32(127)).astype(np.float32)
    xs[xs == 0] = 1
    return np.clip(np.round(g / xs[..., None]), -127, 127), xs


def int4_groups_matmul(x: np.ndarray, packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """ggml's q4_0 x q8_0: int4 codes (packed as int4_quantize_groups) by activations in int8 groups of 32."""
    n, k = packed.shape[0], packed.shape[1] * 2
    codes = np.empty((n, k)); codes[:, 0::2] = (packed & 15).astype(np.float64) - 8   # noqa: E702
    codes[:, 1::2] = (packed >> 4).astype(np.float64) - 8
    xq, xs = _act_groups(x)
    isum = np.einsum("ngk,mgk->mng", codes.reshape(n, k // 32, 32), xq)
    return (isum * scale.astype(np.float64)[None] * xs[:, None, :]).sum(-1)


def int8_groups_matmul(x: np.ndarray, q: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """int8 per-output weights by activations in int8 groups of 32 (q8_0 x q8_0 with the weight scale per row)."""
    n, k = q.shape
    xq, xs = _act_groups(x)
    isum = np.einsum("ngk,mgk->mng", q.astype(np.float64).reshape(n, k // 32, 32), xq)
    return (isum * xs[:, None, :]).sum(-1) * w_scale[None]


def _vnni_host() -> bool:
    from edgeq.targets.tvm.dot import dot_kind

    return dot_kind(resolve_target(get_profile("cpu"))) == "vnni"


@pytest.mark.skipif(not _vnni_host(), reason="host without AVX-512 VNNI")
@pytest.mark.parametrize("fmt,rows,tile,bias", [("int4", 1, 1, False), ("int4", 6, 4, True),
                                                ("int8", 1, 1, True), ("int8", 5, 2, False)])
def test_vnni_kernels_are_the_group_scheme(fmt, rows, tile, bias, tmp_path):
    """int4_vnni.py / int8_vnni.py on rows that are not whole tiles, an all-zero row among them: numpy's integers
    of the same scheme to float rounding (not the float product), and `vpdpbusd` in the compiled code."""
    import subprocess

    from edgeq.core.formats.int4_groups import int4_quantize_groups
    from edgeq.core.formats.int8 import int8_quantize_rows
    from edgeq.targets.tvm.int4_vnni import int4_vnni_kernel, vnni_order
    from edgeq.targets.tvm.int8_vnni import int8_vnni_kernel
    from edgeq.targets.tvm.ops import panels

    k_dim, n_dim = 96, 192
    rng = np.random.default_rng(2)
    w = rng.standard_normal((n_dim, k_dim)).astype(np.float32)
    x = rng.standard_normal((rows, k_dim)).astype(np.float32)
    x[-1] = 0 if rows > 1 else x[-1]
    b = rng.standard_normal(n_dim).astype(np.float32)
    if fmt == "int4":
        packed, scale = int4_quantize_groups(w)
        func, stored = int4_vnni_kernel(k_dim, n_dim, 64, bias, tile), [vnni_order(panels(packed.T)), panels(scale.T)]
        ref = int4_groups_matmul(x, packed, scale)
    else:
        q, scale = int8_quantize_rows(w)
        func, stored = int8_vnni_kernel(k_dim, n_dim, bias, tile), [panels(q.T), scale]
        ref = int8_groups_matmul(x, q, scale)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in [x, *stored, *([b] if bias else []),
                                                 np.zeros((rows, n_dim), np.float32)]]
    lib["main"](*args)
    ref = ref + (b if bias else 0)
    got = args[len(stored) + 1 + bias].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    deq = (int4_dequantize(packed, scale) if fmt == "int4" else q * scale[:, None]) @ x.T
    assert np.abs(ref - deq.T - (b if bias else 0)).max() > 1e-3          # the activations were quantized
    lib.export_library(str(tmp_path / "k.so"))
    text = subprocess.run(["objdump", "-d", str(tmp_path / "k.so")], capture_output=True, text=True).stdout
    assert "vpdpbusd" in text


def int4_dequantize(packed, scale):
    from edgeq.core.formats.int4_groups import int4_dequantize_groups

    return int4_dequantize_groups(packed, scale)


def test_int4_vnni_order_round_trips_and_indexes():
    """vnni_order / plain_order are inverse, and vnni_byte finds each (input, output)'s nibble where the order put
    it (what ops.int4_code reads on every target)."""
    from edgeq.targets.tvm.int4_vnni import plain_order, vnni_byte, vnni_order

    rng = np.random.default_rng(3)
    plain = rng.integers(0, 256, (2, 48, 64), dtype=np.uint8)             # 2 panels of 64 outputs, 96 inputs
    v = vnni_order(plain)
    np.testing.assert_array_equal(plain_order(v), plain)
    for kk in range(96):
        for n in range(0, 128, 7):
            row, col, shift = vnni_byte(64, kk, n)
            assert (v[n // 64, row, col] >> shift) & 15 == (plain[n // 64, kk // 2, n % 64] >> (4 * (kk % 2))) & 15
    narrow = rng.integers(0, 256, (3, 16, 8), dtype=np.uint8)              # panels of 8: the plain order kept
    np.testing.assert_array_equal(vnni_order(narrow), narrow)
