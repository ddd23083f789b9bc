"""Peak resident memory of a budgeted `edgeq plan`, per pass, with nothing cached.

    EDGEQ_CACHE=off python bench/plan_memory.py [--bpw 5] [--model PATH] [--out bench/results/plan_memory.json]
    EDGEQ_CACHE=off /usr/bin/time -v python bench/plan_memory.py --bpw 5 --frontier-formats --export DIR

`--export DIR` runs the whole budgeted export (plan, GPTQ writer, files; no check or speed run) instead of the plan,
`--frontier-formats` takes bench/planner_frontier.py's menu (every GGUF candidate but Q4_1/Q5_1), so the figure is
that bench's export's.

A thread samples the process's resident set (/proc/self/status VmRSS) every 20 ms while each pass runs, so the
table says which pass sets the peak and by how much it rises above what the pass started with. The whole run's
peak is the kernel's own high-water mark (VmHWM), the figure `/usr/bin/time -v` reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler:
    def __init__(self) -> None:
        self.label, self.peaks, self.start = "import", {}, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            rss = _status("VmRSS")
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), rss)

    def enter(self, label: str) -> None:
        self.label = label
        self.start.setdefault(label, _status("VmRSS"))

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpw", type=float, default=5.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--export", default=None, metavar="DIR", help="the whole export into DIR (check off)")
    ap.add_argument("--frontier-formats", action="store_true", help="bench/planner_frontier.py's formats")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_memory.json"))
    a = ap.parse_args()
    if os.environ.get("EDGEQ_CACHE") != "off":
        print("note: EDGEQ_CACHE is not off; cached calibration, Fisher or costs make the peak lower",
              file=sys.stderr)

    from edgeq.api import ExportOptions, export, plan
    from edgeq.core.formats.registry import candidate_formats
    from edgeq.compile import decide  # noqa: F401  (imports every pass class)
    from edgeq.passes.base import Pass

    sampler = Sampler()

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    for cls in set(subclasses(Pass)):
        if "run" in cls.__dict__:
            def wrapped(self, graph, plan_, ctx, _run=cls.__dict__["run"], _name=cls.name):
                sampler.enter(_name)
                try:
                    return _run(self, graph, plan_, ctx)
                finally:
                    sampler.enter("between passes")
            cls.run = wrapped
    t0 = time.perf_counter()
    sampler.enter("import model")
    formats = [f.name for f in candidate_formats("gguf") if f.name not in ("q4_1", "q5_1")] \
        if a.frontier_formats else None
    opts = ExportOptions(model=a.model, bpw=a.bpw, formats=formats)
    if a.export:
        r = export(replace(opts, out=a.export, force=True, check=False))
        predicted = r["manifest"]["model"]["bits_per_weight"]
    else:
        p = plan(opts, out=None)
        predicted = p.search.get("predicted_bpw") if p.search else None
    wall = time.perf_counter() - t0
    sampler.stop()
    res = {"bpw": a.bpw, "model": a.model or "default", "cache": os.environ.get("EDGEQ_CACHE", "on"),
           "peak_rss_bytes": _status("VmHWM"), "wall_s": round(wall, 1),
           "passes": {k: {"peak_rss_bytes": v, "rise_bytes": v - sampler.start.get(k, v)}
                      for k, v in sampler.peaks.items()},
           "export": a.export, "formats": formats, "plan_bpw": predicted}
    for k, v in res["passes"].items():
        print(f"{k:>16}: peak {v['peak_rss_bytes'] / 2**20:8.0f} MiB (+{v['rise_bytes'] / 2**20:.0f} MiB)")
    print(f"peak RSS (VmHWM): {res['peak_rss_bytes'] / 2**20:.0f} MiB, {wall:.0f} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
