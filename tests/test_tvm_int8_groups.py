"""The TVM int8 preset as llama.cpp's q8_0 x q8_0 (format int8_g32, targets/tvm/int8_vnni.py): the kernel against
numpy's integers of the same scheme on x86 VNNI (`vpdpbusd` in the code), its arm64 build on `sdot`, and a small
decoder's prefill and decode against the reference executor running the same arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgeq.core.formats import get_format                                         # noqa: E402
from edgeq.core.formats.int8_groups import (int8_dequantize_groups, int8_groups_act,  # noqa: E402
                                            int8_quantize_groups)
from edgeq.targets.profiles import get_profile                                     # noqa: E402
from edgeq.targets.tvm.build import resolve_target                                 # noqa: E402
from edgeq.targets.tvm.dot import dot_kind                                         # noqa: E402

HOST_DICT = resolve_target(get_profile("cpu"))
HOST = tvm.target.Target(HOST_DICT)
VNNI = dot_kind(HOST_DICT) == "vnni"


def q8_0_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """q8_0 x q8_0 in float64: the weights' q8_0 codes and block scales by the input's int8 blocks of 32."""
    codes, scale = int8_quantize_groups(w)
    return int8_groups_act(x).astype(np.float64) @ int8_dequantize_groups(codes, scale).astype(np.float64).T


def test_format_is_ggml_q8_0_bytes():
    """int8_g32's stored bytes are ggml's Q8_0 rows (34 bytes per 32 weights) and its codes and scales split them."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 96)).astype(np.float32)
    f = get_format("int8_g32")
    raw = f.quantize_fn(f, w, None)
    assert raw.shape == (8, 3 * 34) and f.bits_per_weight == 8.5
    codes, scale = int8_quantize_groups(w)
    np.testing.assert_array_equal(f.dequantize_fn(f, raw, w.shape), int8_dequantize_groups(codes, scale))
    assert np.abs(int8_dequantize_groups(codes, scale) - w).max() <= np.abs(w).max() / 127 / 2 * 1.01
    assert f.can_carry((8, 64)) and not f.can_carry((8, 48))


def _kernel_args(rows, tile, bias, k_dim=96, n_dim=192, seed=2):
    from edgeq.targets.tvm.int8_vnni import g32_order
    from edgeq.targets.tvm.ops import panels

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_dim, k_dim)).astype(np.float32)
    x = rng.standard_normal((rows, k_dim)).astype(np.float32)
    x[-1] = 0 if rows > 1 else x[-1]
    b = rng.standard_normal(n_dim).astype(np.float32)
    codes, scale = int8_quantize_groups(w)
    arrays = [x, g32_order(panels(codes.T)), panels(scale.T), *([b] if bias else []), np.zeros((rows, n_dim), np.float32)]
    return w, x, (b if bias else 0), arrays


@pytest.mark.parametrize("panel", [64, 16, 1])
def test_g32_order_indexes(panel):
    """g32_byte finds each (input, output)'s code where g32_order put it, for every panel width."""
    from edgeq.targets.tvm.int8_vnni import g32_byte, g32_order
    from edgeq.targets.tvm.ops import panels

    n_dim, k_dim = panel * 3, 64
    codes = np.random.default_rng(1).integers(-127, 128, (n_dim, k_dim), dtype=np.int8)
    st = g32_order(panels(codes.T))
    assert st.shape == (n_dim // panel, k_dim, panel)
    kk, n = np.meshgrid(np.arange(k_dim), np.arange(n_dim), indexing="ij")
    row, col = g32_byte(panel, kk, n)
    np.testing.assert_array_equal(st[n // panel, row, col], codes.T)


@pytest.mark.skipif(not VNNI, reason="host without AVX-512 VNNI")
@pytest.mark.parametrize("rows,tile,bias,task", [(1, 1, True, None), (6, 4, False, None), (3, 1, False, 32)])
def test_vnni_kernel_is_q8_0_scheme(rows, tile, bias, task):
    """Rows that are not whole tiles, an all-zero row among them: numpy's q8_0 x q8_0 to float rounding, measurably
    not the weight-only float product, on `vpdpbusd`; tasks of a whole panel (decode) and of half one."""
    from edgeq.targets.tvm.int8_vnni import int8_g32_kernel

    w, x, b, arrays = _kernel_args(rows, tile, bias)
    func = int8_g32_kernel(96, 192, bias, tile, "vnni", task)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*args)
    got = args[3 + bias].numpy()
    ref = q8_0_matmul(x, w) + b
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    codes, scale = int8_quantize_groups(w)
    weight_only = x.astype(np.float64) @ int8_dequantize_groups(codes, scale).T + b
    assert np.abs(ref - weight_only).max() > 1e-3
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


@pytest.mark.skipif(not VNNI, reason="host without AVX-512 VNNI")
@pytest.mark.parametrize("rows,tile", [(1, 1), (5, 4)])
def test_fused_kernels_are_the_single_kernel(rows, tile):
    """The fused q/k/v call's columns are the single-weight kernel's outputs exactly (the same sums in the same
    order), and the gate/up call gives silu(gate) * up of them."""
    from edgeq.targets.tvm.int8_vnni import int8_g32_fused_kernel, int8_g32_kernel

    dev = tvm.cpu()

    def run(func, arrays, out_shape):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
        args = [tvm.runtime.tensor(a, dev) for a in [*arrays, np.zeros(out_shape, np.float32)]]
        lib["main"](*args)
        return args[-1].numpy()

    weights = [_kernel_args(rows, tile, False, n_dim=n, seed=i) for i, n in enumerate((192, 64, 64))]
    x = weights[0][1]
    stored = [a[1:3] for _, _, _, a in weights]
    single = [run(int8_g32_kernel(96, n, False, tile), [x, *st], (rows, n)) for n, st in zip((192, 64, 64), stored)]
    qkv = run(int8_g32_fused_kernel(96, (192, 64, 64), tile), [x, *stored[0], *stored[1], *stored[2]], (rows, 320))
    np.testing.assert_array_equal(qkv, np.concatenate(single, axis=1))
    up = _kernel_args(rows, tile, False, n_dim=192, seed=7)[3][1:3]
    u = run(int8_g32_kernel(96, 192, False, tile), [x, *up], (rows, 192))
    act = run(int8_g32_fused_kernel(96, (192, 192), tile, swiglu=True), [x, *stored[0], *up], (rows, 192))
    g = single[0]
    np.testing.assert_allclose(act, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


def test_arm64_kernel_is_on_sdot():
    """The same kernel built for linux-arm64 (armv8.2-a+dotprod): `sdot`, 8 per 32 outputs and step of 4 inputs
    (no timing here)."""
    from edgeq.targets.tvm.int8_vnni import int8_g32_kernel

    arm = resolve_target(get_profile("linux-arm64"))
    assert dot_kind(arm) == "sdot"
    func = int8_g32_kernel(96, 192, True, 1, "sdot")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target(arm))
    asm = lib.mod.inspect_source("asm")
    assert asm.count("sdot") >= 16, asm.count("sdot")


def _linear_edit(w: np.ndarray, b: np.ndarray | None):
    """An executor edit: the layer as q8_0 x q8_0 (plus its bias)."""
    return lambda x, y: (q8_0_matmul(x.reshape(-1, x.shape[-1]), w).reshape(y.shape)
                         + (0 if b is None else b)).astype(np.float32)


@pytest.mark.parametrize("dot", ["vnni", "generic"])
def test_decoder_int8_preset_is_q8_0_scheme(dot):
    """A small Llama under the int8 preset (every linear and the tied table int8_g32): prefill and one-token decode
    against the reference executor running q8_0 x q8_0 (VNNI) or q8_0's weights with f32 activations (targets
    without integer dot products)."""
    if dot == "vnni" and not VNNI:
        pytest.skip("host without AVX-512 VNNI")
    from edgeq.core.executor import Executor
    from edgeq.core.plan import Plan
    from edgeq.models import llama, names
    from edgeq.models.recipes.synthetic import random_llama, tiny_config
    from edgeq.targets.tvm.lower import lower_tvm
    from edgeq.targets.tvm.presets import preset_formats
    from test_tvm_dot import prefill_then_decode

    # every width whole 64-output panels (narrower ones stay on ops.py's float kernels)
    graph = random_llama(tiny_config(vocab_size=320, hidden_size=128, intermediate_size=192, n_layers=2, head_dim=16,
                                     context_length=128, n_heads=8, n_kv_heads=4, tied_embeddings=True,
                                     attention_bias=True), seed=5, scale=0.08)
    tensors = preset_formats(graph, "int8")
    linears = [n for n, t in graph.weights.items() if len(t.shape) == 2]
    assert {tensors[n].format for n in linears} == {"int8_g32"} and names.EMBED in linears
    lowered = lower_tvm(graph, Plan(tensors=tensors), dot=dot)
    kernels = {gv.name_hint for gv in lowered.mod.functions if "_vnni_linear_" in gv.name_hint}
    assert (len(kernels) >= 8) if dot == "vnni" else not kernels
    cfg = graph.config
    ids = np.arange(5, 26)
    got = prefill_then_decode(lowered, cfg, ids)

    arrays = {n: t.numpy() for n, t in graph.weights.items()}
    stored = {**arrays, **{n: int8_dequantize_groups(*int8_quantize_groups(arrays[n])) for n in linears}}
    deq = llama.graph_from_arrays(cfg, stored)
    edits = {n: _linear_edit(arrays[n], arrays.get(n.removesuffix(".weight") + ".bias")) for n in linears}
    ref = Executor(deq, edits=edits if dot == "vnni" else {}).logits(ids)
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(got - ref).max() <= 2e-4 * scale
    other = Executor(deq, edits={} if dot == "vnni" else edits).logits(ids)
    assert np.abs(other - ref).max() > 10 * np.abs(got - ref).max()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from edgeq.models.recipes.synthetic import write_bert_folder

    return write_bert_folder(tmp_path_factory.mktemp("tinybert-q8") / "tiny-bert")


def test_encoder_int8_preset_is_q8_0_scheme(tiny_bert, tmp_path):
    """An encoder exported with the int8 preset against the reference executor: every linear q8_0 x q8_0 on a VNNI
    host (`vpdpbusd` in the library), q8_0's weights with f32 activations elsewhere; the word table int8 rows."""
    import json
    import subprocess

    from edgeq.api import ExportOptions, export
    from edgeq.core.executor import Executor
    from edgeq.core.formats.int8 import int8_dequantized_rows
    from edgeq.evaluate.encoder import cosines
    from edgeq.importers.hf_bert import import_hf_folder
    from edgeq.models import names
    from test_tvm_dot import encoder_outputs

    out = tmp_path / "b"
    export(ExportOptions(model=str(tiny_bert), backend="tvm", quant="int8", out=str(out)))
    tensors = json.loads((out / "manifest.json").read_text())["plan"]["tensors"]
    g32 = [n for n, t in tensors.items() if t["format"] == "int8_g32"]
    assert len(g32) >= 6 and tensors[names.WORD_EMBED]["format"] == "int8_wo"
    graph = import_hf_folder(tiny_bert)
    weights = {n: graph.weights[n].numpy() for n in g32}
    ex = Executor(graph, edits={n: _linear_edit(w, graph.weights[n.removesuffix(".weight") + ".bias"].numpy())
                                for n, w in weights.items()} if VNNI else {})
    ex._weights.update({n: int8_dequantize_groups(*int8_quantize_groups(w)) for n, w in weights.items()})
    ex._weights[names.WORD_EMBED] = int8_dequantized_rows(graph.weights[names.WORD_EMBED].numpy())
    ref, flt, got = encoder_outputs(graph, ex, out)
    np.testing.assert_allclose(got, ref, atol=2e-4)
    assert cosines(flt, got).min() >= 0.99
    if VNNI:
        text = subprocess.run(["objdump", "-d", str(out / "model.so")], capture_output=True, text=True).stdout
        assert "vpdpbusd" in text
