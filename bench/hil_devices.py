"""What a HIL run costs per device: push, load, reference inputs, decode, peak memory, wall time.

Sizes CI's hardware-in-the-loop budget (the emulated device is the slow one)
and records the qemu-arm64 set-up time from its cache. Devices are given as
for pytest; the bundles are exported here (or passed with --bundle).

    python bench/hil_devices.py --device local --device qemu-arm64
    python bench/hil_devices.py --device local --device qemu-arm64 --bundle /tmp/smollm-android --bundle /tmp/minilm-int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def small_bundles(root: Path) -> list[Path]:
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
    from edgeq.api import ExportOptions, export

    src = graph_to_hf_folder(random_llama(tiny_config(vocab_size=384), seed=1, scale=0.08), root / "tiny-src",
                             byte_level_spec(384))
    export(ExportOptions(model=str(src), quant="q8_0", out=str(root / "tiny-gguf"), calibration=False))
    export(ExportOptions(model="all-MiniLM-L6-v2", backend="onnx", quant="int8", out=str(root / "minilm-int8")))
    return [root / "tiny-gguf", root / "minilm-int8"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", action="append", required=True)
    ap.add_argument("--bundle", action="append", help="bundle folders (default: a tiny gguf and MiniLM int8)")
    ap.add_argument("--out", default="bench/results/hil_devices.json")
    a = ap.parse_args()
    from edgeq.devices import checks, open_device
    from edgeq.devices.qemu_arm64 import ready_file

    tmp = Path(tempfile.mkdtemp(prefix="hil-bench-"))
    bundles = [Path(b) for b in a.bundle] if a.bundle else small_bundles(tmp)
    rows = []
    for spec in a.device:
        dev = open_device(spec)
        try:
            why = dev.unreachable_reason()
            if why:
                print(f"{dev.name}: skipped: {why}", file=sys.stderr)
                continue
            for b in bundles:
                t0 = time.perf_counter()
                dev.push(b)          # timed apart: run_reference finds it pushed
                push_s = time.perf_counter() - t0
                res = checks.run_reference(dev, b)
                fig = checks.compare(b, res) if res.ok else {"error": res.error}
                row = {"device": dev.name, "bundle": b.name, "push_s": round(push_s, 2), "wall_s": round(res.wall_s, 2),
                       "load_s": round(res.response.get("load_s", 0.0), 2),
                       "latency_s": [round(x, 4) for x in res.latency_s],
                       "decode_s_per_token": res.result.get("decode_s_per_token"),
                       "peak_rss_mib": None if res.peak_rss_bytes is None else round(res.peak_rss_bytes / 2**20, 1), "machine": res.response.get("machine"),
                       "figures": fig}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            dev.close()
    rf = ready_file()
    out = {"host": {"machine": platform.machine(), "cpus": os.cpu_count()}, "runs": rows,
           "qemu_arm64_setup": json.loads(rf.read_text()) if rf.is_file() else None}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
