"""The native runner (bin/edgeq-run): build times, sizes, and a bundle run under qemu-arm64-bare against the host.

    python bench/native_runner.py                       # cached build; SmolLM2 `--target android` exported here
    python bench/native_runner.py --cold                # also a first build in an empty cache (minutes)
    python bench/native_runner.py --bundle /tmp/smollm-android

Writes bench/results/native_runner.json. Timings under qemu are emulation, not a phone's speed; what they show
is that the bundle runs in a root with nothing installed and gives the host's greedy ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_times(cold: bool, march: str) -> dict:
    from edgeq.native import runner

    out: dict = {}
    if cold:
        cache = Path(tempfile.mkdtemp(prefix="native-cold-"))
        os.environ["EDGEQ_NATIVE_CACHE"] = str(cache)
        t0 = time.perf_counter()
        r = runner.build_runner(march, log=print)
        out["first_build_s"] = round(time.perf_counter() - t0, 1)
        out["llama_static_s"] = json.loads(next((cache / "llama").glob("*/build.json")).read_text())["build_seconds"]
        shutil.rmtree(r.path.parent)           # an edgeq upgrade: the runner again, over the cached libraries
        t0 = time.perf_counter()
        runner.build_runner(march)
        out["runner_rebuild_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    r = runner.build_runner(march)
    out["cached_lookup_ms"] = round(1000 * (time.perf_counter() - t0), 2)
    out.update(runner_bytes=r.path.stat().st_size, runner_build=r.info)
    if cold:
        shutil.rmtree(os.environ.pop("EDGEQ_NATIVE_CACHE"), ignore_errors=True)
    return out


def bundle_run(bundle: Path) -> dict:
    import numpy as np

    from edgeq import runtime
    from edgeq.bundle.reference import read_reference
    from edgeq.devices import checks, open_device
    from edgeq.evaluate.decoder import compare_logits

    m = json.loads((bundle / "manifest.json").read_text())
    sizes = {a["path"]: a["bytes"] for a in m["artifacts"]}
    du = int(subprocess.run(["du", "-sb", str(bundle)], capture_output=True, text=True).stdout.split()[0])
    dev = open_device("qemu-arm64-bare")
    try:
        res = checks.run_reference(dev, bundle, n_ctx=256, decode_tokens=8)
        assert res.ok, res.error
        dev_logits = [np.load(res.outputs / f) for f in res.result["files"]]    # before close() removes them
        gen = dev.run(dev.push(bundle), "generate", {"prompt": "The capital of France is", "max_tokens": 16})
    finally:
        dev.close()
    ids, ref = read_reference(bundle / "reference")
    with runtime.load(bundle, threads=1, n_ctx=256) as s:
        host = [s.logits(x) for x in ids]
        host_greedy = [s.generate_ids(x, 8) for x in ids]
        host_text = s.detokenize(s.generate_ids(s.tokenize("The capital of France is", True, False), 16))
    return {"bundle": str(bundle), "artifact_bytes": sizes, "listed_bytes": sum(sizes.values()), "folder_bytes": du,
            "qemu": {"verify_ms": res.response["native"]["timings_ms"]["verify"], "load_s": res.response["load_s"],
                     "wall_s": round(res.wall_s, 1),
                     "peak_rss_mib": None if res.peak_rss_bytes is None else round(res.peak_rss_bytes / 2**20, 1)},
            "greedy_equal_host": [g == h for g, h in zip(res.result["greedy"], host_greedy)],
            "argmax_agreement_host": [float(np.mean(np.array(a) == h.argmax(-1))) for a, h in
                                      zip(res.result["argmax"], host)],
            "max_abs_logit_diff_host": [float(np.abs(d - h).max()) for d, h in zip(dev_logits, host)],
            "device_vs_float": compare_logits(ref, dev_logits), "host_vs_float": compare_logits(ref, host),
            "continuation": {"device": gen.result.get("text"), "host": host_text}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="also time a first build in an empty cache (minutes)")
    ap.add_argument("--bundle", help="an android bundle (default: SmolLM2 exported here)")
    ap.add_argument("--out", default="bench/results/native_runner.json")
    a = ap.parse_args()
    from edgeq.api import ExportOptions, export
    from edgeq.targets.profiles import get_profile

    march = get_profile("android").native_march
    load = os.getloadavg()
    out = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load": [round(x, 2) for x in load]},
           "march": march, "build": build_times(a.cold, march)}
    print(json.dumps(out["build"]), flush=True)
    bundle = Path(a.bundle) if a.bundle else Path(tempfile.mkdtemp(prefix="native-bench-")) / "android"
    if not a.bundle:
        export(ExportOptions(target="android", out=str(bundle), calibration=False))
    out["run"] = bundle_run(bundle)
    print(json.dumps(out["run"]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
