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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import tvm
from tvm import tirx

from edgeq.errors import EdgeqError

TUNE_DIR_ENV = "EDGEQ_TVM_TUNE_DIR"
BUILD_TIMEOUT_S = 600         # a kernel build in a fresh worker process, on two shared cores


def tune_dir(profile_name: str) -> Path:
    root = os.environ.get(TUNE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "edgeq", "tvm-tune")
    return Path(root) / profile_name


def _static(mod: tvm.IRModule) -> bool:
    from edgeq.targets.tvm.build import symbolic_kernel

    return not any(isinstance(f, tirx.PrimFunc) and symbolic_kernel(f) for f in mod.functions.values())


def tuning_target(target: dict[str, Any]) -> dict[str, Any]:
    """Meta-schedule needs the core count in the target; tuned builds compile for this same target."""
    return {**target, "num-cores": max(1, os.cpu_count() or 1)}


def tune(mod: tvm.IRModule, target: dict[str, Any], profile, trials: int, host_runs: bool,
         log: Callable[[str], None] = lambda s: None):
    """The profile's tuning database after tuning `mod`'s untuned static kernels with `trials` trials in all."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks, extracted_tasks_to_tune_contexts

    if trials < 0:
        raise EdgeqError(None, f"--tune-trials must be >= 0 (got {trials})")
    if not host_runs:
        raise EdgeqError(None, f"--tune-trials measures kernels on the device; profile {profile.name} does not run "
                               "on this machine (tune with --target cpu, or build untuned)")
    work = tune_dir(profile.name)
    work.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(path_workload=str(work / "workloads.json"),
                                  path_tuning_record=str(work / "records.json"), allow_missing=True)
    tgt = tvm.target.Target(target)
    from edgeq.targets.tvm.build import ScheduleSymbolic
    from edgeq.targets.tvm.ops import LINEAR_PREFIX

    # what the tuned build compiles: the symbolic kernels already scheduled, the static ones open
    tasks = [t for t in extract_tasks(ScheduleSymbolic(mod), tgt)
             if LINEAR_PREFIX in t.task_name and _static(t.dispatched[0])]
    todo = [t for t in tasks if not db.has_workload(t.dispatched[0])]
    log(f"tuning: {len(tasks)} static kernels, {len(tasks) - len(todo)} already in {work}, "
        f"{len(todo)} to tune with {trials} trials")
    if todo and trials > 0:
        contexts, weights = extracted_tasks_to_tune_contexts(todo, str(work / "logs"), num_threads=1, seed=0)
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work / "logs"), max_trials_global=trials,
                      num_trials_per_iter=min(16, max(1, trials)),
                      builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S),
                      runner=ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S), database=db)
    return db
