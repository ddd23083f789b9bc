"""The fused CPU attention kernel (targets/tvm/attention.py) against numpy's softmax attention: sequence lengths that
are not whole key vectors or query blocks, padded sentences in a batch (masked keys weigh nothing), and the fused
q/k/v layout (one tensor read at three offsets)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from edgeq.targets.tvm.attention import emit_fused_attention
from edgeq.targets.tvm.build import compile_module
from edgeq.targets.tvm.ops import sym

HEADS, DIM = 3, 8
H = HEADS * DIM


def _reference(q, k, v, bias):
    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], HEADS, DIM).transpose(0, 2, 1, 3).astype(np.float64)

    s = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(DIM) + bias[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ heads(v)).transpose(0, 2, 1, 3).reshape(q.shape)


@pytest.fixture(scope="module", params=[False, True], ids=["three", "qkv"])
def vm(request):
    qkv = request.param
    b, s = sym("batch"), sym("seq")
    width = 3 * H if qkv else H
    bb = relax.BlockBuilder()
    xs = [relax.Var(n, relax.TensorType((b, s, width), "float32")) for n in ("q", "k", "v")[:1 if qkv else 3]]
    bias = relax.Var("bias", relax.TensorType((b, s), "float32"))
    with bb.function("main"):
        with bb.dataflow():
            args = xs * 3 if qkv else xs
            out = bb.emit_output(emit_fused_attention(bb, *args, bias, HEADS, DIM, b, s, qkv=qkv))
        bb.emit_func_output(out, params=[*xs, bias])
    ex = compile_module(bb.get(), {"kind": "llvm"})
    return qkv, relax.VirtualMachine(ex, tvm.cpu())


@pytest.mark.parametrize("seq", [1, 7, 17, 40])
def test_fused_attention_matches_softmax_attention(vm, seq):
    qkv, machine = vm
    rng = np.random.default_rng(seq)
    q, k, v = (rng.standard_normal((2, seq, H)).astype(np.float32) * 2 for _ in range(3))
    bias = np.zeros((2, seq), np.float32)
    bias[1, seq // 2 + 1:] = -1e9                      # the second sentence padded
    inputs = [np.concatenate([q, k, v], axis=-1)] if qkv else [q, k, v]
    got = machine["main"](*(tvm.runtime.tensor(x) for x in (*inputs, bias))).numpy()
    assert got.shape == (2, seq, H)
    np.testing.assert_allclose(got, _reference(q, k, v, bias), atol=2e-5, rtol=0)
    if seq > 2:    # padded keys change nothing: the padded sentence alone, unpadded, gives the same rows
        n = seq // 2 + 1
        alone = [x[1:, :n] for x in inputs]
        one = machine["main"](*(tvm.runtime.tensor(np.ascontiguousarray(x)) for x in (*alone, bias[1:, :n]))).numpy()
        np.testing.assert_allclose(got[1, :n], one[0], atol=1e-6, rtol=0)
