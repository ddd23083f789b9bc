"""A fixed CPU schedule for edgeq's linear and attention kernels (meta-schedule tuning is optional, tune.py).

TVM's default llvm pipeline leaves TIR loops as written: a serial scalar loop
nest, ~300x slower than onnxruntime on MiniLM. Linear kernels get two shapes:

- many rows (prefill, encoders): rows in blocks of ROWS, outputs in vectors of
  VEC lanes, the reduction between them, so each weight vector loaded (for
  int4: decoded, once, into registers) serves ROWS rows; row blocks in parallel.
- a few static rows (decode: one token): one weight panel (ops.panels, 64
  outputs) per parallel iteration, streamed contiguously down the inputs with
  its sums in registers. Row blocks alone ran SmolLM2's decode on one thread
  with three of four unrolled rows wasted, at ~1 GB/s of weights.

The weight decode (int8 widening, int4 nibble and scale) sits inside the loop,
so it stays fused with the multiply. Scheduled kernels are marked opaque so
the fusion passes keep them whole.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from edgeq.targets.tvm.dot import kernel_kind, schedule_dot_linear
from edgeq.targets.tvm.ops import ATTENTION_PREFIX, DEQUANT, GROUP_SUM, LINEAR_PREFIX, LORA_PREFIX, SCORE_KEYS
from edgeq.targets.tvm.panel import PANEL, panel_width

ROWS = 4
VEC_LANES = 16           # f32 lanes of an AVX-512 vector (two AVX2 vectors; LLVM splits them where narrower)
TILE_LANES = 4  # vectors of outputs a LoRA delta tile keeps in registers
OPAQUE = 8      # relax OpPatternKind.kOpaque


def _vec(n) -> int:
    """Vector lanes for an output extent: the widest of 16, 8, 4 that divides it (provably, when it is symbolic:
    a pruned MLP's gate and up have whole 64-output panels)."""
    if isinstance(n, int) or isinstance(n, tvm.tirx.IntImm):
        n = int(n)
        return next((v for v in (16, 8, 4) if n % v == 0), 1)
    from tvm.sym.analyzer import Analyzer

    ana = Analyzer()
    return next((v for v in (16, 8, 4) if ana.can_prove(tvm.tirx.floormod(n, v) == 0)), 1)


def _static_rows(func: tirx.PrimFunc) -> int | None:
    """The row count of a linear kernel when it is a small constant (decode: one token), else None."""
    sch = s_tir.Schedule(func)
    *lead, _n, _k = sch.get_loops(sch.get_sblock("matmul"))
    total = 1
    for lp in lead:
        ext = sch.get(lp).extent
        if not isinstance(ext, tvm.tirx.IntImm):
            return None
        total *= int(ext)
    return total if total <= ROWS else None


def schedule_linear(func: tirx.PrimFunc, packed_pairs: bool = False) -> tirx.PrimFunc:
    """`packed_pairs` (int4): the reduction runs two inputs per byte, so each nibble's shift is a constant."""
    return linear_schedule(func, packed_pairs).mod["main"].with_attr("op_pattern", OPAQUE)


def linear_schedule(func: tirx.PrimFunc, packed_pairs: bool = False) -> s_tir.Schedule:
    """The schedule itself, its trace what tune.py records as the fixed schedule's tuning record."""
    kind = kernel_kind(func)
    if kind is not None:             # int8_dyn_rows: integer sums on the dot-product instructions (dot.py)
        return schedule_dot_linear(func, kind)
    if _static_rows(func) is not None:
        return _schedule_gemv(func, packed_pairs)
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("matmul")
    *lead, n, k = sch.get_loops(blk)
    i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    io, ii = sch.split(i, [None, ROWS])
    n_extent = sch.get(n).extent
    vec = _vec(n_extent)
    no, ni = sch.split(n, [None, vec])
    if packed_pairs:
        k, ki = sch.split(k, [None, 2])
        sch.reorder(io, no, k, ki, ii, ni)
        sch.unroll(ki)
    else:
        sch.reorder(io, no, k, ii, ni)
    try:
        deq = sch.get_sblock(DEQUANT)
    except Exception:          # weights read as stored (f32, f16, int8)
        deq = None
    if deq is not None:        # int4: both nibbles of a byte row decoded once per row block, into registers
        sch.compute_at(deq, k)
        sch.set_scope(deq, 0, "local")
        *_, d_k, d_n = sch.get_loops(deq)
        sch.unroll(d_k)
        if vec > 1:
            sch.vectorize(d_n)
    acc = None
    if len(lead) == 1:     # the row block's sums in registers across the reduction (fused (batch, seq) rows
        acc = sch.cache_write(blk, 0, "local")  # make the write-back region wrong: encoders keep the plain nest)
        sch.reverse_compute_at(acc, no)
    sch.unroll(ii)
    if vec > 1:
        sch.vectorize(ni)
        if acc is not None:
            *_, acc_ni = sch.get_loops(acc)
            sch.vectorize(acc_ni)
    sch.parallel(io)
    sch.decompose_reduction(blk, k)
    _schedule_epilogue(sch, vec)
    return sch


def _schedule_epilogue(sch, vec: int) -> None:
    try:
        epi = sch.get_sblock("linear")
    except Exception:      # no scale and no bias: the matmul is the whole kernel
        return
    # its own loop nest: computed at the matmul's tiles, fused rows confuse region analysis
    *ep_lead, ep_n = sch.get_loops(epi)
    if len(ep_lead) > 1:
        ep_lead = [sch.fuse(*ep_lead)]
    if vec > 1:
        ep_no, ep_ni = sch.split(ep_n, [None, vec])
        sch.vectorize(ep_ni)
        sch.parallel(sch.fuse(*ep_lead, ep_no))
    else:
        sch.parallel(ep_lead[0])


def _schedule_gemv(func: tirx.PrimFunc, packed_pairs: bool) -> s_tir.Schedule:
    """A few rows (decode: one token): the weight panels (ops.panels) run in parallel, each thread streaming
    one panel contiguously down the inputs with its outputs' sums in registers (a local buffer)."""
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("matmul")
    *lead, n, k = sch.get_loops(blk)
    i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    n_extent = sch.get(n).extent         # symbolic for a pruned MLP's gate and up: whole panels all the same
    width = panel_width(int(n_extent)) if isinstance(n_extent, tvm.tirx.IntImm) else PANEL
    vec = _vec(width)
    no, nj, ni = sch.split(n, [None, width // vec, vec])
    try:
        part = sch.get_sblock(GROUP_SUM)
    except Exception:              # one reduction (int8, f16, f32)
        part = None
    if part is not None:           # int4: the group loop outside, each group's partial sums in registers
        sch.reorder(no, k, i, nj, ni)
        part_k = _gemv_group_sums(sch, part, k, vec)
    elif packed_pairs:
        k, ki = sch.split(k, [None, 2])
        sch.reorder(no, k, ki, i, nj, ni)
        sch.unroll(ki)
    else:
        sch.reorder(no, k, i, nj, ni)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, no)
    sch.unroll(i)
    sch.unroll(nj)
    if vec > 1:
        sch.vectorize(ni)
        *_, acc_ni = sch.get_loops(acc)
        sch.vectorize(acc_ni)
    sch.parallel(no)
    sch.decompose_reduction(blk, k)
    if part is not None:            # after `parallel`, which wants whole reduction blocks below it
        sch.decompose_reduction(part, part_k)
    _schedule_epilogue(sch, vec)
    return sch


def _gemv_group_sums(sch, part, group_loop, vec: int):
    """The partial sums of one int4 group, computed inside the group loop: the 32 inputs outermost (two per
    byte, so each nibble's shift is a constant), the panel's outputs vectorized. Returns the loop to
    decompose the reduction at."""
    sch.compute_at(part, group_loop)
    sch.set_scope(part, 0, "local")
    loops = sch.get_loops(part)
    at = [sch.get(lp).same_as(sch.get(group_loop)) for lp in loops].index(True)
    rest, p_n, kk = loops[at + 1:-2], loops[-2], loops[-1]
    ko, ki = sch.split(kk, [None, 2])
    pj, pv = sch.split(p_n, [None, vec])
    sch.reorder(ko, ki, *rest, pj, pv)
    for lp in (ki, *rest, pj):
        sch.unroll(lp)
    if vec > 1:
        sch.vectorize(pv)
    return ko


def schedule_lora(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The two kernels of a LoRA branch (ops.emit_lora_slot), whose rank is symbolic. x·A: the rank innermost, so
    each input reads one row of A contiguously into the rank's sums (a runtime-length loop LLVM vectorizes); as
    written, each of the rank's sums walked a column of A (stride r). (x·A)·B: the outputs in tiles of
    TILE_LANES·vec held in registers across the rank, each row of B read contiguously, vectorized."""
    sch = s_tir.Schedule(func)
    try:
        blk = sch.get_sblock("lora_xa")
    except Exception:       # the (x·A)·B kernel
        blk = None
    if blk is not None:
        *lead, c, k = sch.get_loops(blk)
        i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        sch.reorder(i, k, c)
        sch.parallel(i)
        sch.decompose_reduction(blk, k)
    else:
        blk = sch.get_sblock("lora_delta")
        *lead, c, j = sch.get_loops(blk)
        i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        extent = sch.get(c).extent
        vec = _vec(extent)
        lanes = next((t for t in (TILE_LANES, 2) if isinstance(extent, tvm.tirx.IntImm)
                      and int(extent) % (t * vec) == 0), 1)
        co, cj, ci = sch.split(c, [None, lanes, vec])
        sch.reorder(i, co, j, cj, ci)
        acc = sch.cache_write(blk, 0, "local")
        sch.reverse_compute_at(acc, co)
        sch.unroll(cj)
        if vec > 1:
            sch.vectorize(ci)
            *_, acc_ci = sch.get_loops(acc)
            sch.vectorize(acc_ci)
        sch.parallel(sch.fuse(i, co))
        sch.decompose_reduction(blk, j)
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
        jo, jv, ji = sch.split(j, [None, SCORE_KEYS // VEC_LANES, VEC_LANES])   # keys padded to whole blocks
        sch.reorder(bhi, jo, d, jv, ji)
        acc = sch.cache_write(blk, 0, "local")        # a block of one query's scores in registers down d
        sch.reverse_compute_at(acc, jo)
        *_, acc_j = sch.get_loops(acc)
        _, acc_v = sch.split(acc_j, [None, VEC_LANES])
        sch.vectorize(acc_v)
        sch.unroll(jv)
        sch.vectorize(ji)
        sch.parallel(bhi)
        init = sch.decompose_reduction(blk, d)
        *_, init_j = sch.get_loops(init)
        _, init_v = sch.split(init_j, [None, VEC_LANES])
        sch.vectorize(init_v)
        _parallel_rows(sch, sch.get_sblock("kt"), 1)
        _parallel_rows(sch, sch.get_sblock("scores_epi"), 1)
    else:
        blk = sch.get_sblock("context")
        b_, i, h, d, j = sch.get_loops(blk)
        bih = sch.fuse(b_, i, h)
        sch.reorder(bih, j, d)
        acc = sch.cache_write(blk, 0, "local")        # one query's head of context in registers across the keys
        sch.reverse_compute_at(acc, bih)
        *_, acc_d = sch.get_loops(acc)
        sch.vectorize(acc_d)
        sch.parallel(bih)
        sch.vectorize(d)
        init = sch.decompose_reduction(blk, j)
        *_, init_d = sch.get_loops(init)
        sch.vectorize(init_d)
    return sch.mod["main"].with_attr("op_pattern", OPAQUE)


@tvm.transform.module_pass(opt_level=0, name="ScheduleLinears")
def ScheduleLinears(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Give edgeq's linear and attention kernels their CPU schedules (found by their name prefixes)."""
    updates = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(LINEAR_PREFIX):
            updates[gv] = schedule_linear(f, packed_pairs=gv.name_hint.endswith("int4_g32"))
        elif isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(LORA_PREFIX):
            updates[gv] = schedule_lora(f)
        elif isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(ATTENTION_PREFIX):
            updates[gv] = schedule_attention(f, "scores" if gv.name_hint.startswith(ATTENTION_PREFIX + "scores")
                                             else "context")
    for gv, f in updates.items():
        mod[gv] = f
    return mod


EDGEQ_PREFIXES = (LINEAR_PREFIX, LORA_PREFIX, ATTENTION_PREFIX)


def _static_rows_width(sch, infos) -> bool:
    """Whether every block's innermost loop (a row's width) is a static multiple of VEC_LANES."""
    for bi in infos:
        loops = sch.get_loops(bi.block_rv)
        ext = sch.get(loops[-1]).extent if loops else None
        if not (isinstance(ext, tvm.tirx.IntImm) and int(ext) % VEC_LANES == 0):
            return False
    return True


def schedule_rows(func: tirx.PrimFunc, target) -> tirx.PrimFunc | None:
    """A row-wise kernel whose rows have a static width (LayerNorm, RMSNorm, GELU, adds over the hidden size):
    dlight's CPU reduction rule where it has reductions (rows in parallel, each row's blocks under them,
    vectorized), else element-wise: producers inlined, rows in parallel, the row vectorized. None otherwise:
    a symbolic row (softmax over the keys) is left as plain loops, which LLVM vectorizes itself; dlight's rule
    splits it with a guard that scalarizes (MiniLM's softmax 17x slower), and parallel row loops over the
    symbolic shape measured 5x slower than the plain nest."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or not _static_rows_width(sch, infos):
        return None
    if not all(bi.is_injective() for bi in infos):
        red = dl.cpu.Reduction().apply(func, target, False)
        return red.mod["main"] if red is not None else None
    for bi in infos[:-1]:
        sch.compute_inline(bi.block_rv)
    loops = sch.get_loops(infos[-1].block_rv)
    if len(loops) < 2:
        return None
    sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    _, vec = sch.split(loops[-1], [None, VEC_LANES])
    sch.vectorize(vec)
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="ScheduleRest")
def ScheduleRest(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """The kernels TVM legalizes for edgeq's other ops (softmax, LayerNorm, RMSNorm, GELU, adds), after fusion:
    as legalized they are serial loops (MiniLM int8-dyn: GELU, softmax and LayerNorm took longer than all the
    linears). schedule_rows gives them rows in parallel; edgeq's own kernels keep theirs (ScheduleLinears), and
    a kernel it cannot schedule is left as it was."""
    from tvm.target import Target

    target = Target.current(allow_none=False)
    updates = {}
    for gv, f in mod.functions.items():
        if (not isinstance(f, tirx.PrimFunc) or gv.name_hint.startswith(EDGEQ_PREFIXES)
                or (f.attrs and f.attrs.get("tirx.is_scheduled"))):
            continue
        try:
            new = schedule_rows(f, target)
        except Exception:  # noqa: BLE001  (a shape the rule cannot schedule keeps TVM's plain loops)
            new = None
        if new is not None:
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
    for gv, f in updates.items():
        mod[gv] = f
    return mod
