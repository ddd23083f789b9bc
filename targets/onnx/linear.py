"""One linear layer (y = x·Wᵀ + b) in the ONNX form its plan format asks for.

- f32 / f16: a float MatMul (f16 weights are stored half size and cast once at load).
- int8 (static, the whitepaper's scheme): weights symmetric per output channel
  (int8, zero point 0, f32 scale per row), the input activation per tensor with a
  calibrated range (uint8 with zero point: the u8s8 kernels, VNNI's vpdpbusd on
  x86), written as QuantizeLinear + com.microsoft MatMulIntegerToFloat with the
  bias inside: the fused integer kernel onnxruntime runs anyway, with the bias
  add it does not fuse from a QDQ pair (measured: one float Add per linear less).
- int8_dyn: the same weights; the activation range is computed per call
  (DynamicQuantizeLinear + MatMulInteger, which onnxruntime fuses into
  DynamicQuantizeMatMul).
- int4[_asym][_bNN], int8_b32: weight-only block formats (edgeq/core/formats/blockq.py) in
  com.microsoft MatMulNBits; embedding tables in GatherBlockQuantized.
The bias, the residual adds, the norms and softmax stay float. A low-rank
error branch (passes/lowrank_compensate.py) adds (x·Aᵀ)·Bᵀ to any of these:
two more MatMuls over f16 factors, the values the allocator costed.

A table used twice (a tied embedding and LM head) is stored once: the second
use reads the first one's initializers.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import blockq
from edgeq.core.formats.int8 import activation_qparams, int8_quantize_rows
from edgeq.core.formats.nbits import NBITS
from edgeq.core.plan import TensorPlan
from edgeq.targets.onnx.builder import F32, MS_DOMAIN, Builder


def weight_initializer(b: Builder, name: str, w: np.ndarray, fmt: str) -> str:
    """A float weight in (in, out) layout as an f32 value: f32 directly, f16 through a Cast."""
    wt = np.ascontiguousarray(w.T)
    if fmt == "f32":
        return b.initializer(name, wt.astype(np.float32))
    if fmt == "f16":
        half = b.initializer(name, wt.astype(np.float16))
        return b.op("Cast", [half], hint="w_f32", to=TensorProto.FLOAT)
    raise EdgeqError(None, f"format {fmt} is not a float format ({name})")


def nbits_initializers(b: Builder, name: str, w: np.ndarray, fmt: str) -> tuple[str, str, str | None]:
    """(codes (rows, blocks, bytes), scales (rows, blocks), zero points or None), written once per tensor."""
    key = ("nbits", name)
    if key not in b.memo:
        bits, block, asym = NBITS[fmt]
        q = blockq.quantize(w, bits, block, asym, b.imatrix.get(name))
        b.memo[key] = (b.initializer(name, q.data), b.initializer(name + "_scale", q.scales),
                       None if q.zero_points is None else b.initializer(name + "_zero_point", q.zero_points))
    return b.memo[key]


def _shared_table(b: Builder, name: str) -> str | None:
    """The f32 (rows, cols) value of a table another node already emitted (tied embedding), if any."""
    t = b.memo.get(("table", name))
    return t() if callable(t) else t


def emit_branch(b: Builder, x: str, y: str, name: str, a: np.ndarray, bm: np.ndarray, hint: str = "y") -> str:
    """y + (x·Aᵀ)·Bᵀ with A (r, in) and B (out, r) stored float16 (cast to f32 once at load, like f16 weights)."""
    at = b.initializer(name + "_lowrank_a", np.ascontiguousarray(np.asarray(a, np.float16).T))     # (in, r)
    bt = b.initializer(name + "_lowrank_b", np.ascontiguousarray(np.asarray(bm, np.float16).T))    # (r, out)
    at, bt = (b.op("Cast", [v], hint="lowrank_f32", to=TensorProto.FLOAT) for v in (at, bt))
    xa = b.op("MatMul", [x, at], hint="lowrank_xa")
    return b.op("Add", [y, b.op("MatMul", [xa, bt], hint="lowrank")], hint=hint)


def lora_input_names(weight: str) -> tuple[str, str]:
    """The graph inputs (and adapter-file parameters) that carry a user's LoRA factors for one weight."""
    return f"{weight}.lora_A", f"{weight}.lora_B"


def emit_lora_slot(b: Builder, x: str, y: str, name: str, shape: tuple[int, ...]) -> str:
    """y + (x·A)·B with A (in, r) and B (r, out) overridable initializers of rank 0 by default (the base model):
    a LoRA adapter (or several, concatenated along r) is fed at run time over the unchanged base weights."""
    out_f, in_f = shape
    a_name, b_name = lora_input_names(name)
    rank = f"{name}.lora_rank"
    a = b.overridable(a_name, F32, [in_f, rank], np.zeros((in_f, 0), np.float32))
    bm = b.overridable(b_name, F32, [rank, out_f], np.zeros((0, out_f), np.float32))
    xa = b.op("MatMul", [x, a], hint="lora_xa")
    return b.op("Add", [y, b.op("MatMul", [xa, bm], hint="lora")], hint="y_lora")


def emit_linear(b: Builder, x: str, name: str, w: np.ndarray, bias: np.ndarray | None, d: TensorPlan,
                hint: str = "y", branch: tuple[np.ndarray, np.ndarray] | None = None) -> str:
    """`branch`: (A, B) of a low-rank error branch on this weight, or None."""
    fmt = d.format
    shared = _shared_table(b, name) if fmt not in NBITS else None
    if shared is not None:   # a tied head: y = x · tableᵀ from the embedding's (dequantized) table
        y = b.op("MatMul", [x, b.op("Transpose", [shared], hint="table_t", perm=[1, 0])], hint=hint)
    elif fmt in NBITS:
        bits, block, _ = NBITS[fmt]
        data, scale, zp = nbits_initializers(b, name, w, fmt)
        y = b.op("MatMulNBits", [x, data, scale] + ([zp] if zp else []), hint=hint, domain=MS_DOMAIN,
                 K=int(w.shape[1]), N=int(w.shape[0]), bits=bits, block_size=block,
                 accuracy_level=int(b.nbits_accuracy_level))
    elif fmt in ("f32", "f16"):
        y = b.op("MatMul", [x, weight_initializer(b, name, w, fmt)], hint=hint)
    elif fmt in ("int8", "int8_dyn"):
        wq, ws = int8_weight_initializers(b, name, w)
        if fmt == "int8" and b.int8_as_qdq:
            xq, xs, xzp = quantized_input(b, x, name, d)
            xd = b.op("DequantizeLinear", [xq, xs, xzp], hint="xdq")
            y = b.op("MatMul", [xd, b.op("DequantizeLinear", [wq, ws], hint="wdq", axis=1)], hint=hint)
        elif fmt == "int8":
            xq, xs, xzp = quantized_input(b, x, name, d)
            bias_in = bias_initializer(b, name, bias)
            y = b.op("MatMulIntegerToFloat", [xq, wq, xs, ws, xzp] + (["", bias_in] if bias_in else []), hint=hint,
                     domain=MS_DOMAIN)
            bias = None                                                     # added inside the kernel
        else:
            xq, xs, xzp = b.op("DynamicQuantizeLinear", [x], n_out=3, hint="xq")
            acc = b.op("MatMulInteger", [xq, wq, xzp], hint="acc")          # weight zero point 0 by default
            accf = b.op("Cast", [acc], hint="accf", to=TensorProto.FLOAT)
            s = b.op("Mul", [xs, ws], hint="s")
            y = b.op("Mul", [accf, s], hint=hint)
    else:
        raise EdgeqError(None, f"format {fmt} (for {name}) is not carried by the ONNX target")
    if branch is not None:
        y = emit_branch(b, x, y, name, *branch, hint=hint)
    if bias is not None:
        y = b.op("Add", [y, bias_initializer(b, name, bias)], hint=hint)
    return y


def int8_weight_initializers(b: Builder, name: str, w: np.ndarray) -> tuple[str, str]:
    """(int8 weight in (in, out) layout, f32 scale per output column): zero point 0, per-channel on the N axis, the
    layout onnxruntime's integer kernels prepack."""
    q, scale = int8_quantize_rows(w)
    return b.initializer(name, np.ascontiguousarray(q.T)), b.initializer(name + "_scale", scale)


def bias_initializer(b: Builder, weight: str, bias: np.ndarray | None) -> str:
    """The f32 bias of a linear layer, named for its weight; "" (an absent optional input) when there is none."""
    if bias is None:
        return ""
    return b.initializer(weight.removesuffix(".weight") + ".bias", np.asarray(bias, np.float32))


def quantized_input(b: Builder, x: str, name: str, d: TensorPlan) -> tuple[str, str, str]:
    """(uint8 x, scale, zero point) for a static int8 layer: QuantizeLinear with the plan's calibrated range.

    Layers that read one activation with one range (q, k, v) share one QuantizeLinear."""
    if d.act_range is None:
        raise EdgeqError(None, f"{name}: static int8 needs a calibrated act_range (run calibration)")
    xs, xzp = activation_qparams(*d.act_range)
    key = (x, float(xs), int(xzp))
    if key not in b.memo:
        s_name = b.initializer(name + "_input_scale", np.array(xs, np.float32))
        z_name = b.initializer(name + "_input_zero_point", np.array(xzp, np.uint8))
        b.memo[key] = (b.op("QuantizeLinear", [x, s_name, z_name], hint="xq"), s_name, z_name)
    return b.memo[key]


def emit_embedding(b: Builder, ids: str, name: str, table: np.ndarray, d: TensorPlan) -> str:
    """Gather rows; an INT8 table gathers int8 rows and their per-row scales and multiplies (exact dequant);
    a block format gathers with GatherBlockQuantized from the codes a tied head's MatMulNBits also reads."""
    if d.format in ("f32", "f16"):
        if d.format == "f32":
            t = b.initializer(name, table.astype(np.float32))
        else:
            t = b.op("Cast", [b.initializer(name, table.astype(np.float16))], hint="table_f32", to=TensorProto.FLOAT)
        b.memo[("table", name)] = t
        return b.op("Gather", [t, ids], hint="emb", axis=0)
    if d.format in NBITS:
        bits, block, _ = NBITS[d.format]
        data, scale, zp = nbits_initializers(b, name, table, d.format)
        rows = b.op("Reshape", [data, b.const([table.shape[0], table.shape[1] * bits // 8], np.int64)],
                    hint="table_codes")
        return b.op("GatherBlockQuantized", [rows, ids, scale] + ([zp] if zp else []), hint="emb", domain=MS_DOMAIN,
                    gather_axis=0, quantize_axis=1, block_size=block, bits=bits)
    if d.format in ("int8", "int8_dyn"):
        q, scale = int8_quantize_rows(table)
        qn, sn = b.initializer(name, q), b.initializer(name + "_scale", scale)
        b.memo[("table", name)] = lambda: b.op("DequantizeLinear", [qn, sn], hint="table_f32", axis=0)
        rows = b.op("Gather", [qn, ids], hint="emb_q", axis=0)
        rows_f = b.op("Cast", [rows], hint="emb_qf", to=TensorProto.FLOAT)
        s = b.op("Gather", [sn, ids], hint="emb_s", axis=0)
        s = b.op("Unsqueeze", [s, b.const([-1], np.int64)], hint="emb_s")
        return b.op("Mul", [rows_f, s], hint="emb")
    raise EdgeqError(None, f"format {d.format} (for {name}) cannot carry an embedding table on ONNX")


def emit_table_prefix(b: Builder, n_rows: str, name: str, table: np.ndarray, d: TensorPlan) -> str:
    """The first n rows of a table (positions 0..n-1) as a Slice, in the planned format."""
    zero, axis0 = b.const([0], np.int64), b.const([0], np.int64)
    if d.format in ("f32", "f16"):
        if d.format == "f32":
            t = b.initializer(name, table.astype(np.float32))
        else:
            t = b.op("Cast", [b.initializer(name, table.astype(np.float16))], hint="table_f32", to=TensorProto.FLOAT)
        return b.op("Slice", [t, zero, n_rows, axis0], hint="rows")
    if d.format in ("int8", "int8_dyn"):
        q, scale = int8_quantize_rows(table)
        rows = b.op("Slice", [b.initializer(name, q), zero, n_rows, axis0], hint="rows_q")
        s = b.op("Slice", [b.initializer(name + "_scale", scale[:, None]), zero, n_rows, axis0], hint="rows_s")
        return b.op("Mul", [b.op("Cast", [rows], hint="rows_qf", to=TensorProto.FLOAT), s], hint="rows")
    raise EdgeqError(None, f"format {d.format} (for {name}) cannot carry a table on ONNX")
