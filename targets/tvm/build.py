"""Build a Relax module for a device profile and export it as that device loads it.

- `cpu`: llvm for the host (its CPU detected by LLVM), a `.so` linked by the host compiler.
- `linux-arm64`: llvm for aarch64-linux-gnu with NEON, a `.so` linked by Debian's cross g++.
- `android`: llvm for aarch64-linux-android; a `.so` linked by the NDK's clang when one is named
  (`--ndk-clang` or EDGEQ_ANDROID_CLANG), else a `.tar` of objects (link it on the device side).

Same inputs give byte-identical libraries. That took two things (the README says so too):
TVM's VMShapeLower emits the stores of a symbolic-shape host function in hash order
(pointer addresses), so `_SortShapeStores` puts independent stores in slot order after
the default pipeline; and a `.tar` is repacked with fixed names, times and owners.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import tvm
from tvm import relax, tirx

from edgeq.core.errors import EdgeqError
from edgeq.targets.tvm.ops import LINEAR_PREFIX
from edgeq.targets.tvm.schedule import OPAQUE, ScheduleLinears, ScheduleRest, schedule_linear

ANDROID_CLANG_ENV = "EDGEQ_ANDROID_CLANG"
ARM64_LINUX_CXX = "aarch64-linux-gnu-g++"
CUDA_ARCH = "sm_80"


def resolve_target(profile) -> dict[str, Any]:
    """The profile's TVM target as a dict; plain `llvm` becomes llvm for this host's CPU."""
    t = profile.tvm_target
    if t == "llvm":
        from tvm.target import codegen

        return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())}
    if isinstance(t, dict) and t.get("kind") == "llvm":
        t = dict(t)
        if "+dotprod" in (profile.native_march or "") and "+dotprod" not in t.get("mattr", []):
            # the device's -march has the dot-product extension (sdot/udot): int8_dyn_rows kernels use it
            t["mattr"] = [*t.get("mattr", []), "+dotprod"]
        return t
    if t == "cuda":
        # no GPU to detect here: a fixed architecture (Ampere, sm_80) keeps the build the same on every machine
        return {"kind": "cuda", "arch": CUDA_ARCH, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                "thread_warp_size": 32, "host": {"kind": "llvm"}}
    raise EdgeqError(None, f"the TVM backend builds llvm and cuda targets; profile {profile.name} wants {t!r}")


def is_gpu(target: dict[str, Any]) -> bool:
    return target.get("kind") == "cuda"


def library_kind(profile, ndk_clang: str | None) -> str:
    """`so` or `tar`: what `export_library` writes for this profile."""
    return "tar" if profile.os == "android" and not ndk_clang else "so"


@tvm.transform.module_pass(opt_level=0, name="SortShapeStores")
def _SortShapeStores(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Put the independent slot stores of host shape functions in slot order (VMShapeLower emits hash order)."""
    updates = {}
    for gv, f in mod.functions.items():
        if not isinstance(f, tirx.PrimFunc) or not f.attrs or "tirx.is_host_func" not in f.attrs:
            continue
        body = f.body
        if not isinstance(body, tirx.SeqStmt) or not all(isinstance(s, tirx.BufferStore) for s in body.seq):
            continue
        stores = list(body.seq)
        if len({s.buffer.name for s in stores}) != 1 or not all(
                len(s.indices) == 1 and isinstance(s.indices[0], tvm.tirx.IntImm) for s in stores):
            continue
        buf = stores[0].buffer.name
        written = [int(s.indices[0]) for s in stores]
        texts = [s.value.script() if hasattr(s.value, "script") else str(s.value) for s in stores]
        if any(f"{buf}[T.int64({k})]" in t for k in written for t in texts):
            continue                       # a store reads another one's slot: keep the order
        stores.sort(key=lambda s: int(s.indices[0]))
        updates[gv] = f.with_body(tirx.SeqStmt(stores))
    for gv, f in updates.items():
        mod[gv] = f
    return mod


_CHECKS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")


@tvm.transform.module_pass(opt_level=0, name="DropWeightChecks")
def _DropWeightChecks(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Drop the per-call dtype/shape checks of weight parameters whose shapes are static (after VMShapeLower).

    A decode step checked each of SmolLM2's ~270 weight arrays twice per call (~550 VM builtin calls, ~1.2 ms
    of a ~25 ms step, best of 10 at 2 threads). The weights are the params file the manifest pins by SHA-256
    beside this library, built together, so a static shape cannot differ; parameters with a symbolic dimension
    (LoRA factors of any rank, a pruned MLP's widths) keep their checks, and so do the model's inputs. Applies
    to functions carrying decoder.WEIGHTS_FROM."""
    from edgeq.targets.tvm.decoder import WEIGHTS_FROM

    updates = {}
    for gv, f in mod.functions.items():
        if not isinstance(f, relax.Function) or not f.attrs or WEIGHTS_FROM not in f.attrs:
            continue
        weights = {p.name for p in list(f.params)[int(f.attrs[WEIGHTS_FROM]):] if _static(p)}   # names: unique

        def keep(b) -> bool:
            v = b.value
            return not (isinstance(v, relax.Call) and isinstance(v.op, relax.ExternFunc)
                        and str(v.op.global_symbol) in _CHECKS and len(v.args) and isinstance(v.args[0], relax.Var)
                        and v.args[0].name in weights)

        blocks = [relax.BindingBlock([b for b in blk.bindings if keep(b)]) if not isinstance(blk, relax.DataflowBlock)
                  else blk for blk in f.body.blocks]
        updates[gv] = relax.Function(f.params, relax.SeqExpr(blocks, f.body.body), f.ret_ty, f.is_pure, f.attrs,
                                     f.span)
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def _static(param) -> bool:
    shape = getattr(param.ty, "shape", None)
    return isinstance(shape, relax.ShapeExpr) and all(isinstance(v, tirx.IntImm) for v in shape.values)


def _shapes(text: str, marker: str):
    """(dims text, rest of the line) of each shape tuple opened by `marker` in a kernel's TVMScript
    (this TVM exposes no buffer map on PrimFunc)."""
    for m in re.finditer(re.escape(marker), text):
        depth, i = 1, m.end()
        while depth:                      # the shape tuple, up to its closing parenthesis
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[m.end():i - 1], text[i:text.find("\n", i)]


def _is_symbolic(dims: str) -> bool:
    return bool(re.sub(r"T\.int64\(\d+\)|T\.int32\(\d+\)|\d+|[\s,]", "", dims))


def _symbolic_scratch(f: tirx.PrimFunc) -> bool:
    """Whether a scheduled kernel allocates per-thread (local) scratch of a symbolic size (CUDA codegen refuses it)."""
    return any('scope="local"' in rest and _is_symbolic(dims) for dims, rest in _shapes(f.script(), "alloc_buffer(("))


def symbolic_kernel(f: tirx.PrimFunc) -> bool:
    """Whether a kernel's arguments have symbolic shapes (a sequence or cache length)."""
    return any(_is_symbolic(dims) for dims, _ in _shapes(f.script(), "T.Buffer(("))


@tvm.transform.module_pass(opt_level=0, name="DlightGpu")
def _DlightGpu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """dlight's default GPU rules per kernel; where the matmul rule tiles a symbolic extent into scratch of
    symbolic size (the one-token attention over the cache), the fallback rule (threads over the outputs)."""
    from tvm.s_tir import dlight as dl

    full = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                   dl.gpu.Fallback())
    safe = dl.ApplyDefaultSchedule(dl.gpu.Fallback())
    unscheduled = dict(mod.functions.items())         # the pass may update `mod` in place
    out = full(mod)
    for gv, f in list(out.functions.items()):
        if isinstance(f, tirx.PrimFunc) and _symbolic_scratch(f):
            out[gv] = safe(tvm.IRModule({gv: unscheduled[gv]}))[gv]
    return out


def _gpu_pipeline(tgt):
    from tvm.relax.backend.cuda import pipeline as rp

    @tvm.transform.module_pass(opt_level=0, name="EdgeqGpuPipeline")
    def pipeline(m: tvm.IRModule, _ctx) -> tvm.IRModule:
        with tgt:
            return tvm.transform.Sequential([
                *rp.library_dispatch_passes(tgt), relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(), _DlightGpu,
                *rp.dataflow_lower_passes(tgt), *rp.finalize_passes(tgt)])(m)

    return pipeline


def compile_module(mod: tvm.IRModule, target: dict[str, Any], tuning_db=None):
    """Relax -> VM executable.

    CPU, untuned: edgeq's fixed linear/attention schedule (schedule.py), TVM's CPU passes, and the legalized kernels
    between them scheduled (schedule.ScheduleRest: rows in parallel, vectorized).
    CUDA: the same passes with every kernel scheduled by dlight's GPU rules (`_DlightGpu`); TVM 0.27 embeds
    the kernels as CUDA source in the library's `cuda` module, compiled on the device when it is loaded.
    Tuned (a meta-schedule database from tune.py): the fixed schedule only for kernels with symbolic
    shapes (those are not tuned), the database's schedules for the others.
    """
    tgt = tvm.target.Target(target)
    if is_gpu(target):
        return tvm.compile(mod, target=tgt, relax_pipeline=tvm.transform.Sequential([_gpu_pipeline(tgt),
                                                                                      _SortShapeStores]))
    from tvm.relax.backend.cpu_generic import pipeline as rp

    if tuning_db is None:
        @tvm.transform.module_pass(opt_level=0, name="EdgeqCpuPipeline")
        def fixed(m: tvm.IRModule, _ctx) -> tvm.IRModule:
            with tgt:     # TVM's default CPU pipeline with the kernels it leaves as plain loops scheduled
                return tvm.transform.Sequential([
                    ScheduleLinears, *rp.library_dispatch_passes(tgt), *rp.legalize_passes(tgt), ScheduleRest,
                    *rp.dataflow_lower_passes(tgt), *rp.finalize_passes(tgt), _DropWeightChecks,
                    _SortShapeStores])(m)

        return tvm.compile(mod, target=tgt, relax_pipeline=fixed)

    @tvm.transform.module_pass(opt_level=0, name="TunedPipeline")
    def tuned(m: tvm.IRModule, _ctx) -> tvm.IRModule:
        with tgt:
            return tvm.transform.Sequential([*rp.dataflow_lower_passes(tgt), *rp.finalize_passes(tgt),
                                             _SortShapeStores])(tuned_kernels(m, tgt))

    with tuning_db:
        return tvm.compile(mod, target=tgt, relax_pipeline=tuned)


def tuned_kernels(mod: tvm.IRModule, tgt) -> tvm.IRModule:
    """The tuned build's module once its kernels are scheduled: the symbolic ones fixed, the static linear ones
    from the tuning database in scope (its best record each), the rest as TVM leaves them."""
    from tvm.relax.backend.cpu_generic import pipeline as rp

    with tgt:
        m = tvm.transform.Sequential([ScheduleSymbolic, *rp.library_dispatch_passes(tgt),
                                      *rp.legalize_passes(tgt)])(mod)
        return _ScheduleUntunedLinears(relax.transform.MetaScheduleApplyDatabase()(m))


@tvm.transform.module_pass(opt_level=0, name="ScheduleUntunedLinears")
def _ScheduleUntunedLinears(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Linear kernels the database has no schedule for (the trial budget ran out) get the fixed one."""
    funcs = {}
    for gv, f in mod.functions.items():
        if (isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(LINEAR_PREFIX)
                and not (f.attrs and f.attrs.get("tirx.is_scheduled")) and not symbolic_kernel(f)):
            f = schedule_linear(f)
        funcs[gv] = f
    return tvm.IRModule(funcs, attrs=mod.attrs)


@tvm.transform.module_pass(opt_level=0, name="ScheduleSymbolic")
def ScheduleSymbolic(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """The fixed CPU schedule for the symbolic-shape kernels only (tuning takes the static ones). The static
    linear kernels are marked opaque as the fixed schedule marks them: left fusable, FuseOps merges the
    following add, silu or multiply into them, and the build then compiles fused kernels that are neither in
    the tuning database (tuned unfused) nor named as linear kernels, so they ran unscheduled (serial loops)."""
    picked = tvm.IRModule({gv: f for gv, f in mod.functions.items()
                           if isinstance(f, tirx.PrimFunc) and symbolic_kernel(f)})
    done = dict(ScheduleLinears(picked).functions.items())
    for gv, f in mod.functions.items():
        if gv not in done and isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(LINEAR_PREFIX):
            done[gv] = f.with_attr("op_pattern", OPAQUE)
    return tvm.IRModule({gv: done.get(gv, f) for gv, f in mod.functions.items()}, attrs=mod.attrs)  # a new module


def export_library(executable, path: Path, profile, ndk_clang: str | None = None) -> Path:
    """Write the library for the profile (`.so` or `.tar`) at `path` (its suffix is set here) and return it."""
    kind = library_kind(profile, ndk_clang)
    path = path.with_suffix("." + kind)
    if kind == "tar":
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "lib.tar"
            executable.export_library(str(raw))
            _repack_tar(raw, path)
        return path
    fcompile = None
    if profile.os == "android":
        clang = shutil.which(ndk_clang) or (ndk_clang if os.path.isfile(ndk_clang) else None)
        if clang is None:
            raise EdgeqError(ndk_clang, "Android NDK clang not found (give the path of e.g. "
                                        "aarch64-linux-android24-clang++)")
        from tvm.support import cc

        fcompile = cc.cross_compiler(clang, options=["-shared", "-fPIC", "-static-libstdc++"])
    elif profile.isa == "arm64" and os.uname().machine not in ("aarch64", "arm64"):
        if shutil.which(ARM64_LINUX_CXX) is None:
            raise EdgeqError(ARM64_LINUX_CXX, "cross compiler not found; install g++-aarch64-linux-gnu "
                                              "(./install.sh does on Debian)")
        from tvm.support import cc

        fcompile = cc.cross_compiler(ARM64_LINUX_CXX)
    if fcompile is None:
        executable.export_library(str(path))
    else:
        executable.export_library(str(path), fcompile=fcompile)
    return path


def _repack_tar(src: Path, dst: Path) -> None:
    """The same members, sorted, with zero times and owners: a tar that depends only on its contents."""
    with tarfile.open(src) as t_in, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as t_out:
        members = sorted((m for m in t_in.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            data = t_in.extractfile(m).read()
            info = tarfile.TarInfo(os.path.basename(m.name))
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            t_out.addfile(info, io.BytesIO(data))
