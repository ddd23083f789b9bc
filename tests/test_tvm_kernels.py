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
