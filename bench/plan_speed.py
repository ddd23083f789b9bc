"""How long `edgeq plan` takes for SmolLM2-135M from nothing cached (target: <= 5 minutes on 2 cores).

    python bench/plan_speed.py [--bpw 5.0] [--ranks 0] [--method ilp] [--profile]

Runs the same code as `edgeq plan --bpw X` in this process with caching off (EDGEQ_CACHE=off), and reports
the wall time and this process's CPU time in total and per pass (calibration = the reference executor over
the calibration windows; fisher = 2 windows forward and backward in torch, the default cost's weights;
sensitivity = every tensor x candidate format through ggml's quantizer and the cost; allocate = the ILP).
CPU seconds are reported beside wall seconds because the machine
is shared: the wall time of one run depends on the neighbours' load. --profile adds the top functions
(cProfile, cumulative). Writes bench/results/plan_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpw", type=float, default=5.0)
    ap.add_argument("--ranks", default="0")
    ap.add_argument("--method", default="ilp")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--cost", default="auto", help="as edgeq plan --cost (auto: Fisher when torch is installed)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_speed.json"))
    args = ap.parse_args()
    os.environ["EDGEQ_CACHE"] = "off"

    from edgeq.compile.options import ExportOptions
    from edgeq.compile.pipeline import decide_all, prepare

    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    w0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    opts = ExportOptions(bpw=args.bpw, method=args.method, ranks=[int(r) for r in args.ranks.split(",")],
                         calib_windows=args.calib_windows, cost=args.cost)
    c = prepare(opts, None, None, several_allowed=False)

    cpu: dict[str, float] = {}
    runs = {}           # wall time per pass comes from run_passes (ctx.timings); CPU time per pass from here
    for cls_path in ("edgeq.passes.calibrate:Calibrate", "edgeq.passes.fisher:Fisher",
                     "edgeq.passes.sensitivity:Sensitivity",
                     "edgeq.passes.allocate:Allocate", "edgeq.passes.allocate_dynaquant:AllocateDynaQuant",
                     "edgeq.passes.lowrank_compensate:LowrankCompensate"):
        mod, name = cls_path.split(":")
        cls = getattr(__import__(mod, fromlist=[name]), name)
        runs[cls] = cls.run

        def timed(self, g, p, c, _run=cls.run, _name=name):
            t = time.process_time()
            try:
                return _run(self, g, p, c)
            finally:
                cpu[_name] = round(time.process_time() - t, 2)
        cls.run = timed
    plan = decide_all(c, opts, branches=False)["gguf"].plan
    wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    for cls, run in runs.items():
        cls.run = run
    if prof:
        prof.disable()
    res = {"settings": {**vars(args), **threads, "cpu_count": os.cpu_count()}, "wall_s": round(wall, 1),
           "cpu_s": round(total_cpu, 1), "pass_wall_s": c.ctx.timings, "pass_cpu_s": cpu,
           "predicted_mb": plan.search["predicted_mb"], "target_s": 300, "meets_target_wall": wall <= 300,
           "load_average_after": os.getloadavg()}
    if prof:
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        res["profile_top"] = s.getvalue().splitlines()[:60]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "profile_top"}, indent=1))
    if prof:
        print("\n".join(res["profile_top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
