"""TVM's integer linears (int8_dyn_rows, `--quant int8-dyn`): each kernel's output against the integer scheme in
numpy (formats.int8.int8_dyn_rows_matmul), a whole exported encoder against the reference executor running the
same scheme, and the dot-product instructions in the built libraries (x86 `vpdpbusd`, arm64 `sdot`), checked by
disassembly."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgeq.core.executor import Executor                          # noqa: E402
from edgeq.core.formats.int8 import int8_dequantized_rows, int8_dyn_rows_matmul  # noqa: E402
from edgeq.evaluate.encoder import cosines                         # noqa: E402
from edgeq.importers.hf_bert import import_hf_folder               # noqa: E402
from edgeq.api import ExportOptions, export                        # noqa: E402
from edgeq.models import names                                     # noqa: E402
from edgeq.targets.profiles import get_profile                     # noqa: E402
from edgeq.targets.tvm.build import resolve_target                 # noqa: E402
from edgeq.targets.tvm.dot import dot_kind                         # noqa: E402

HOST = resolve_target(get_profile("cpu"))


def _kernel(rows, k_dim: int, n_dim: int, kind: str, bias: bool):
    """One int8_dyn_rows linear, scheduled as a build schedules it, compiled for this host."""
    from tvm import te

    from edgeq.targets.tvm.ops import _linear_te
    from edgeq.targets.tvm.schedule import schedule_linear

    x = te.placeholder((rows, k_dim), "float32", name="x")
    w = te.placeholder((n_dim // 16, k_dim // 4, 16, 4), "int8", name="w")
    s = te.placeholder((n_dim,), "float32", name="s")
    ws = te.placeholder((n_dim,), "int32", name="ws")
    b = te.placeholder((n_dim,), "float32", name="b") if bias else None
    y = _linear_te(x, "int8_dyn_rows", [w, s, ws], b, kind)
    f = schedule_linear(te.create_prim_func([x, w, s, ws, *([b] if bias else []), y]))
    return tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(HOST))


def encoder_outputs(graph, ex: Executor, bundle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three sentences' embeddings: the executor `ex` (edited), the float reference, and the TVM bundle."""
    from edgeq import runtime
    from edgeq.importers.hf_bert import encoder_tokenizer

    tok = encoder_tokenizer(graph)
    ids = [tok.encode(t).ids for t in ("The capital of France is Paris.", "ok", "a function returns a value")]
    with runtime.load(bundle) as s:
        got = np.stack([s.embed_ids([i])[0] for i in ids])
    return np.stack([ex.embed(i) for i in ids]), np.stack([Executor(graph).embed(i) for i in ids]), got


@pytest.mark.parametrize("kind,rows,bias", [("host", 1, False), ("host", 24, True), ("generic", 6, True)])
def test_kernel_is_the_integer_scheme(kind, rows, bias):
    """The library's integers are the reference's: the outputs agree to the float rounding of the rescale."""
    from edgeq.core.plan import TensorPlan
    from edgeq.targets.tvm.ops import weight_arrays

    kind = dot_kind(HOST) if kind == "host" else kind
    rng = np.random.default_rng(0)
    k_dim, n_dim = 96, 48
    x = rng.standard_normal((rows, k_dim)).astype(np.float32)
    if rows > 1:
        x[-1] = 0.0                                                # an all-zero row: scale 1, the bias alone
    w = rng.standard_normal((n_dim, k_dim)).astype(np.float32)
    bvec = rng.standard_normal(n_dim).astype(np.float32)
    stored = [a for _, a in weight_arrays("w", w, TensorPlan(format="int8_dyn_rows"))]
    lib = _kernel(rows, k_dim, n_dim, kind, bias)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((rows, n_dim), np.float32), dev)
    lib(*(tvm.runtime.tensor(a, dev) for a in [x, *stored, *([bvec] if bias else [])]), out)
    ref = int8_dyn_rows_matmul(x, w) + (bvec if bias else 0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-5)
    assert np.abs(ref - x @ w.T - (bvec if bias else 0)).max() > 1e-3    # not the float product


def _count(lib_path, objdump: str, mnemonic: str) -> int:
    text = subprocess.run([objdump, "-d", str(lib_path)], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in text.splitlines() if f"\t{mnemonic}" in line or f" {mnemonic} " in line)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgeq.models.recipes.synthetic import write_bert_folder

    return write_bert_folder(tmp_path_factory.mktemp("tinybert-dot") / "tiny-bert")


def test_encoder_matches_reference_integer_scheme(tiny, tmp_path):
    """The exported library against the reference executor running the same integers: every linear per-row
    quantized (edits), the word table's int8 rows dequantized."""
    out = tmp_path / "b"
    export(ExportOptions(model=str(tiny), backend="tvm", quant="int8-dyn", out=str(out)))
    m = json.loads((out / "manifest.json").read_text())
    tensors = m["plan"]["tensors"]
    dyn = [n for n, t in tensors.items() if t["format"] == "int8_dyn_rows"]
    assert len(dyn) >= 6 and tensors[names.WORD_EMBED]["format"] == "int8_wo"
    graph = import_hf_folder(tiny)
    edits = {}
    for n in dyn:
        w, b = graph.weights[n].numpy(), graph.weights[n.removesuffix(".weight") + ".bias"].numpy()
        edits[n] = lambda x, y, w=w, b=b: int8_dyn_rows_matmul(x, w) + b
    ex = Executor(graph, edits=edits)
    ex._weights[names.WORD_EMBED] = int8_dequantized_rows(graph.weights[names.WORD_EMBED].numpy())
    ref, flt, got = encoder_outputs(graph, ex, out)
    np.testing.assert_allclose(got, ref, atol=2e-4)
    assert cosines(flt, got).min() >= 0.99
    assert np.abs(got - flt).max() > 10 * np.abs(got - ref).max()        # closer to its scheme than to float
    if m["tvm"].get("int8_kernels") == "amx":
        assert _count(out / "model.so", "objdump", "tdpbssd") > 0
    elif dot_kind(HOST) == "vnni":
        assert _count(out / "model.so", "objdump", "vpdpbusd") > 0


@pytest.mark.parametrize("batch,seq,k_dim,n_dim,gelu", [(1, 5, 64, 96, False), (2, 37, 128, 128, True)])
def test_amx_kernel_is_the_integer_scheme(batch, seq, k_dim, n_dim, gelu):
    """The AMX linear (amx.py) on rows that are not whole 32-row blocks, with an all-zero row: the reference's
    integers, rescaled (GELU as fast_erf: within float32 rounding of erf)."""
    from scipy.special import erf

    from edgeq.core.plan import TensorPlan
    from edgeq.runtime.tvm_backend import request_amx
    from edgeq.targets.tvm.amx import OUTS, ROWS, amx_linear_kernel, amx_target, split
    from edgeq.targets.tvm.ops import weight_arrays

    target = amx_target(HOST, host=True)
    if target is None or not request_amx():
        pytest.skip("no AMX int8 on this host (or the OS does not grant the tile state)")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, seq, k_dim)).astype(np.float32)
    x[-1, -1] = 0.0
    w = rng.standard_normal((n_dim, k_dim)).astype(np.float32)
    bvec = rng.standard_normal(n_dim).astype(np.float32)
    blocks, scale, _ = (a for _, a in weight_arrays("w", w, TensorPlan(format="int8_dyn_rows")))
    f = amx_linear_kernel(k_dim, n_dim, gelu).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(target))
    tasks = -(-batch * seq // ROWS) * split(n_dim)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, blocks, scale, bvec, np.zeros((batch, seq, n_dim), np.float32),
                                                 np.zeros((tasks * ROWS, k_dim), np.int8),
                                                 np.zeros(tasks * ROWS, np.float32),
                                                 np.zeros((tasks, ROWS * OUTS), np.int32))]
    lib["main"](*args)
    ref = int8_dyn_rows_matmul(x.reshape(-1, k_dim), w).reshape(batch, seq, n_dim) + bvec
    ref = ref * 0.5 * (1 + erf(ref / np.sqrt(2))) if gelu else ref
    np.testing.assert_allclose(args[4].numpy(), ref, rtol=1e-5, atol=2e-5)
    assert "tdpbssd" in lib.mod.inspect_source("asm")


def test_linux_arm64_build_has_sdot(tiny, tmp_path):
    """linux-arm64 (armv8.2-a+dotprod): the int8-dyn library's linears run on `sdot`, and so do the int8 preset's
    (q8_0 x q8_0, targets/tvm/int8_vnni.py)."""
    if not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("aarch64-linux-gnu-objdump")):
        pytest.skip("no aarch64 cross toolchain (g++-aarch64-linux-gnu, binutils-aarch64-linux-gnu)")
    assert "+dotprod" in resolve_target(get_profile("linux-arm64"))["mattr"]
    counts = {}
    for quant in ("int8-dyn", "int8"):
        export(ExportOptions(model=str(tiny), backend="tvm", quant=quant, target="linux-arm64",
                             out=str(tmp_path / quant)))
        counts[quant] = _count(tmp_path / quant / "model.so", "aarch64-linux-gnu-objdump", "sdot")
    assert counts["int8-dyn"] >= 16 and counts["int8"] >= 16, counts


def prefill_then_decode(lowered, cfg, ids: np.ndarray) -> np.ndarray:
    """A lowered decoder built for this host: logits of prefill(ids[:-1]) from empty caches, then of decode(ids[-1])."""
    from tvm.runtime.vm import VirtualMachine

    from edgeq.targets.tvm.build import compile_module

    dev = tvm.cpu(0)
    vm = VirtualMachine(compile_module(lowered.mod, HOST), dev)
    params = [tvm.runtime.tensor(a, dev) for a in lowered.params.values()]
    past = [tvm.runtime.tensor(np.zeros((cfg.n_kv_heads, 32, cfg.head_dim), np.float32), dev)
            for _ in range(2 * cfg.n_layers)]       # caches of 32 rows, written in place
    out = list(vm["prefill"](tvm.runtime.tensor(ids[:-1].astype(np.int32), dev), tvm.runtime.ShapeTuple([0]), *past,
                             *params))
    step = list(vm["decode"](tvm.runtime.tensor(ids[-1:].astype(np.int32), dev), tvm.runtime.ShapeTuple([len(ids) - 1]),
                             *out[1:], *params))
    return np.concatenate([out[0].numpy(), step[0].numpy()])


def test_decoder_prefill_and_decode_match_reference_integer_scheme():
    """A small Llama with every linear int8_dyn_rows (the tied head on the int8_wo table): prefill and one-token
    decode (static one-row kernels) against the reference executor running the same integers."""
    from edgeq.core.plan import Plan, TensorPlan
    from edgeq.models import llama
    from edgeq.models.recipes.synthetic import random_llama, tiny_config
    from edgeq.targets.tvm.lower import lower_tvm

    graph = random_llama(tiny_config(vocab_size=320, hidden_size=64, intermediate_size=96, n_layers=2, head_dim=16,
                                     context_length=128, n_heads=4, n_kv_heads=2, tied_embeddings=True,
                                     attention_bias=True), seed=4, scale=0.08)
    tensors = {n: TensorPlan(format="int8_dyn_rows" if len(t.shape) == 2 else "f32") for n, t in graph.weights.items()}
    tensors[names.EMBED] = TensorPlan(format="int8_wo")
    lowered = lower_tvm(graph, Plan(tensors=tensors), dot=dot_kind(HOST))
    cfg = graph.config
    ids = np.arange(5, 26)
    got = prefill_then_decode(lowered, cfg, ids)

    arrays = {n: t.numpy() for n, t in graph.weights.items()}
    arrays[names.EMBED] = int8_dequantized_rows(arrays[names.EMBED])
    deq = llama.graph_from_arrays(cfg, arrays)
    edits = {}
    for n, t in graph.weights.items():
        if len(t.shape) == 2 and n != names.EMBED:
            b = arrays.get(n.removesuffix(".weight") + ".bias")
            edits[n] = lambda x, y, w=arrays[n], b=b: int8_dyn_rows_matmul(x, w) + (0 if b is None else b)
    ref = Executor(deq, edits=edits).logits(ids)
    flt = Executor(deq).logits(ids)
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(got - ref).max() <= 2e-4 * scale
    assert np.abs(flt - ref).max() > 10 * np.abs(got - ref).max()


@pytest.mark.skipif(dot_kind(HOST) != "vnni", reason="host without AVX-512 VNNI")
@pytest.mark.parametrize(("fmt", "bias"), [("int4_g32", True), ("int4_g32", False), ("int8_wo", True)])
def test_decoder_int4_int8_on_vnni_match_group_scheme(fmt, bias):
    """A small Llama with every linear int4_g32 or int8_wo and the tied head on the int8_wo table, on a VNNI host:
    prefill and one-token decode run int4 linears and the head on int4_vnni.py / int8_vnni.py (activations in int8
    groups of 32, as llama.cpp's q4_0 / q8_0 dot products; an int8 model keeps f32 activations), against the
    reference executor running the same arithmetic (tests/test_tvm_kernels.py's numpy scheme), and measurably not
    the weight-only float product."""
    from edgeq.core.formats.int4_groups import int4_dequantize_groups, int4_quantize_groups
    from edgeq.core.formats.int8 import int8_quantize_rows
    from edgeq.core.plan import Plan, TensorPlan
    from edgeq.models import llama
    from edgeq.models.recipes.synthetic import random_llama, tiny_config
    from edgeq.targets.tvm.lower import lower_tvm
    from test_tvm_kernels import int4_groups_matmul, int8_groups_matmul

    # every output width whole 64-output panels (narrower ones stay on ops.py's float kernels)
    graph = random_llama(tiny_config(vocab_size=320, hidden_size=128, intermediate_size=192, n_layers=2, head_dim=16,
                                     context_length=128, n_heads=8, n_kv_heads=4, tied_embeddings=True,
                                     attention_bias=bias), seed=5, scale=0.08)
    tensors = {n: TensorPlan(format=fmt if len(t.shape) == 2 else "f32") for n, t in graph.weights.items()}
    tensors[names.EMBED] = TensorPlan(format="int8_wo")
    lowered = lower_tvm(graph, Plan(tensors=tensors), dot="vnni")
    kernels = {gv.name_hint.split("_linear_")[0] for gv in lowered.mod.functions if "_vnni_linear_" in gv.name_hint}
    assert kernels == ({"edgeq_int4_vnni", "edgeq_int8_vnni"} if fmt == "int4_g32" else set())
    # without biases q, k and v run as one call, gate and up as one call writing silu(gate) * up (decoder.py)
    fused = {gv.name_hint.rstrip("0123456789") for gv in lowered.mod.functions if "_vnni_linear_" in gv.name_hint}
    assert ("edgeq_int4_vnni_linear_qkv" in fused) == (fmt == "int4_g32" and not bias)
    assert ("edgeq_int4_vnni_linear_gate_up" in fused) == (fmt == "int4_g32")
    cfg = graph.config
    ids = np.arange(5, 26)
    got = prefill_then_decode(lowered, cfg, ids)

    arrays = {n: t.numpy() for n, t in graph.weights.items()}
    arrays[names.EMBED] = int8_dequantized_rows(arrays[names.EMBED])
    layers = [n for n, t in graph.weights.items() if len(t.shape) == 2 and n != names.EMBED]
    # the same stored weights with float activations (the weight-only product)
    stored = {**arrays, **{n: int8_dequantized_rows(arrays[n]) if fmt == "int8_wo" else int4_dequantize_groups(
        *int4_quantize_groups(arrays[n])) for n in layers}}
    deq = llama.graph_from_arrays(cfg, stored)
    edits = {}
    for n, t in graph.weights.items():
        if len(t.shape) != 2 or fmt == "int8_wo":        # int8 linears and their head keep f32 activations
            continue
        w = t.numpy()
        b = arrays.get(n.removesuffix(".weight") + ".bias")
        if n == names.EMBED or fmt == "int8_wo":
            q, s = int8_quantize_rows(w)
            f = lambda x, q=q, s=s: int8_groups_matmul(x, q, s)                    # noqa: E731
        else:
            packed, scale = int4_quantize_groups(w)
            f = lambda x, p=packed, s=scale: int4_groups_matmul(x, p, s)           # noqa: E731
        edits[n] = lambda x, y, f=f, b=b: (f(x.reshape(-1, x.shape[-1])).reshape(y.shape)
                                           + (0 if b is None else b)).astype(np.float32)
    ref = Executor(deq, edits=edits).logits(ids)
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(got - ref).max() <= 2e-4 * scale
    if fmt == "int4_g32":
        flt = Executor(deq).logits(ids)
        assert np.abs(flt - ref).max() > 10 * np.abs(got - ref).max()
