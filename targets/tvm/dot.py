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
from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc
from tvm.script import tirx as T

DOT_OUT, DOT_IN = 16, 4
ACT_Q = "act_q"            # the quantized activations' block; the schedule reads the kind from its suffix
KINDS = ("vnni", "sdot", "generic")
ROWS = 4                   # rows per register block when a kernel has many (prefill, encoders)
VNNI_INTRIN = "edgeq_dot_16x4_u8i8i32_vnni"
SDOT_INTRIN = "edgeq_dot_4x4_i8i8i32_sdot"


@T.prim_func(s_tir=True)
def _vnni_impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
               C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"), a,
            B.vload([0, 0], dtype="int8x64"), dtype="int32x16")


TensorIntrin.register(VNNI_INTRIN, dot_product_16x4_u8i8i32_desc, _vnni_impl, override=True)


@T.prim_func(s_tir=True)
def _sdot_desc(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
               C: T.Buffer((4,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i in T.serial(0, 4):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _sdot_impl(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
               C: T.Buffer((4,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([0], dtype="int32x4"), a,
            B.vload([0, 0], dtype="int8x16"), dtype="int32x4")


TensorIntrin.register(SDOT_INTRIN, _sdot_desc, _sdot_impl, override=True)


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


def schedule_dot_linear(func: tirx.PrimFunc, kind: str) -> s_tir.Schedule:
    """Rows in blocks of ROWS (one row when there are fewer), 16 outputs by 4 inputs per instruction; blocks of
    rows by 16 outputs in parallel. The quantize and rescale stages run rows in parallel, vectorized."""
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("matmul")
    *lead, n, k = sch.get_loops(blk)
    i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    rows = _static_extent(sch, i)
    r = ROWS if rows is None or rows >= ROWS and rows % ROWS == 0 else 1
    io, ii = sch.split(i, [None, r])
    no, ni = sch.split(n, [None, DOT_OUT])
    ko, ki = sch.split(k, [None, DOT_IN])
    if kind == "sdot":
        nj, nv = sch.split(ni, [None, 4])
        sch.reorder(io, no, ko, ii, nj, nv, ki)
    elif kind == "vnni":
        sch.reorder(io, no, ko, ii, ni, ki)
    else:
        sch.reorder(io, no, ko, ii, ki, ni)
    sch.parallel(sch.fuse(io, no))
    sch.unroll(ii)
    sch.decompose_reduction(blk, ko)
    if kind == "vnni":
        sch.tensorize(ni, VNNI_INTRIN)
    elif kind == "sdot":
        sch.unroll(nj)
        sch.tensorize(nv, SDOT_INTRIN)
    else:                    # correctness only: left to LLVM's own vectorizer
        sch.unroll(ki)
    for name in (act_block(kind), "linear"):
        b = sch.get_sblock(name)
        *outer, inner = sch.get_loops(b)
        width = _static_extent(sch, inner)
        _, inner_i = sch.split(inner, [None, next(v for v in (16, 8, DOT_IN) if width % v == 0)])
        sch.vectorize(inner_i)
        sch.parallel(sch.fuse(*outer))
    return sch


def dot_weight_blocks(q: np.ndarray) -> np.ndarray:
    """(out, in) int8 -> (out/16, in/4, 16, 4): each instruction's 16 outputs by 4 inputs contiguous."""
    n, k = q.shape
    return np.ascontiguousarray(q.reshape(n // DOT_OUT, DOT_OUT, k // DOT_IN, DOT_IN).transpose(0, 2, 1, 3))
