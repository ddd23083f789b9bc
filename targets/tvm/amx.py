"""int8_dyn_rows linears on Intel AMX (x86 `amx-int8`: tile registers, `tdpbssd`), for many-row calls (encoders).

One AVX-512 VNNI `vpdpbusd` does 16 x 4 multiply-adds; one AMX `tdpbssd` does 16 x 16 x 64 on 8 tile registers
(16 rows of 64 bytes each). MiniLM's int8 linears on VNNI ran at ~0.25 T multiply-adds/s a core, onnxruntime's
`quantize_dynamic` (its MLAS kernels use AMX on this CPU) at ~0.55, this kernel's matmul alone at ~1.4.

The kernel is written as plain TIR (no schedule applies), the same integers as dot.py's VNNI kernel, so the
library agrees with formats.int8.int8_dyn_rows_matmul to the float rounding of the rescale:

1. quantize: each row (rows in parallel) scaled by max|x|/127 and rounded half to even into an int8 scratch
   of whole 32-row blocks (padding rows repeat the last row); signed activations (`tdpbssd` multiplies signed
   by signed bytes), so no +128 shift and no weight-sum correction.
2. matmul: each parallel task owns 32 outputs: per block of 32 rows, 4 accumulator tiles (2 row tiles x 2
   output tiles) summed over the input in steps of 64 (2 activation tiles, 2 weight tiles), stored to the
   task's 32 x 32 int32 scratch (L1), then rescaled (sum * x_scale * w_scale + bias, GELU when fused) into
   the output. The weights are dot.py's blocks unchanged: 16 outputs by 4 inputs contiguous, so one weight
   tile (16 outputs by 64 inputs) is 16 consecutive 64-byte rows.

The process must be granted the tile state by the kernel (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM)`), once per
process: runtime/tvm_backend.request_amx() does it when it loads a library built with these kernels (the
manifest's tvm section says `int8_kernels: amx`).
Scratch is passed as extra call outputs (noalias arguments), as attention.py does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tvm.script import tirx as T

from edgeq.runtime.tvm_backend import request_amx
from edgeq.targets.tvm.dot import DOT_IN, DOT_OUT

ROWS = 32            # rows per block: two 16-row tiles
OUTS = 32            # outputs per parallel task: two 16-column accumulator tiles
STEP = 64            # inputs per tile step: 64 bytes a tile row
AMX_FEATURES = ["amx-tile", "amx-int8"]
AMX_PREFIX = "edgeq_amx_linear_"


def has_amx(target: dict[str, Any]) -> bool:
    """Whether an (x86, resolved) llvm target has AMX int8 (its mcpu, e.g. sapphirerapids, or its mattr)."""
    if target.get("kind") != "llvm" or str(target.get("mtriple", "")).startswith("aarch64"):
        return False
    import tvm
    from tvm.target import codegen

    return bool(codegen.llvm_cpu_has_features(AMX_FEATURES, tvm.target.Target(target)))


def amx_target(target: dict[str, Any], host: bool) -> dict[str, Any] | None:
    """The target to build AMX kernels for, or None. `host`: the target is this machine's CPU (the "cpu"
    profile), whose LLVM name may not say AMX (under a hypervisor LLVM saw this Sapphire Rapids as `rocketlake`):
    its /proc/cpuinfo flags then add the features — where Linux grants this process the tile state: a host whose
    kernel refuses it (older than 5.16, or a hypervisor that hides it) builds VNNI kernels, as its bundle could not
    load AMX ones."""
    if has_amx(target):
        return target
    if host and target.get("kind") == "llvm" and _host_flags() >= {"amx_tile", "amx_int8"} and request_amx():
        return {**target, "mattr": [*target.get("mattr", []), *(f"+{f}" for f in AMX_FEATURES)]}
    return None


def _host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def uses_amx(mod) -> bool:
    """Whether a lowered module has AMX kernels (its library then needs the tile state granted at run time)."""
    return any(gv.name_hint.startswith(AMX_PREFIX) for gv in mod.functions)


def fits(k_dim: int, n_dim: int) -> bool:
    """Shapes the kernel takes (others stay on dot.py's VNNI kernel)."""
    return k_dim % STEP == 0 and n_dim % OUTS == 0 and k_dim % DOT_IN == 0 and n_dim % DOT_OUT == 0


def split(n_dim: int) -> int:
    """Output parts per row block (tasks for two threads even for one row block)."""
    return 2 if (n_dim // OUTS) % 2 == 0 else 1


def _tile(name: str, *args):
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def amx_linear_kernel(k_dim: int, n_dim: int, gelu: bool = False):
    """y[b, s, n] = (Σ_k q[b, s, k] w[n, k]) * x_scale[b, s] * w_scale[n] + bias[n] (GELU after when `gelu`), for
    symbolic batch and sequence; q the rows of x quantized per row. Arguments: x, the weight blocks, w_scale, bias;
    outputs y and the scratch (int8 rows, row scales, the tasks' int32 tiles)."""
    from edgeq.targets.tvm.gelu import gelu_expr

    K, N, NT, KT = k_dim, n_dim, n_dim // OUTS, k_dim // STEP
    SPLIT = split(n_dim)                 # noqa: N806
    f127 = T.float32(127.0)

    def epilogue(v):
        return gelu_expr(v) if gelu else v

    @T.prim_func(private=True)
    def amx_linear(x_h: T.handle, w_h: T.handle, ws_h: T.handle, b_h: T.handle, y_h: T.handle,
                   xq_h: T.handle, xs_h: T.handle, acc_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch, seq = T.int64(), T.int64()
        x = T.match_buffer(x_h, (batch, seq, K), "float32")
        w = T.match_buffer(w_h, (N // DOT_OUT, K // DOT_IN, DOT_OUT, DOT_IN), "int8")
        w_scale = T.match_buffer(ws_h, (N,), "float32")
        bias = T.match_buffer(b_h, (N,), "float32")
        y = T.match_buffer(y_h, (batch, seq, N), "float32")
        rows = T.meta_var(batch * seq)
        blocks = T.meta_var((batch * seq + T.int64(ROWS - 1)) // T.int64(ROWS))
        xq = T.match_buffer(xq_h, (blocks * T.int64(SPLIT * ROWS), K), "int8")
        xs = T.match_buffer(xs_h, (blocks * T.int64(SPLIT * ROWS),), "float32")
        acc = T.match_buffer(acc_h, (blocks * T.int64(SPLIT), ROWS * OUTS), "int32")
        # one parallel loop (one wait for the workers per call: on a loaded machine each wait can cost a time
        # slice): a task is one block of 32 rows and its outputs (or a part of them); it quantizes its rows itself
        # parts = SPLIT only for a single row block (two tasks for two threads); more blocks are whole-row tasks, so
        # no row is quantized twice (its divisions cost ~0.05 ms per 128 x 1536 call)
        parts = T.meta_var(T.Select(blocks >= T.int64(2), T.int64(1), T.int64(SPLIT)))
        for task in T.parallel(blocks * parts):
            red = T.decl_buffer((16,), "float32", scope="local")
            cfg = T.decl_buffer((64,), "uint8", scope="local")
            m0 = T.meta_var(task // parts * T.int64(ROWS))
            q0 = T.meta_var(task * T.int64(ROWS))
            for i in T.serial(ROWS):
                r = T.meta_var(T.min(m0 + T.int64(i), rows - T.int64(1)))
                for l in T.vectorized(16):
                    red[l] = T.float32(0)
                for ko in T.serial(K // 16):
                    for l in T.vectorized(16):
                        red[l] = T.max(red[l], T.fabs(x[r // seq, r % seq, ko * 16 + l]))
                for l in T.serial(15):
                    red[0] = T.max(red[0], red[l + 1])
                xs[q0 + T.int64(i)] = T.Select(red[0] > T.float32(0), red[0] / f127, T.float32(1.0))
                for ko in T.serial(K // 16):
                    for l in T.vectorized(16):
                        xq[q0 + T.int64(i), ko * 16 + l] = T.Cast("int8", T.Cast("int32", T.max(T.min(
                            T.round(x[r // seq, r % seq, ko * 16 + l] / xs[q0 + T.int64(i)]), f127), -f127)))
            for i in T.serial(64):
                cfg[i] = T.uint8(0)
            cfg[0] = T.uint8(1)                       # palette 1; 8 tiles of 16 rows x 64 bytes
            for t in T.serial(8):
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(16)
            _tile("ldtilecfg", T.address_of(cfg[0]))
            for nj in T.serial(T.int64(NT) // parts):
                nt = T.meta_var(task % parts * (T.int64(NT) // parts) + nj)
                for t in T.unroll(4):
                    _tile("tilezero", T.uint8(t))
                for kb in T.serial(KT):
                    _tile("tileloadd64", T.uint8(4), T.address_of(xq[q0, kb * STEP]), T.int64(K))
                    _tile("tileloadd64", T.uint8(5), T.address_of(xq[q0 + T.int64(16), kb * STEP]), T.int64(K))
                    _tile("tileloadd64", T.uint8(6), T.address_of(w[nt * T.int64(2), kb * 16, 0, 0]), T.int64(64))
                    _tile("tileloadd64", T.uint8(7), T.address_of(w[nt * T.int64(2) + T.int64(1), kb * 16, 0, 0]),
                          T.int64(64))
                    _tile("tdpbssd", T.uint8(0), T.uint8(4), T.uint8(6))
                    _tile("tdpbssd", T.uint8(1), T.uint8(4), T.uint8(7))
                    _tile("tdpbssd", T.uint8(2), T.uint8(5), T.uint8(6))
                    _tile("tdpbssd", T.uint8(3), T.uint8(5), T.uint8(7))
                # tile (row half i, output half j) -> the task's 32 x 32 sums, row-major (128-byte rows)
                _tile("tilestored64", T.uint8(0), T.address_of(acc[task, 0]), T.int64(OUTS * 4))
                _tile("tilestored64", T.uint8(1), T.address_of(acc[task, 16]), T.int64(OUTS * 4))
                _tile("tilestored64", T.uint8(2), T.address_of(acc[task, 16 * OUTS]), T.int64(OUTS * 4))
                _tile("tilestored64", T.uint8(3), T.address_of(acc[task, 16 * OUTS + 16]), T.int64(OUTS * 4))
                for i in T.serial(ROWS):
                    if m0 + T.int64(i) < rows:
                        for j in T.vectorized(OUTS):
                            y[(m0 + T.int64(i)) // seq, (m0 + T.int64(i)) % seq, nt * T.int64(OUTS) + T.int64(j)] = \
                                epilogue(T.Cast("float32", acc[task, i * OUTS + j]) * xs[q0 + T.int64(i)]
                                         * w_scale[nt * T.int64(OUTS) + T.int64(j)]
                                         + bias[nt * T.int64(OUTS) + T.int64(j)])
            _tile("tilerelease")

    return amx_linear


def emit_amx_linear(bb, x, ws: list, bias, hint: str, gelu: bool = False):
    """The AMX kernel on (batch, seq, in) `x` with int8_dyn_rows parameters `ws` (blocks, scale, sum: the sum is
    not read) and `bias`; returns y (batch, seq, out)."""
    from tvm import relax

    b, s, k_dim = x.ty.shape.values
    n_dim = int(ws[0].ty.shape.values[0]) * DOT_OUT
    gv = bb.add_func(amx_linear_kernel(int(k_dim), n_dim, gelu), f"{AMX_PREFIX}{hint}")
    tasks = (b * s + (ROWS - 1)) // ROWS * split(n_dim)
    outs = [relax.TensorType((b, s, n_dim), "float32"), relax.TensorType((tasks * ROWS, int(k_dim)), "int8"),
            relax.TensorType((tasks * ROWS,), "float32"), relax.TensorType((tasks, ROWS * OUTS), "int32")]
    return bb.emit(relax.TupleGetItem(bb.emit(relax.call_tir(gv, [x, ws[0], ws[1], bias], outs)), 0))
