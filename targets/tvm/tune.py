"""Optional meta-schedule tuning (`--tune-trials N`), its database cached per device profile.

Only the linear kernels with static shapes are tuned (the decoder's one-token
`decode` path: its matmuls, where decode time goes, are GEMVs of known shapes);
symbolic-shape kernels keep edgeq's fixed schedule, small element-wise ones the
default. The database lives in ~/.cache/edgeq/tvm-tune/<profile>/ (or
$EDGEQ_TVM_TUNE_DIR/<profile>) and is reused: a workload already in it is not
tuned again, so a second export of the same model costs no trials. Measuring
needs the device, so tuning runs where the library runs (the host profile).
The builder uses one worker with a long timeout: on two busy cores, parallel
builders time out (TRAPS.md). Tuned builds are not byte-identical (the search
is measured); untuned builds are.

Tuning never makes a kernel slower than the untuned build: edgeq's fixed
schedule of every tuned workload is measured with the same builder and runner
and committed as a tuning record of its own (its trace), so the database's best
record, which the build applies, is the faster of the fixed schedule and the
search's (a small trial budget leaves only the search's first random
candidates, often several times slower). A database written before these
records gets them on its next use. The static linear kernels stay unfused in
both the tasks and the build (build.ScheduleSymbolic); fused, the build's
kernels missed the database and ran unscheduled, which made SmolLM2's int4
decode 6x slower tuned than untuned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable

import tvm
from tvm import tirx

from edgeq.core.errors import EdgeqError
from edgeq.core.fs import atomic_write_bytes
from edgeq.targets.tvm.build import ScheduleSymbolic, symbolic_kernel
from edgeq.targets.tvm.ops import LINEAR_PREFIX
from edgeq.targets.tvm.schedule import linear_schedule

TUNE_DIR_ENV = "EDGEQ_TVM_TUNE_DIR"
BUILD_TIMEOUT_S = 600         # a kernel build in a fresh worker process, on two shared cores


def tune_dir(profile_name: str) -> Path:
    root = os.environ.get(TUNE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "edgeq", "tvm-tune")
    return Path(root) / profile_name


def _static(mod: tvm.IRModule) -> bool:
    return not any(isinstance(f, tirx.PrimFunc) and symbolic_kernel(f) for f in mod.functions.values())


def tuning_target(target: dict[str, Any]) -> dict[str, Any]:
    """Meta-schedule needs the core count in the target; tuned builds compile for this same target."""
    return {**target, "num-cores": max(1, os.cpu_count() or 1)}


def static_tasks(mod: tvm.IRModule, tgt: tvm.target.Target) -> list:
    """The tasks tune() tunes: what the tuned build compiles, the symbolic kernels already scheduled, the
    static linear ones open."""
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    return [t for t in extract_tasks(ScheduleSymbolic(mod), tgt)
            if LINEAR_PREFIX in t.task_name and _static(t.dispatched[0])]


def tune(mod: tvm.IRModule, target: dict[str, Any], profile, trials: int, host_runs: bool,
         log: Callable[[str], None] = lambda s: None):
    """The profile's tuning database after tuning `mod`'s untuned static kernels with `trials` trials in all."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    if trials < 0:
        raise EdgeqError(None, f"--tune-trials must be >= 0 (got {trials})")
    if not host_runs:
        raise EdgeqError(None, f"--tune-trials measures kernels on the device; profile {profile.name} does not run "
                               "on this machine (tune with --target cpu, or build untuned)")
    work = tune_dir(profile.name)
    work.mkdir(parents=True, exist_ok=True)
    with _locked(work):       # one tuner per database at a time; others wait
        dropped = repair_database(work)
        if dropped:
            log(f"tuning: dropped {dropped} torn or dangling lines of {work} (a tuning run was killed); their "
                "kernels are measured again")
        db = ms.database.JSONDatabase(path_workload=str(work / "workloads.json"),
                                      path_tuning_record=str(work / "records.json"), allow_missing=True)
        tgt = tvm.target.Target(target)
        tasks = static_tasks(mod, tgt)
        todo = [t for t in tasks if not _tuned(db, t)]
        log(f"tuning: {len(tasks)} static kernels, {len(tasks) - len(todo)} already in {work}, "
            f"{len(todo)} to tune with {trials} trials")
        if todo and trials > 0:
            contexts, weights = extracted_tasks_to_tune_contexts(todo, str(work / "logs"), num_threads=1, seed=0)
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work / "logs"), max_trials_global=trials,
                          num_trials_per_iter=min(16, max(1, trials)), builder=_builder(), runner=_runner(),
                          database=db)
        _add_fixed_records(db, tasks, tgt, log)
    return db


@contextlib.contextmanager
def _locked(work: Path):
    fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def repair_database(work: Path) -> int:
    """Drop what a killed run tore from meta-schedule's JSON-lines database (TVM appends a line per workload
    and per record, and its reader fails on a torn one): lines that do not parse, or do not end, and records
    whose workload index is not a complete workload line. Returns how many lines were dropped."""
    dropped = 0
    n_workloads = 0
    for name in ("workloads.json", "records.json"):
        path = work / name
        if not path.is_file():
            continue
        raw = path.read_bytes()
        keep = []
        for line in raw.splitlines(keepends=True):
            try:
                v = json.loads(line) if line.endswith(b"\n") and line.strip() else None
            except (UnicodeDecodeError, ValueError, RecursionError):
                v = None
            ok = isinstance(v, list) and len(v) == 2
            if ok and name == "records.json":
                ok = type(v[0]) is int and 0 <= v[0] < n_workloads
            if ok and not (name == "workloads.json" and dropped):     # records index workloads by line:
                keep.append(line)                                     # none after a torn one is kept
            elif line.strip():
                dropped += 1
        if name == "workloads.json":
            n_workloads = len(keep)
        fixed = b"".join(keep)
        if fixed != raw:
            atomic_write_bytes(path, fixed)
    return dropped


def _builder():
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S)


def _runner():
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S)


def fixed_schedule(task):
    """edgeq's fixed schedule (schedule.py) of a task's workload, as the untuned build gives that kernel; None
    where it does not apply (a workload fused beyond one linear kernel)."""
    try:
        return linear_schedule(task.dispatched[0]["main"], packed_pairs="int4_g32" in task.task_name)
    except (RuntimeError, ValueError):     # a schedule or lookup error
        return None


def is_fixed_record(record, fixed) -> bool:
    return fixed is not None and str(record.trace) == str(fixed.trace)


def _records(db, workload) -> list:
    return list(db.get_top_k(db.commit_workload(workload), 1 << 30)) if db.has_workload(workload) else []


def _tuned(db, task) -> bool:
    """Whether the search has measured this workload (a record other than the fixed schedule's)."""
    fixed = fixed_schedule(task)
    return any(not is_fixed_record(r, fixed) for r in _records(db, task.dispatched[0]))


def _add_fixed_records(db, tasks, tgt, log) -> None:
    """Measure the fixed schedule of each workload that lacks its record and commit it, so the database's best
    record per workload is whichever of the fixed schedule and the search's candidates runs faster."""
    from tvm.s_tir import meta_schedule as ms

    todo = []
    for t in tasks:
        fixed = fixed_schedule(t)
        if fixed is not None and not any(is_fixed_record(r, fixed) for r in _records(db, t.dispatched[0])):
            todo.append((t, fixed))
    if not todo:
        return
    log(f"tuning: measuring the fixed schedule of {len(todo)} kernels")
    built = _builder().build([ms.builder.BuilderInput(fixed.mod, tgt) for _, fixed in todo])
    args = [ms.arg_info.ArgInfo.from_prim_func(t.dispatched[0]["main"]) for t, _ in todo]
    runs = _runner().run([ms.runner.RunnerInput(b.artifact_path, "cpu", a)
                          for b, a in zip(built, args) if b.error_msg is None])
    runs = iter(runs)
    for (t, fixed), b, a in zip(todo, built, args):
        res = next(runs).result() if b.error_msg is None else None
        if res is None or res.error_msg is not None:
            log(f"tuning: the fixed schedule of {t.task_name} did not run: {(b.error_msg or res.error_msg)[:200]}")
            continue
        db.commit_tuning_record(ms.database.TuningRecord(fixed.trace, db.commit_workload(t.dispatched[0]),
                                                         run_secs=[float(s) for s in res.run_secs], target=tgt,
                                                         args_info=a))
