"""edgeq.runtime's decode and prefill speed beside llama.cpp itself (llama-bench) and llama-cpp-python's own loop.

Measured, on the same files and threads, round by round with the order reversed every other round (a shared
machine's load hits every variant alike):

* `llama-bench` tg64 and pp128, built with cmake from the llama.cpp source llama-cpp-python vendors (the same
  version, GGML_NATIVE and OpenMP as the wheel), once, then cached under ~/.cache/edgeq/native/llama-bench/;
  run with its defaults (flash attention `auto`: on for the CPU, as the runtime runs f16 and q8_0 caches) and
  with `-fa 0` (the unfused attention, which the runtime keeps for f32 caches);
* edgeq.runtime per backend in the bundle: decode = `Session.generate_ids` of 64 greedy tokens after a one-token
  prompt (64 decode steps and 64 draws, as tg64 decodes 64 tokens), prefill = `generate_ids` of one token after
  a 128-token prompt (the time to the first token: one 128-token decode and a draw);
* llama-cpp-python's high-level `Llama`: `generate` (greedy) for 64 tokens, `eval` of 128 tokens and a draw.

Per variant the median tokens/s and its spread (min, p10, p90, max over rounds x repeats); the ratios to
llama-bench; the CPU's flags, `uptime` before and after. Writes bench/results/runtime.json.

    python bench/runtime.py                      # SmolLM2 q4_0 (gguf) + int4 (onnx), 2 threads, 7 rounds
    python bench/runtime.py --bundle out/ --threads 4 --rounds 9
    python bench/runtime.py --tvm                # also a TVM int4 bundle (a long compile)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "runtime.json"
BENCH_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               # as the wheel (install.sh): no AMX kernels, which crash on Sapphire Rapids virtual machines
               "-DCMAKE_C_FLAGS=-U__AMX_INT8__", "-DCMAKE_CXX_FLAGS=-U__AMX_INT8__"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- llama-bench, built once from llama-cpp-python's llama.cpp -----------------------------------------------------

def cpu_flags() -> list[str]:
    from edgeq.runtime.latency import device_facts

    return device_facts()["flags"]


def llama_bench() -> Path:
    """The host's llama-bench for the installed llama-cpp-python's llama.cpp: built on first use (minutes), then
    from the cache. GGML_NATIVE (the default) compiles for this CPU, so the key holds its flags."""
    from edgeq.native import llama_source
    from edgeq.native.runner import build_once, cache_root

    version = llama_source.llama_version()
    key = hashlib.sha256(json.dumps([BENCH_FLAGS, cpu_flags()]).encode()).hexdigest()[:10]
    final = cache_root() / "llama-bench" / f"{version}-{key}"

    def build(tmp: Path) -> dict:
        with llama_source.unpacked_tree(cache_root() / "src", "llama-bench build", tmp.parent) as (src, work):
            bdir = work / "build"
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            for cmd in (["cmake", *generator, "-S", str(src), "-B", str(bdir), *BENCH_FLAGS],
                        ["cmake", "--build", str(bdir), "--target", "llama-bench", "-j", str(os.cpu_count() or 1)]):
                res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                if res.returncode != 0:
                    sys.exit(f"llama-bench build failed: {' '.join(cmd[:3])}: {res.stdout.strip()[-2000:]}")
            shutil.copy2(next(p for p in bdir.rglob("llama-bench") if p.is_file()), tmp / "llama-bench")
        return {"llama_cpp_python": version, "cmake_flags": BENCH_FLAGS}

    return build_once(final, build, log, f"llama-bench from llama.cpp {version} (this CPU)") / "llama-bench"


def run_llama_bench(exe: Path, model: Path, threads: int, reps: int, fa: str | None) -> dict[str, list[float]]:
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-p", "128", "-n", "64", "-r", str(reps), "-o", "json"]
    if fa is not None:
        cmd += ["-fa", fa]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out: dict[str, list[float]] = {}
    for row in json.loads(res.stdout):
        kind = "prefill" if row["n_prompt"] else "decode"
        out[kind] = [float(x) for x in row["samples_ts"]]
        out.setdefault("info", []).append({k: row.get(k) for k in ("build_commit", "cpu_info", "n_threads",
                                                                   "flash_attn", "type_k", "n_batch", "n_ubatch")})
    return out


# --- edgeq.runtime and llama-cpp-python ------------------------------------------------------------------------

def bench_ids(session, n_vocab: int) -> tuple[list[int], list[int]]:
    """A 128-token prompt of held-out text, and a one-token prompt after which greedy decoding runs 64 tokens
    without an end-of-generation token."""
    from edgeq.evaluate.texts import evaluation_text

    ids = session.tokenize(evaluation_text()[:4000], add_special=False, parse_special=False)
    assert len(ids) >= 200, "the evaluation text is too short"
    for t in ids:
        if len(session.generate_ids([t], 64)) == 64:
            return ids[:128], [t]
    raise SystemExit("no one-token prompt decodes 64 tokens without stopping")


def edgeq_variant(bundle: Path, backend: str, threads: int, reps: int):
    from edgeq import runtime

    s = runtime.load(bundle, backend=backend, threads=threads)
    pp_ids, tg_ids = bench_ids(s, s.backend.n_vocab)

    def measure() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"decode": [], "prefill": []}
        for _ in range(reps):
            t0 = time.perf_counter()
            n = len(s.generate_ids(tg_ids, 64))
            out["decode"].append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            s.generate_ids(pp_ids, 1)
            out["prefill"].append(len(pp_ids) / (time.perf_counter() - t0))
        return out
    return s, pp_ids, tg_ids, measure


def llama_cpp_python_variant(model: Path, n_ctx: int, threads: int, reps: int, pp_ids, tg_ids):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def measure() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"decode": [], "prefill": []}
        for _ in range(reps):
            llm.reset()
            t0 = time.perf_counter()
            n = len(list(islice(llm.generate(tg_ids, temp=0.0, reset=True), 64)))
            out["decode"].append(n / (time.perf_counter() - t0))
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(pp_ids)
            llm.sample(temp=0.0)
            out["prefill"].append(len(pp_ids) / (time.perf_counter() - t0))
        return out
    return llm, measure


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2),
            "p10": round(float(np.percentile(xs, 10)), 2), "p90": round(float(np.percentile(xs, 90)), 2),
            "max": round(max(xs), 2), "n": len(xs)}


def uptime() -> dict[str, Any]:
    text = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"uptime": text, "load_average": [round(x, 2) for x in os.getloadavg()]}


def default_bundle(path: Path, tvm: bool) -> Path:
    """SmolLM2 (the embedded default model) as q4_0 GGUF + int4 ONNX in one bundle (one calibration), and TVM
    int4 beside it with --tvm; exported once into `path`."""
    from edgeq.api import ExportOptions, export

    if not (path / "manifest.json").is_file():
        log(f"exporting SmolLM2 gguf=q4_0,onnx=int4 to {path} ...")
        export(ExportOptions(backend="all", quant="gguf=q4_0,onnx=int4", out=str(path), check=False))
    if tvm and not (path.with_name(path.name + "-tvm") / "manifest.json").is_file():
        log("exporting SmolLM2 tvm int4 ...")
        export(ExportOptions(backend="tvm", quant="int4", out=str(path.with_name(path.name + "-tvm")), check=False))
    return path


def document(settings: dict, host: dict, start: dict, end: dict, exe: Path, info: dict,
             samples: dict[str, dict[str, list[float]]], rounds_done: int) -> dict[str, Any]:
    stats = {k: {kind: spread(xs) for kind, xs in v.items()} for k, v in samples.items()}
    ratios = {ref: {k: {kind: round(stats[k][kind]["median"] / stats[ref][kind]["median"], 3)
                        for kind in ("decode", "prefill")} for k in stats if k != ref}
              for ref in ("llama-bench", "llama-bench -fa 0")}
    g = ratios["llama-bench"].get("edgeq.runtime gguf")
    return {"settings": settings, "rounds_done": rounds_done, "host": host, "uptime_start": start, "uptime_end": end,
            "llama_bench": {"binary": str(exe), "runs": info}, "tokens_per_s": stats, "ratio": ratios,
            "goal": None if g is None else {"decode_ge_0.9x_llama_bench": g["decode"] >= 0.9,
                                             "prefill_ge_0.9x_llama_bench": g["prefill"] >= 0.9},
            "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="a decoder bundle (default: SmolLM2 gguf=q4_0,onnx=int4, exported "
                                                "once to /tmp/edgeq-bench-runtime)")
    ap.add_argument("--tvm", action="store_true", help="with the default bundle: also TVM int4")
    ap.add_argument("--backends", help="comma-separated backends of the bundle to time (default: all it has)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3, help="repeats of each measurement per round")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    from edgeq.runtime.latency import device_facts

    bundle = args.bundle or default_bundle(Path("/tmp/edgeq-bench-runtime"), args.tvm)
    manifest = json.loads((bundle / "manifest.json").read_text())
    arts = {a["backend"]: a for a in manifest["artifacts"] if a.get("role") == "model"}
    bundles = {b: bundle for b in arts}
    tvm_dir = bundle.with_name(bundle.name + "-tvm")
    if args.bundle is None and args.tvm:
        bundles["tvm"] = tvm_dir
    wanted = args.backends.split(",") if args.backends else list(bundles)
    if "gguf" not in bundles:
        sys.exit(f"{bundle}: no gguf artifact; llama-bench needs one")
    model = bundle / arts["gguf"]["path"]

    exe = llama_bench()
    start = uptime()
    log(f"start: {start['uptime']}")
    variants: dict[str, Callable[[], dict[str, list[float]]]] = {}
    keep = []
    for b in wanted:
        s, pp_ids, tg_ids, measure = edgeq_variant(bundles[b], b, args.threads, args.reps)
        keep.append(s)
        variants[f"edgeq.runtime {b}"] = measure
        if b == "gguf":
            llm, m = llama_cpp_python_variant(model, s.n_ctx, args.threads, args.reps, pp_ids, tg_ids)
            keep.append(llm)
            variants["llama-cpp-python Llama"] = m
    variants["llama-bench"] = lambda: run_llama_bench(exe, model, args.threads, args.reps, None)
    variants["llama-bench -fa 0"] = lambda: run_llama_bench(exe, model, args.threads, args.reps, "0")

    samples: dict[str, dict[str, list[float]]] = {k: {"decode": [], "prefill": []} for k in variants}
    info: dict[str, Any] = {}
    settings = {"bundle": str(bundle), "model": str(model), "model_bytes": model.stat().st_size,
                "formats": {b: a.get("formats") for b, a in arts.items()}, "threads": args.threads,
                "rounds": args.rounds, "reps": args.reps, "decode_tokens": 64, "prefill_tokens": 128,
                "command": " ".join(["python", "bench/runtime.py", *sys.argv[1:]])}
    host = device_facts(["llama-cpp-python", "onnxruntime", "apache-tvm"])
    for fn in variants.values():          # warm-up: page the weights in, start the thread pools
        fn()
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            got = variants[name]()
            if "info" in got:
                info[name] = got.pop("info")
            for kind, xs in got.items():
                samples[name][kind] += xs
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {statistics.median(v['decode']):.1f}/{statistics.median(v['prefill']):.0f}"
            for k, v in samples.items()))
        doc = document(settings, host, start, uptime(), exe, info, samples, r + 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")       # after every round: a cut-short run keeps its data
    stats, ratios, end = doc["tokens_per_s"], doc["ratio"], doc["uptime_end"]
    print(f"{'variant':28s} {'decode tok/s (p10-p90)':>26s} {'prefill tok/s (p10-p90)':>28s}  x llama-bench")
    for k, v in stats.items():
        d, p = v["decode"], v["prefill"]
        r = ratios["llama-bench"].get(k, {"decode": 1.0, "prefill": 1.0})
        print(f"{k:28s} {d['median']:9.1f} ({d['p10']:6.1f}-{d['p90']:6.1f}) {p['median']:11.1f} "
              f"({p['p10']:6.1f}-{p['p90']:6.1f})  {r['decode']:.2f} / {r['prefill']:.2f}")
    print(f"load: {start['uptime']} -> {end['uptime']}; wrote {args.out}")


if __name__ == "__main__":
    main()
