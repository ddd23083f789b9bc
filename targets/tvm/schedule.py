"""A fixed CPU schedule for edgeq's linear kernels (untuned: issue 6 brings meta-schedule tuning).

TVM's default llvm pipeline leaves TIR loops as written: a serial scalar loop
nest, ~300x slower than onnxruntime on MiniLM. Each linear kernel (weights
input-major, see ops.py) gets the classic CPU shape instead: rows in blocks of
ROWS, outputs in vectors of VEC lanes, the reduction between them, so each
weight vector loaded is used for ROWS rows; the row blocks run in parallel.
The weight decode (int8 widening, int4 nibble and scale) sits inside the loop,
so it stays fused with the multiply. Scheduled kernels are marked opaque so
the fusion passes keep them whole.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from edgeq.targets.tvm.ops import ATTENTION_PREFIX, LINEAR_PREFIX

ROWS = 4
OPAQUE = 8      # relax OpPatternKind.kOpaque


def _vec(n: int) -> int:
    for v in (16, 8, 4):
        if n % v == 0:
            return v
    return 1


def schedule_linear(func: tirx.PrimFunc, packed_pairs: bool = False) -> tirx.PrimFunc:
    """`packed_pairs` (int4): the reduction runs two inputs per byte, so each nibble's shift is a constant."""
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("matmul")
    *lead, n, k = sch.get_loops(blk)
    i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    io, ii = sch.split(i, [None, ROWS])
    n_extent = sch.get(n).extent
    vec = _vec(int(n_extent)) if isinstance(n_extent, tvm.tirx.IntImm) else 1
    no, ni = sch.split(n, [None, vec])
    if packed_pairs:
        k, ki = sch.split(k, [None, 2])
        sch.reorder(io, no, k, ki, ii, ni)
        sch.unroll(ki)
    else:
        sch.reorder(io, no, k, ii, ni)
    sch.unroll(ii)
    if vec > 1:
        sch.vectorize(ni)
    sch.parallel(io)
    sch.decompose_reduction(blk, k)
    try:
        epi = sch.get_sblock("linear")
    except Exception:      # no scale and no bias: the matmul is the whole kernel
        epi = None
    if epi is not None:       # its own loop nest: computed at the matmul's tiles, fused rows confuse region analysis
        *ep_lead, ep_n = sch.get_loops(epi)
        ep_i = sch.fuse(*ep_lead) if len(ep_lead) > 1 else ep_lead[0]
        sch.parallel(ep_i)
        if vec > 1:
            ep_no, ep_ni = sch.split(ep_n, [None, vec])
            sch.vectorize(ep_ni)
    return sch.mod["main"].with_attr("op_pattern", OPAQUE)


def _parallel_rows(sch, blk, keep: int) -> None:
    """Fuse all but the last `keep` loops of a block and run them in parallel."""
    loops = sch.get_loops(blk)
    outer = loops[:len(loops) - keep]
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def schedule_attention(func: tirx.PrimFunc, which: str) -> tirx.PrimFunc:
    """Scores: (b, h, i) in parallel, then d, then j innermost (contiguous in K^T); context: (b, i, h) in
    parallel, then j, then the head dimension innermost, vectorized."""
    sch = s_tir.Schedule(func)
    if which == "scores":
        blk = sch.get_sblock("scores")
        b_, h, i, j, d = sch.get_loops(blk)
        bhi = sch.fuse(b_, h, i)
        sch.reorder(bhi, d, j)
        sch.parallel(bhi)
        sch.decompose_reduction(blk, d)
        _parallel_rows(sch, sch.get_sblock("kt"), 1)
        _parallel_rows(sch, sch.get_sblock("scores_epi"), 1)
    else:
        blk = sch.get_sblock("context")
        b_, i, h, d, j = sch.get_loops(blk)
        bih = sch.fuse(b_, i, h)
        sch.reorder(bih, j, d)
        sch.parallel(bih)
        sch.vectorize(d)
        sch.decompose_reduction(blk, j)
    return sch.mod["main"].with_attr("op_pattern", OPAQUE)


@tvm.transform.module_pass(opt_level=0, name="ScheduleLinears")
def ScheduleLinears(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Give edgeq's linear and attention kernels their CPU schedules (found by their name prefixes)."""
    updates = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(LINEAR_PREFIX):
            updates[gv] = schedule_linear(f, packed_pairs=gv.name_hint.endswith("int4_g32"))
        elif isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(ATTENTION_PREFIX):
            updates[gv] = schedule_attention(f, "scores" if gv.name_hint.startswith(ATTENTION_PREFIX + "scores")
                                             else "context")
    for gv, f in updates.items():
        mod[gv] = f
    return mod
