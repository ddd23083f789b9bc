"""Plan formats as Relax/TIR: weights become function parameters, quantized weights dequantize inside the kernel.

Weights are parameters of the Relax function (stored beside the library, bound
at load time), never constants: constants would let FoldConstant turn an INT8
weight back into float at compile time. A quantized linear layer is one TE
kernel whose reduction reads the stored integers and scales directly, so the
dequantize is fused into the matmul by construction, whatever the fusion
passes decide. Float layers use the same kernel shape (weights (out, in), the
reduction over the input axis), f16 weights widened to f32 in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm import tirx as tir

from edgeq.core.errors import EdgeqError
from edgeq.core.formats.int4_groups import INT4_GROUP, int4_quantize_groups
from edgeq.core.formats.int8 import INT8_DOT_ZERO, int8_quantize_rows
from edgeq.core.formats.int8_groups import INT8_GROUP, int8_quantize_groups
from edgeq.core.plan import TensorPlan
from edgeq.targets.tvm.dot import DOT_IN, DOT_OUT, act_block, dot_weight_blocks, row_tile
from edgeq.targets.tvm.gelu import gelu_expr
from edgeq.targets.tvm import int4_vnni, int8_vnni
from edgeq.targets.tvm.int4_vnni import vnni_byte, vnni_layout, vnni_order
from edgeq.targets.tvm.int8_vnni import g32_byte, g32_order
from edgeq.targets.tvm.panel import PANEL, panel_width

NP_DTYPE = {"f32": np.float32, "f16": np.float16}
LINEAR_PREFIX = "edgeq_linear_"     # the schedule pass finds the linear kernels by this name


@dataclass
class Params:
    """The function's weight parameters, in order, with the arrays stored for them."""

    vars: list[relax.Var] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # which integer kernel int8_dyn_rows linears get (dot.dot_kind of the build's target): the activations'
    # dtype differs between them (uint8 for x86 VNNI, int8 otherwise), the stored arrays do not
    dot: str = "generic"
    # (weight, format) -> its stored arrays, shared by the functions of one module (a decoder's entries) so that
    # each weight is quantized once; None: quantize on every use
    stored: dict | None = None

    def weight_arrays(self, name: str, w: np.ndarray, d: TensorPlan,
                      imatrix: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
        """weight_arrays(), computed once per (weight, format) where `stored` is shared."""
        if self.stored is None:
            return weight_arrays(name, w, d, imatrix)
        key = (name, d.format)
        if key not in self.stored:
            self.stored[key] = weight_arrays(name, w, d, imatrix)
        return self.stored[key]

    def var(self, name: str) -> relax.Var:
        return self.vars[list(self.arrays).index(name)]

    def add(self, name: str, arr: np.ndarray, shape: tuple | None = None) -> relax.Var:
        """`shape`: the parameter's shape when it is not the stored array's (symbolic widths: MLP pruning)."""
        if name in self.arrays:
            raise ValueError(f"duplicate TVM parameter {name}")
        arr = np.ascontiguousarray(arr)
        v = relax.Var(name, relax.TensorType(arr.shape if shape is None else shape, str(arr.dtype)))
        self.vars.append(v)
        self.arrays[name] = self.keep(arr)
        return v

    def add_symbolic(self, name: str, shape: tuple, default: np.ndarray) -> relax.Var:
        """A float32 parameter whose shape has symbolic dimensions (a LoRA factor's rank): `default` is what the
        params file stores (a rank-0 factor: the base model), the runtime may pass any conforming array."""
        if name in self.arrays:
            raise ValueError(f"duplicate TVM parameter {name}")
        v = relax.Var(name, relax.TensorType(shape, "float32"))
        self.vars.append(v)
        self.arrays[name] = self.keep(np.ascontiguousarray(default, np.float32))
        return v

    def keep(self, arr: np.ndarray):
        """What `arrays` holds for a parameter: the array itself (SizingParams keeps only its size)."""
        return arr


@dataclass(frozen=True)
class ArraySpec:
    """A stored parameter's dtype and shape, without its data (targets/tvm/layout.py sizes plans with these)."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SizingParams(Params):
    """Params that keep each array's dtype and shape only: the real lowering sizes a plan's params file
    without holding its weights."""

    def keep(self, arr: np.ndarray) -> ArraySpec:
        return ArraySpec(arr.dtype, tuple(int(d) for d in arr.shape))




def panels(a: np.ndarray) -> np.ndarray:
    """(rows, n_out) input-major -> (n_out/P, rows, P): each panel of P outputs contiguous down the inputs."""
    p = panel_width(a.shape[1])
    return np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1] // p, p).transpose(1, 0, 2))


def unpanel(a: np.ndarray) -> np.ndarray:
    """The inverse of panels(): (n_out/P, rows, P) -> (rows, n_out)."""
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)


def stored(w: te.Tensor, row, n) -> tir.PrimExpr:
    """Element (input row `row`, output `n`) of a panelled array (panels())."""
    p = w.shape[2]
    return w[n // p, row, n % p]


def int4_code(w: te.Tensor, kk, n) -> tir.PrimExpr:
    """The code (-8..7) of input `kk`, output `n` of an int4_g32 weight as stored (weight_arrays), as f32.

    The nibble arithmetic stays int32 (the index is int64): int64 lanes would double the vector work of the
    decode inside the matmul loop. Panels of whole 16-output blocks hold each group's bytes in int4_vnni.py's order."""
    p = int(w.shape[2])
    if vnni_layout(p):
        row, col, shift = vnni_byte(p, kk, n)
        byte = w[n // p, row, col].astype("int32")
    else:
        byte, shift = stored(w, kk // 2, n).astype("int32"), (kk % 2) * 4
    nib = tir.bitwise_and(tir.shift_right(byte, shift.astype("int32")), 15) - 8
    return nib.astype("float32")


def int8_g32_value(w: te.Tensor, s: te.Tensor, kk, n) -> tir.PrimExpr:
    """Input `kk`, output `n` of an int8_g32 weight as stored (codes in int8_vnni.g32_order), dequantized, as f32."""
    p = int(w.shape[2])
    row, col = g32_byte(p, kk, n)
    return w[n // p, row, col].astype("float32") * stored(s, kk // INT8_GROUP, n).astype("float32")


def int4_value(w: te.Tensor, s: te.Tensor, kk, n) -> tir.PrimExpr:
    """Input `kk`, output `n` of an int4_g32 weight, dequantized (code times its group's scale), as f32."""
    return int4_code(w, kk, n) * stored(s, kk // INT4_GROUP, n).astype("float32")


DEQUANT = "dequant"           # the int4 decode stage of a many-row kernel (schedule.py computes it in the loop)
GROUP_SUM = "group_sum"       # the per-group partial sums of a few-row int4 kernel (schedule.py finds them)
FEW_ROWS = 4                  # up to this many static rows (decode), int4 kernels factor the group scale out


def _few_rows(lead) -> bool:
    return all(isinstance(d, (int, tir.IntImm)) for d in lead) and int(np.prod([int(d) for d in lead])) <= FEW_ROWS


def _dot_linear_te(x: te.Tensor, ws: list[te.Tensor], bias: te.Tensor | None, kind: str,
                   gelu: bool = False) -> te.Tensor:
    """int8_dyn_rows: each row of x quantized to 8 bits (scale max|x|/127), int32 sums against the int8 weights
    (dot.py's blocks), rescaled after: y = sum * x_scale * w_scale (+ b). Mirrors formats.int8.int8_dyn_rows_matmul
    operation for operation, so the library and the reference agree to float rounding of the rescale.

    The quantized rows and the int32 sums are laid out in row tiles (dot.row_tile: the last row dimension padded up
    to whole tiles, the padding repeating its last row), so the schedule keeps one tile's sums in registers with
    no tail: a symbolic row count split by the schedule instead leaves a guard that tensorize refuses."""
    w, w_scale, w_sum = ws
    k_dim, lead = x.shape[-1], list(x.shape[:-1])
    outer, rows = lead[:-1], lead[-1]
    n_dim = w.shape[0] * DOT_OUT
    tile = row_tile(rows)
    r = te.reduce_axis((0, k_dim), "r")
    amax = te.compute(lead, lambda *i: te.max(tir.abs(x[tuple(i) + (r,)]), axis=r), name="act_amax")
    x_scale = te.compute(lead, lambda *i: tir.Select(amax[i] > 0, amax[i] / tir.const(127.0, "float32"),
                                                     tir.const(1.0, "float32")), name="act_scale")
    zero = INT8_DOT_ZERO if kind == "vnni" else 0

    def quantized(*i):
        row = tir.min(i[-3] * tile + i[-2], rows - 1)          # a padding row repeats the last one
        at = tuple(i[:-3]) + (row,)
        q = tir.max(tir.min(tir.round(x[at + (i[-1],)] / x_scale[at]), tir.const(127.0, "float32")),
                    tir.const(-127.0, "float32")).astype("int32")
        return (q + zero).astype("uint8") if zero else q.astype("int8")

    n_tiles = (rows - 1) // tile + 1      # as region analysis bounds the reads i // tile (it proves cover with this)
    xq = te.compute(outer + [n_tiles, tile, k_dim], quantized, name=act_block(kind))
    k = te.reduce_axis((0, k_dim), "k")
    acc = te.compute(outer + [n_tiles, tile, n_dim], lambda *i: te.sum(
        xq[tuple(i[:-1]) + (k,)].astype("int32")
        * w[i[-1] // DOT_OUT, k // DOT_IN, i[-1] % DOT_OUT, k % DOT_IN].astype("int32"), axis=k), name="matmul")

    def epilogue(*i):
        a = acc[tuple(i[:-2]) + (i[-2] // tile, i[-2] % tile, i[-1])]
        a = a - w_sum[i[-1]] * zero if zero else a
        v = a.astype("float32") * x_scale[i[:-1]] * w_scale[i[-1]]
        v = v + bias[i[-1]] if bias is not None else v
        return gelu_expr(v) if gelu else v

    return te.compute(lead + [n_dim], epilogue, name="linear")


def _linear_te(x: te.Tensor, fmt: str, ws: list[te.Tensor], bias: te.Tensor | None,
               dot: str = "generic", gelu: bool = False) -> te.Tensor:
    """y[..., n] = sum_k x[..., k] * W[k, n] (+ b[n]) with W read in its stored (panelled) format."""
    if fmt == "int8_dyn_rows":
        return _dot_linear_te(x, ws, bias, dot, gelu)
    if gelu:
        raise EdgeqError(None, f"GELU is fused into int8_dyn_rows linears only, not {fmt}")
    k_dim = x.shape[-1]
    n_dim = ws[0].shape[0] * ws[0].shape[2]
    k = te.reduce_axis((0, k_dim), "k")
    lead = list(x.shape[:-1])

    if fmt == "f32":
        (w,) = ws
        weight = lambda kk, n: stored(w, kk, n)                                          # noqa: E731
    elif fmt in ("f16", "int8_wo"):
        w = ws[0]
        weight = lambda kk, n: stored(w, kk, n).astype("float32")                        # noqa: E731
    elif fmt == "int8_g32":
        # targets without integer dot products: q8_0's codes times their block's scale, f32 activations
        w, s = ws
        weight = lambda kk, n: int8_g32_value(w, s, kk, n)                                # noqa: E731
    elif fmt == "int4_g32" and _few_rows(lead):
        # decode: y[n] = sum_g s[g, n] * sum_{k in g} x[k] * code[k, n], the scale applied once per group,
        # not once per weight (a third fewer vector instructions in the loop that bounds decode speed)
        w, s = ws
        kk = te.reduce_axis((0, INT4_GROUP), "kk")
        part = te.compute(lead + [k_dim // INT4_GROUP, n_dim], lambda *i: te.sum(
            x[tuple(i[:-2]) + (i[-2] * INT4_GROUP + kk,)] * int4_code(w, i[-2] * INT4_GROUP + kk, i[-1]), axis=kk),
            name=GROUP_SUM)
        g = te.reduce_axis((0, k_dim // INT4_GROUP), "g")
        acc = te.compute(lead + [n_dim], lambda *i: te.sum(
            part[tuple(i[:-1]) + (g, i[-1])] * stored(s, g, i[-1]).astype("float32"), axis=g), name="matmul")
        weight = None
    elif fmt == "int4_g32":
        # many rows (prefill, encoders): a dequantize stage that the schedule computes inside the matmul's
        # reduction loop (a register tile of a few inputs by one vector of outputs), so each weight is decoded
        # once per block of rows instead of once per row; there is never a float copy of the matrix
        w, s = ws
        deq = te.compute((k_dim, n_dim), lambda kk, n: int4_value(w, s, kk, n), name=DEQUANT)
        weight = lambda kk, n: deq[kk, n]                                               # noqa: E731
    else:
        raise EdgeqError(None, f"format {fmt} is not carried by the TVM target")

    if weight is not None:
        acc = te.compute(lead + [n_dim], lambda *i: te.sum(x[tuple(i[:-1]) + (k,)] * weight(k, i[-1]), axis=k),
                         name="matmul")
    scale = ws[1] if fmt == "int8_wo" else None
    if scale is None and bias is None:
        return acc

    def epilogue(*i):
        v = acc[i]
        if scale is not None:
            v = v * scale[i[-1]]
        if bias is not None:
            v = v + bias[i[-1]]
        return v

    return te.compute(acc.shape, epilogue, name="linear")


def weight_arrays(name: str, w: np.ndarray, d: TensorPlan,
                  imatrix: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
    """The stored arrays of one (out, in) weight in its plan format: input-major, in panels of P outputs
    (panels(): (out/P, in, P)), so kernels vectorize over outputs and a one-token matmul streams each panel
    contiguously (a plain (in, out) layout strides a whole row per input: a cache and TLB miss each, which
    held SmolLM2's decode to ~1 GB/s).

    f32/f16: W^T. int8_wo: int8 W^T and an f32 scale per output. int8_g32: ggml's Q8_0 codes (int8 W^T, each
    panel's 4-input chunks in int8_vnni.py's operand order) and f16 scales (in/32 rows), panelled alike. int8_dyn_rows: int8 W in dot.py's blocks (not
    panels), an f32 scale and the int32 sum of each output's weights. int4_g32: bytes (in/2 rows; within each group of
    32 inputs in int4_vnni.py's order where the panel is whole 16-output blocks, else the low nibble for the even
    input), and f16 scales (in/32 rows); ggml's Q4_0 codes and scales, with `imatrix` (E[x²] per
    input) its weighted scale search. Same values as the format's reference quantizer.
    """
    fmt = d.format
    w = w.reshape(w.shape[0], -1)
    if fmt in ("f32", "f16"):
        return [(name, panels(w.T.astype(NP_DTYPE[fmt])))]
    if fmt == "int8_wo":
        q, scale = int8_quantize_rows(w)
        return [(name, panels(q.T)), (name + ".scale", scale)]
    if fmt == "int8_g32":
        if w.shape[-1] % INT8_GROUP:
            raise EdgeqError(None, f"{name}: {w.shape[-1]} input columns are not a multiple of {INT8_GROUP}")
        codes, scale = int8_quantize_groups(w)
        return [(name, g32_order(panels(codes.T))), (name + ".scale", panels(scale.T))]
    if fmt == "int8_dyn_rows":
        q, scale = int8_quantize_rows(w)
        if q.shape[0] % DOT_OUT or q.shape[1] % DOT_IN:
            raise EdgeqError(None, f"{name}: int8_dyn_rows needs outputs in 16s and inputs in 4s, not {q.shape}")
        return [(name, dot_weight_blocks(q)), (name + ".scale", scale),
                (name + ".sum", q.astype(np.int32).sum(axis=1, dtype=np.int32))]
    if fmt == "int4_g32":
        if w.shape[-1] % INT4_GROUP:
            raise EdgeqError(None, f"{name}: {w.shape[-1]} input columns are not a multiple of {INT4_GROUP}")
        packed, scale = int4_quantize_groups(w, imatrix=imatrix)
        return [(name, vnni_order(panels(packed.T))), (name + ".scale", panels(scale.T))]
    raise EdgeqError(None, f"format {fmt} (for {name}) is not carried by the TVM target")


def branch_arrays(name: str, a: np.ndarray, b: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The stored arrays of a low-rank error branch (passes/lowrank_compensate: A (r, in), B (out, r)), float16
    as the branch was computed, panelled like an f16 weight: Aᵀ (in, r) and Bᵀ (r, out) as two linears' weights."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise EdgeqError(None, f"{name}: low-rank branch shapes {a.shape} and {b.shape} do not fit")
    return [(name + ".lowrank_a", panels(np.asarray(a, np.float16).T)),
            (name + ".lowrank_b", panels(np.asarray(b, np.float16).T))]


def emit_branch(bb: relax.BlockBuilder, params: Params, x: relax.Expr, y: relax.Expr, name: str,
                branch: tuple[np.ndarray, np.ndarray], hint: str = "linear") -> relax.Expr:
    """y + B·(A·x): two f16 linears (widened to f32 in the loop, like f16 weights) over the r-wide middle."""
    a, b = (params.add(n, arr) for n, arr in branch_arrays(name, *branch))
    xa = emit_linear_vars(bb, x, "f16", [a], None, hint=f"{hint}_lowrank_a")
    return bb.emit(relax.op.add(y, emit_linear_vars(bb, xa, "f16", [b], None, hint=f"{hint}_lowrank_b")))


LORA_PREFIX = "edgeq_lora_"


def lora_param_names(weight: str) -> tuple[str, str]:
    """The parameters (and adapter-file tensors) that carry a user's LoRA factors for one weight."""
    return f"{weight}.lora_a", f"{weight}.lora_b"


def emit_lora_slot(bb: relax.BlockBuilder, params: Params, x: relax.Expr, y: relax.Expr, name: str,
                   shape: tuple[int, ...], hint: str = "linear") -> relax.Expr:
    """y + (x·A)·B with A (in, r) and B (r, out) float32 parameters of a symbolic rank r: a LoRA adapter, or
    several concatenated along r, is passed at run time in their place, swapped without rebuilding the library.
    The params file holds rank-1 zeros (the base model exactly: y + 0); rank 0 computed garbage in TVM 0.27's
    CPU kernels (an empty reduction over a zero-size buffer)."""
    out_f, in_f = shape
    r = sym("lora_rank")
    a_name, b_name = lora_param_names(name)
    a = params.add_symbolic(a_name, (in_f, r), np.zeros((in_f, 1), np.float32))
    b = params.add_symbolic(b_name, (r, out_f), np.zeros((1, out_f), np.float32))

    def xa_fn(xt, at):
        k = te.reduce_axis((0, in_f), "k")
        lead = list(xt.shape[:-1])
        return te.compute(lead + [at.shape[1]], lambda *i: te.sum(xt[tuple(i[:-1]) + (k,)] * at[k, i[-1]], axis=k),
                          name="lora_xa")

    def delta_fn(xat, bt):
        j = te.reduce_axis((0, bt.shape[0]), "j")
        lead = list(xat.shape[:-1])
        return te.compute(lead + [out_f], lambda *i: te.sum(xat[tuple(i[:-1]) + (j,)] * bt[j, i[-1]], axis=j),
                          name="lora_delta")

    xa = bb.emit_te(xa_fn, x, a, primfunc_name_hint=f"{LORA_PREFIX}{hint}_a")
    return bb.emit(relax.op.add(y, bb.emit_te(delta_fn, xa, b, primfunc_name_hint=f"{LORA_PREFIX}{hint}_b")))


def emit_linear(bb: relax.BlockBuilder, params: Params, x: relax.Expr, name: str, w: np.ndarray,
                bias: np.ndarray | None, d: TensorPlan, hint: str = "linear",
                imatrix: np.ndarray | None = None, branch: tuple[np.ndarray, np.ndarray] | None = None,
                channels: tuple[int, tir.PrimExpr] | None = None, gelu: bool = False) -> relax.Expr:
    """`gelu`: GELU applied to the output (int8_dyn_rows only: inside the rescale, one pass fewer over the output;
    fuses_gelu() says when). `branch`: (A, B) of a low-rank error branch on this weight, or None. `channels`: (axis, units) when the
    weight's size along `axis` of (out, in) is symbolic (an MLP's channels under pruning): `units` counts PANEL
    channels, and each stored array's matching dimension becomes `units` times its extent per PANEL channels."""
    ws = []
    if channels is not None and d.format == "int8_dyn_rows":
        raise EdgeqError(None, f"{name}: int8_dyn_rows weights are not lowered with pruned (symbolic) widths")
    for n, a in params.weight_arrays(name, w, d, imatrix):
        shape = None
        if channels is not None:
            axis = stored_channel_axis(a, channels[0])
            full_units, rest = divmod(w.shape[channels[0]], PANEL)
            per, bad = divmod(a.shape[axis], full_units) if not rest else (0, 1)
            if bad or rest:
                raise EdgeqError(None, f"{name}: {w.shape[channels[0]]} channels are not whole panels of {PANEL} in "
                                       f"its stored array {n} {a.shape}")
            shape = tuple(channels[1] * per if i == axis else s for i, s in enumerate(a.shape))
        ws.append(params.add(n, a, shape))
    b = None if bias is None else params.add(name.removesuffix(".weight") + ".bias", bias.astype(np.float32))
    y = emit_linear_vars(bb, x, d.format, ws, b, hint, dot=params.dot, gelu=gelu)
    return y if branch is None else emit_branch(bb, params, x, y, name, branch, hint)


def stored_channel_axis(stored: np.ndarray, channel_axis: int) -> int:
    """The axis of a stored array (weight_arrays) that runs along a (out, in) weight's `channel_axis`: outputs are
    the panels (axis 0) or a 1-D scale's entries; inputs are the panels' rows (axis 1: one per input, half a byte
    row per input for int4, one scale row per 32 inputs)."""
    if stored.ndim == 1:
        if channel_axis != 0:
            raise EdgeqError(None, "a per-output scale does not run along the inputs")
        return 0
    return 0 if channel_axis == 0 else 1


def emit_linear_vars(bb: relax.BlockBuilder, x: relax.Expr, fmt: str, ws: list[relax.Var], bias: relax.Var | None,
                     hint: str = "linear", dot: str = "generic", gelu: bool = False,
                     int8_act: bool = False) -> relax.Expr:
    """A linear layer over weight parameters already added (a tied head shares the token table's).

    `int8_act`: an int8_wo weight on int8_vnni.py's kernel (activations quantized per group of 32) where the CPU has
    VNNI: the decoder's tied head beside int4 linears only. Every int8 linear of SmolLM2 on it measured KLD 0.0074
    against q8_0's 0.0039 (per-channel weight scales plus quantized activations; the head alone 0.0057): the int8
    preset's linears are int8_g32 (q8_0's block scales), on int8_vnni.py's kernel wherever the CPU has integer dot
    products (x86 VNNI, arm64 sdot), whatever `int8_act` says."""
    if fmt == "int4_g32" and dot in ("vnni", "amx") and int4_vnni.fits(x.ty.shape, ws[0].ty.shape):
        return int4_vnni.emit_int4_vnni_linear(bb, x, ws, bias, hint)
    if int8_act and fmt == "int8_wo" and dot in ("vnni", "amx") and int8_vnni.fits(x.ty.shape, ws[0].ty.shape):
        return int8_vnni.emit_int8_vnni_linear(bb, x, ws, bias, hint)
    if fmt == "int8_g32" and dot in ("vnni", "amx", "sdot") and int8_vnni.fits(x.ty.shape, ws[0].ty.shape):
        return int8_vnni.emit_int8_vnni_linear(bb, x, ws, bias, hint, groups=True,
                                               kind="sdot" if dot == "sdot" else "vnni")
    if dot == "amx":
        from edgeq.targets.tvm.amx import emit_amx_linear, fits

        sh = x.ty.shape
        if (fmt == "int8_dyn_rows" and bias is not None and sh is not None and len(sh.values) == 3
                and isinstance(sh.values[2], tir.IntImm)
                and fits(int(sh.values[2]), int(ws[0].ty.shape.values[0]) * DOT_OUT)):
            return emit_amx_linear(bb, x, ws, bias, hint, gelu)
        dot = "vnni"                  # other shapes: the VNNI kernel (AMX targets have AVX-512 VNNI)
    args = [x, *ws] + ([bias] if bias is not None else [])
    n_w = len(ws)

    def fn(xt, *rest):
        return _linear_te(xt, fmt, list(rest[:n_w]), rest[n_w] if len(rest) > n_w else None, dot, gelu)

    return bb.emit_te(fn, *args, primfunc_name_hint=f"{LINEAR_PREFIX}{hint}_{fmt}")


def emit_embedding(bb: relax.BlockBuilder, params: Params, ids: relax.Expr, name: str, table: np.ndarray,
                   d: TensorPlan) -> relax.Expr:
    """Rows of a table for token ids; INT8 tables gather int8 rows and their scales (exact dequantize)."""
    if d.format in ("f32", "f16"):
        t = params.add(name, table.astype(NP_DTYPE[d.format]))
        rows = bb.emit(relax.op.take(t, ids, axis=0, mode="clip"))
        return rows if d.format == "f32" else bb.emit(relax.op.astype(rows, "float32"))
    if d.format == "int8_wo":
        q, scale = int8_quantize_rows(table)
        tq = params.add(name, q)
        ts = params.add(name + ".scale", scale)
        rows = bb.emit(relax.op.astype(relax.op.take(tq, ids, axis=0, mode="clip"), "float32"))
        s = bb.emit(relax.op.expand_dims(relax.op.take(ts, ids, axis=0, mode="clip"), axis=-1))
        return bb.emit(relax.op.multiply(rows, s))
    if d.format == "int4_g32":
        # a budgeted plan may put an untied table on int4: each token's row decoded from its packed bytes and
        # group scales (ggml's Q4_0 codes, row-major: the lookup reads whole rows, not the head's panels)
        if table.shape[1] % INT4_GROUP:
            raise EdgeqError(None, f"{name}: {table.shape[1]} columns are not a multiple of {INT4_GROUP}")
        packed, scale = int4_quantize_groups(table)
        tp, ts = params.add(name, packed), params.add(name + ".scale", scale)

        def rows_fn(it, pt, st):
            def val(*i):
                t = tir.max(tir.min(it[i[:-1]].astype("int64"), pt.shape[0] - 1), 0)     # take's mode="clip"
                c = i[-1]
                byte = pt[t, c // 2].astype("int32")
                nib = tir.bitwise_and(tir.shift_right(byte, ((c % 2) * 4).astype("int32")), 15) - 8
                return nib.astype("float32") * st[t, c // INT4_GROUP].astype("float32")

            return te.compute(tuple(it.shape) + (pt.shape[1] * 2,), val, name="lookup_int4")

        return bb.emit_te(rows_fn, ids, tp, ts, primfunc_name_hint="token_lookup_int4")
    raise EdgeqError(None, f"format {d.format} (for {name}) cannot carry an embedding table on TVM")


def emit_table_prefix(bb: relax.BlockBuilder, params: Params, n: tir.PrimExpr, name: str, table: np.ndarray,
                      d: TensorPlan) -> relax.Expr:
    """Rows 0..n-1 of a table (positions), f32."""
    if d.format != "f32":
        raise EdgeqError(None, f"{name} must stay f32 on TVM (got {d.format})")
    t = params.add(name, table.astype(np.float32))
    width = table.shape[1]
    return bb.emit_te(lambda tt: te.compute((n, width), lambda i, j: tt[i, j], name="prefix"), t,
                      primfunc_name_hint="table_prefix")


def sym(name: str) -> tir.Var:
    return tir.Var(name, "int64")


__all__ = ["Params", "SizingParams", "ArraySpec", "emit_branch", "branch_arrays", "emit_linear", "emit_linear_vars", "emit_embedding", "emit_table_prefix", "weight_arrays", "sym", "tvm"]


ATTENTION_PREFIX = "edgeq_attention_"
SCORE_KEYS = 64     # keys per register block of the scores kernel (4 vectors of 16 lanes; schedule.py)


def emit_attention(bb: relax.BlockBuilder, q: relax.Expr, k: relax.Expr, v: relax.Expr, mask_bias: relax.Expr,
                   n_heads: int, head_dim: int) -> relax.Expr:
    """Bidirectional multi-head attention on (batch, seq, heads*dim) activations, two TE kernels and a softmax.

    scores[b, h, i, j] = q_i . k_j / sqrt(d) + mask_bias[b, j] reads K transposed per head, so the inner
    loop runs over j contiguously; the context kernel's inner loop runs over the head dimension. The
    schedule pass gives both their CPU loop order (schedule.py).
    """
    scale = float(1.0 / np.sqrt(head_dim))

    def scores_fn(qt, kt_in, bias):
        bsz, seq = qt.shape[0], qt.shape[1]
        # keys padded to whole SCORE_KEYS blocks (the padding repeats the last key and is never read back), so the
        # schedule holds a block of one query's scores in registers with no tail
        padded = ((seq - 1) // SCORE_KEYS + 1) * SCORE_KEYS
        kt = te.compute((bsz, n_heads, head_dim, padded),
                        lambda b_, h, d, j: kt_in[b_, tir.min(j, seq - 1), h * head_dim + d], name="kt")
        d = te.reduce_axis((0, head_dim), "d")
        raw = te.compute((bsz, n_heads, seq, padded),
                         lambda b_, h, i, j: te.sum(qt[b_, i, h * head_dim + d] * kt[b_, h, d, j], axis=d),
                         name="scores")
        return te.compute((bsz, n_heads, seq, seq), lambda b_, h, i, j: raw[b_, h, i, j] * scale + bias[b_, j],
                          name="scores_epi")

    scores = bb.emit_te(scores_fn, q, k, mask_bias, primfunc_name_hint=ATTENTION_PREFIX + "scores")
    # exp as a vectorizable polynomial (topi's fast_exp; within float32 rounding of exp): legalized softmax calls
    # libm's expf once per score, which LLVM cannot vectorize (MiniLM int8-dyn: more time than all the linears)
    probs = bb.emit_te(lambda st: topi.nn.fast_softmax(st, axis=-1), scores, primfunc_name_hint="softmax")

    def context_fn(p, vt):
        bsz, seq = vt.shape[0], vt.shape[1]
        j = te.reduce_axis((0, seq), "j")
        return te.compute((bsz, seq, n_heads, head_dim),
                          lambda b_, i, h, d: te.sum(p[b_, h, i, j] * vt[b_, j, h * head_dim + d], axis=j),
                          name="context")

    ctx = bb.emit_te(context_fn, probs, v, primfunc_name_hint=ATTENTION_PREFIX + "context")
    return ctx


def fuses_gelu(d: TensorPlan, params: Params) -> bool:
    """Whether emit_linear(gelu=True) takes this weight: int8_dyn_rows on an integer kernel of the CPU."""
    return d.format == "int8_dyn_rows" and params.dot != "generic"


def emit_gelu(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    """GELU, x/2 (1 + erf(x/sqrt 2)), with erf as topi's fast_erf (a rational polynomial, float32-accurate), so the
    element-wise kernel vectorizes; legalized R.nn.gelu calls libm's erff per element."""

    def gelu(xt):
        return te.compute(xt.shape, lambda *i: gelu_expr(xt[i]), name="gelu")

    return bb.emit_te(gelu, x, primfunc_name_hint="gelu")
