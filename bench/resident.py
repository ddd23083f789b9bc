"""Resident memory of a GGUF decoder in edgeq.runtime beside llama-cpp-python's `Llama` on the same file.

Each variant runs in a fresh process (`--rounds` times, the order alternated): load with n_ctx 256, a 128-token
prompt and 16 greedy tokens, then the process's resident memory from /proc/self/status: the total, the anonymous
part (buffers the runtime allocated: repacked weights, KV cache, compute buffers) and the file-backed part (the
mapped GGUF pages still resident) and the peak (VmHWM), minus what the bare interpreter with the library
imported already held.
Per preset the medians; the CPU's flags and the load. Writes bench/results/resident.json and a bar chart.

Why it matters: llama.cpp maps the file and copies the tensors its kernels repack (x86: Q4_0, Q4_K, IQ4_NL)
into buffers of their own, and the pages it copied them from stay resident unless someone drops them
(`edgeq.runtime.memory.drop_pages`, which the GGUF backend does as llama.cpp loads and once after).

    python bench/resident.py                            # SmolLM2 q4_0, q4_k_m, q8_0, 3 rounds
    python bench/resident.py --presets q4_0,iq4_nl --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "resident.json"

PROBE = r"""
import json, sys
def status():
    d = {}
    for line in open("/proc/self/status"):
        k = line.split(":")[0]
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k] = int(line.split()[1]) / 1024
    return d
variant, bundle, model = sys.argv[1:4]
ids = list(range(100, 228))
if variant == "edgeq":
    from edgeq import runtime
    base = status()
    s = runtime.load(bundle, backend="gguf", n_ctx=256, threads=1)
    out = s.generate_ids(ids, 16)
else:
    import llama_cpp
    base = status()
    llm = llama_cpp.Llama(model_path=model, n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1, verbose=False)
    for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0)):
        if i == 15:
            break
after = status()
print(json.dumps({k: round(after[k] - base[k], 1) for k in after}))
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def probe(variant: str, bundle: Path) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", PROBE, variant, str(bundle), str(bundle / "model.gguf")],
                       check=False, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"{variant} on {bundle}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="q4_0,q4_k_m,q8_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-resident"))
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()

    from edgeq.api import ExportOptions, export

    with open("/proc/cpuinfo") as f:
        flags = next((ln.split(":")[1].split() for ln in f if ln.startswith("flags")), [])
    keep = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "asimddp", "i8mm")
    doc: dict[str, Any] = {"cpu_flags": [f for f in flags if f in keep], "load_before": os.getloadavg(),
                           "settings": {"n_ctx": 256, "prompt": 128, "generated": 16, "rounds": a.rounds},
                           "presets": {}}
    for preset in a.presets.split(","):
        bundle = a.work / preset
        if not (bundle / "manifest.json").is_file():
            log(f"exporting SmolLM2 {preset} ...")
            export(ExportOptions(backend="gguf", quant=preset, out=str(bundle), check=False, force=True))
        runs: dict[str, list[dict[str, float]]] = {"edgeq": [], "llama-cpp-python": []}
        for r in range(a.rounds):
            for v in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                runs[v].append(probe(v, bundle))
        file_mb = (bundle / "model.gguf").stat().st_size / 2**20
        row = {"file_mib": round(file_mb, 1)}
        for v, xs in runs.items():
            row[v] = {k: round(statistics.median(x[k] for x in xs), 1) for k in xs[0]}
        row["edgeq_over_llama_cpp_python"] = round(row["edgeq"]["VmRSS"] / row["llama-cpp-python"]["VmRSS"], 3)
        doc["presets"][preset] = row
        log(f"{preset}: file {file_mb:.1f} MiB; edgeq {row['edgeq']}; llama-cpp-python {row['llama-cpp-python']}")
    doc["load_after"] = os.getloadavg()
    print("| preset | file MiB | edgeq.runtime MiB (anon + file); peak | llama-cpp-python MiB (anon + file); peak "
          "| ratio |")
    print("|---|---|---|---|---|")
    for p, row in doc["presets"].items():
        e, ll = row["edgeq"], row["llama-cpp-python"]
        print(f"| {p} | {row['file_mib']} | {e['VmRSS']} ({e['RssAnon']} + {e['RssFile']}); {e['VmHWM']} | "
              f"{ll['VmRSS']} ({ll['RssAnon']} + {ll['RssFile']}); {ll['VmHWM']} | {row['edgeq_over_llama_cpp_python']} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, a.out.with_suffix(".png"))
    return 0


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(doc["presets"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, v in enumerate(("edgeq", "llama-cpp-python")):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(presets))]
        anon = [doc["presets"][p][v]["RssAnon"] for p in presets]
        mapped = [doc["presets"][p][v]["RssFile"] for p in presets]
        ax.bar(xs, anon, 0.36, color=("C0", "C1")[i], label=f"{v}: allocated")
        ax.bar(xs, mapped, 0.36, bottom=anon, color=("C0", "C1")[i], alpha=0.45, label=f"{v}: mapped file")
    ax.set_xticks(range(len(presets)), presets)
    ax.set_ylabel("resident MiB after load + 144 tokens")
    ax.set_title("SmolLM2-135M GGUF: resident memory, fresh process, n_ctx 256")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
