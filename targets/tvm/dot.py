"""Integer linear kernels on the CPU's dot-product instructions (TVM format `int8_dyn_rows`).

Each call quantizes its input per row (per token) to 8 bits, symmetric (scale = max|x| / 127, round half to even),
multiplies by the int8 weights with int32 sums, and rescales to float after (sum * x_scale * w_scale). The weights
are stored in blocks of 16 outputs by 4 inputs (`DOT_OUT` x `DOT_IN`), the operand shape of both instructions:

- `vnni` (x86 AVX-512 VNNI): `vpdpbusd` multiplies unsigned by signed bytes, so activations are shifted to
  uint8 (q + 128) and 128 times each output's weight sum (stored beside the weights) is taken off after.
- `sdot` (arm64 with the dot-product extension, armv8.2-a+dotprod): signed by signed, no shift.
- `generic` (anything else): the same integers in plain int32 loops (correct, not fast: no explicit vectors).

The instructions are put in by tensorizing (TVM's own VNNI intrinsic names an older LLVM's operand types, so the
one here is written for the LLVM that TVM 0.27 ships; its arm64 one fails to match in tensorize, so that one is
written here too); disassembly checks they are there (tests/test_tvm_dot.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

DOT_OUT, DOT_IN = 16, 4
# a register tile: ROW_TILE rows (ops._dot_linear_te pads to whole tiles) by OUT_BLOCKS blocks of 16 outputs, 16
# int32 vectors of sums; 8 x 2 rather than 4 x 4 halves the weight loads per instruction (a 1536-input block's
# weights outgrow L1, so each row tile streams them from L2)
ROW_TILE = 8
OUT_BLOCKS = 2
ACT_Q = "act_q"            # the quantized activations' block; the schedule reads the kind from its suffix
KINDS = ("vnni", "sdot", "generic")
VNNI_INTRIN = "edgeq_dot_16x4_u8i8i32_vnni"
SDOT_INTRIN = "edgeq_dot_4x4_i8i8i32_sdot"


def _intrinsics(idx: str, lanes: int, a_dtype: str, llvm_name: str):
    """(desc, impl) of C[i] += sum_k A[k] * B[i, k] for `lanes` outputs by 4 inputs, buffers indexed in `idx`
    (int64 in kernels with symbolic shapes: the matcher compares index types too), C the register tile's sums
    (a local buffer: the matcher compares scopes too)."""
    n4, nl, z = tvm.tirx.const(4, idx), tvm.tirx.const(lanes, idx), tvm.tirx.const(0, idx)

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((n4,), a_dtype, offset_factor=1), B: T.Buffer((nl, n4), "int8", offset_factor=1),
             C: T.Buffer((nl,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[z:nl], A[z:n4], B[z:nl, z:n4])
            T.writes(C[z:nl])
            for i, k in T.grid(nl, n4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((n4,), a_dtype, offset_factor=1), B: T.Buffer((nl, n4), "int8", offset_factor=1),
             C: T.Buffer((nl,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[z:nl], A[z:n4], B[z:nl, z:n4])
            T.writes(C[z:nl])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([z], f"{a_dtype}x4"), dtype="int32"), lanes),
                              dtype=f"{a_dtype}x{4 * lanes}")
            C[T.ramp(z, 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name), C.vload([z], dtype=f"int32x{lanes}"), a,
                B.vload([z, z], dtype=f"int8x{4 * lanes}"), dtype=f"int32x{lanes}")

    return desc, impl


for _idx in ("int32", "int64"):
    TensorIntrin.register(f"{VNNI_INTRIN}_{_idx}", *_intrinsics(_idx, 16, "uint8", "llvm.x86.avx512.vpdpbusd.512"),
                          override=True)
    TensorIntrin.register(f"{SDOT_INTRIN}_{_idx}", *_intrinsics(_idx, 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8"),
                          override=True)


def dot_kind(target: dict[str, Any]) -> str:
    """Which integer kernel a (resolved, build.resolve_target) llvm target gets."""
    if target.get("kind") != "llvm":
        return "generic"
    from tvm.target import codegen

    tgt = tvm.target.Target(target)
    triple = str(target.get("mtriple", ""))
    if triple.startswith("aarch64"):
        return "sdot" if codegen.llvm_cpu_has_features(["dotprod"], tgt) else "generic"
    return "vnni" if codegen.llvm_cpu_has_features(["avx512vnni"], tgt) else "generic"


def act_block(kind: str) -> str:
    return ACT_Q if kind == "generic" else f"{ACT_Q}_{kind}"


def kernel_kind(func: tirx.PrimFunc) -> str | None:
    """The integer kind of a linear kernel (its quantize block's name), None for a float-compute kernel."""
    sch = s_tir.Schedule(func)
    for kind in KINDS:
        try:
            sch.get_sblock(act_block(kind))
            return kind
        except Exception:  # noqa: BLE001  (TVM raises its own error for a missing block)
            continue
    return None


def _static_extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tvm.tirx.IntImm) else None


def row_tile(rows) -> int:
    """Rows per register tile: a few static rows (decode) are one tile as they are; more rows, or a symbolic count,
    go in tiles of ROW_TILE (ops._dot_linear_te pads the last tile)."""
    if isinstance(rows, (int, tvm.tirx.IntImm)) and int(rows) <= ROW_TILE:
        return int(rows)
    return ROW_TILE


def schedule_dot_linear(func: tirx.PrimFunc, kind: str) -> s_tir.Schedule:
    """A register tile of ROW_TILE rows (ops._dot_linear_te's row tiles) by OUT_BLOCKS x 16 outputs: its int32 sums
    stay in registers (a local buffer) down the whole reduction, each 16 x 4 weight block loaded once per tile
    serves all its rows, 4 inputs x 16 outputs per instruction. Output blocks run in parallel with every row tile
    inside, so a block's weights are reused from cache. The quantize and rescale stages run rows in parallel,
    vectorized."""
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("matmul")
    *lead, t, ti, n, k = sch.get_loops(blk)
    idx = str(sch.get(k).extent.ty)
    n_blocks = int(sch.get(n).extent) // DOT_OUT
    nj_n = next(v for v in (OUT_BLOCKS, 2, 1) if n_blocks % v == 0)
    no, nj, ni = sch.split(n, [None, nj_n, DOT_OUT])
    ko, ki = sch.split(k, [None, DOT_IN])
    # the row loops stay unfused (fused symbolic rows bind as // and %, which tensorize cannot blockize)
    if kind == "sdot":
        nv_o, nv = sch.split(ni, [None, 4])
        sch.reorder(no, *lead, t, ko, ti, nj, nv_o, nv, ki)
        sch.unroll(nv_o)
    elif kind == "vnni":
        sch.reorder(no, *lead, t, ko, ti, nj, ni, ki)
    else:
        sch.reorder(no, *lead, t, ko, ki, ti, nj, ni)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, t)
    *_, acc_n = sch.get_loops(acc)
    _, acc_v = sch.split(acc_n, [None, DOT_OUT])
    sch.vectorize(acc_v)
    sch.unroll(ti)
    sch.unroll(nj)
    sch.parallel(no)
    init = sch.decompose_reduction(blk, ko)
    *_, init_n = sch.get_loops(init)
    sch.vectorize(init_n)
    if kind == "vnni":
        sch.tensorize(ni, f"{VNNI_INTRIN}_{idx}")
    elif kind == "sdot":
        sch.tensorize(nv, f"{SDOT_INTRIN}_{idx}")
    else:                    # correctness only: left to LLVM's own vectorizer
        sch.unroll(ki)
    _schedule_row_amax(sch)
    for name in (act_block(kind), "linear"):
        b = sch.get_sblock(name)
        *outer, inner = sch.get_loops(b)
        width = _static_extent(sch, inner)
        _, inner_i = sch.split(inner, [None, next(v for v in (16, 8, DOT_IN) if width % v == 0)])
        sch.vectorize(inner_i)
        sch.parallel(sch.fuse(*outer))
    return sch


def _schedule_row_amax(sch: s_tir.Schedule) -> None:
    """max|x| per row (the quantization scale): rows in parallel, each row's maximum over 16 lanes at a time
    (rfactor) and the 16 folded after. Left as written it ran serially as one scalar chain of `vmaxss` before
    the parallel loops (MiniLM's 1536-wide rows: ~0.3 ms a call of a ~0.5 ms kernel). The scale is inlined."""
    amax = sch.get_sblock("act_amax")
    *outer, r = sch.get_loops(amax)
    width = _static_extent(sch, r)
    if width is None or width % 16 or not outer:
        return
    _, ri = sch.split(r, [None, 16])
    rf = sch.rfactor(ri, 0)
    row = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.compute_at(rf, row)
    *_, a, b = sch.get_loops(rf)        # the lanes and the rest of the row, in the order compute_at chose
    for lanes, rest in ((a, b), (b, a)):
        try:
            sch.reorder(rest, lanes)
            sch.vectorize(lanes)
            break
        except Exception:  # noqa: BLE001  (TVM's schedule error: the other loop is the lanes)
            continue
    sch.parallel(row)
    sch.compute_inline(sch.get_sblock("act_scale"))


def dot_weight_blocks(q: np.ndarray) -> np.ndarray:
    """(out, in) int8 -> (out/16, in/4, 16, 4): each instruction's 16 outputs by 4 inputs contiguous."""
    n, k = q.shape
    return np.ascontiguousarray(q.reshape(n // DOT_OUT, DOT_OUT, k // DOT_IN, DOT_IN).transpose(0, 2, 1, 3))
