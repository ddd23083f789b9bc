"""LoRA adapters kept apart from the base (`--adapter-mode separate`) against merged, per backend, on SmolLM2.

Two random nonzero LoRA adapters (rank 16 on every linear of every layer, PEFT's file layout, alpha = 2r) are
written for SmolLM2 (its float weights: the shipped Q4_1 dequantized). Per backend:

- fidelity: KLD against the float model with the adapter merged (edgeq's merge, which tests/test_adapters.py
  holds equal to PEFT's merge_and_unload to 1e-5), on held-out text, for a separate f32 base, a separate
  q4-class base (gguf q4_0, onnx int4, tvm int4) and the adapter merged into the same q4-class preset (both
  calibrated by the same pipeline: separate on the base alone, merged on the merged model);
- times on the q4-class separate bundle: loading the base (runtime.load, checksums included and not) and, per
  round in one session, every kind of switch (`SWITCHES`: the first use of each adapter, which reads its file,
  between adapters already read, between an adapter and a combination with it, to and from the base, to another
  weight and back), medians of `--rounds`, each against the verified load;
- decode tokens/s: the separate base with adapter A applied, the merged bundle, and the separate base with no
  adapter, interleaved round by round (`--tokens` decoded after a short prompt, median);
- resident memory: RSS after loading the base, after applying A, after A and B, after B alone, after the base
  again (read in a fresh process per backend, see `rss_probe`), against the adapters' file sizes;
- TVM only, SHiRA (PEFT layout, r·(in+out) random entries per weight: a rank-r LoRA's parameter count) on an f16
  base beside LoRA A: fidelity against its merged float model, first switch, later switches, back to the base.

    python bench/adapters.py                                  # all backends, 1 thread
    python bench/adapters.py --backends gguf,onnx --chunks 1  # quicker look
    python bench/adapters.py --switch-only                    # every kind of switch against the base load

Writes bench/results/adapters.json (`--switch-only`: bench/results/adapters_switch.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import ReferenceCache, log, versions  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
Q4 = {"gguf": "q4_0", "onnx": "int4", "tvm": "int4"}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm_folder(work: Path) -> Path:
    from edgeq.importers.gguf import import_gguf
    from edgeq.models.recipes.default import default_model_path
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.runtime.tokenizer import spec_from_gguf_metadata

    folder = work / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").exists():
        graph = import_gguf(default_model_path())
        spec = spec_from_gguf_metadata(graph.metadata["gguf"], default_model_path())
        graph_to_hf_folder(graph, folder, spec, dtype="F32", shard_bytes=200 * 2**20)
    return folder


def linear_modules(base: Path):
    """(PEFT module name, out, in) of every targeted linear of the model."""
    from edgeq.importers.hf import import_hf

    graph = import_hf(base)
    for i in range(graph.config.n_layers):
        for leaf in MODULES:
            part = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            module = f"model.layers.{i}.{part}.{leaf}"
            yield (module, *graph.weights[module + ".weight"].shape)


def random_lora(folder: Path, base: Path, rank: int, seed: int, std: float) -> Path:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) with random nonzero A and B."""
    from safetensors.numpy import save_file

    if (folder / "adapter_model.safetensors").exists():
        return folder
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, out_f, in_f in linear_modules(base):
        key = f"base_model.model.{module}"
        tensors[key + ".lora_A.weight"] = (rng.standard_normal((rank, in_f)) * std).astype(np.float32)
        tensors[key + ".lora_B.weight"] = (rng.standard_normal((out_f, rank)) * std).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES),
        "bias": "none", "base_model_name_or_path": base.name}, indent=1))
    return folder


def random_shira(folder: Path, base: Path, r: int, seed: int, std: float) -> Path:
    """A PEFT-layout SHiRA adapter on the same modules: r·(in + out) random positions per weight (PEFT's count,
    as many parameters as a rank-r LoRA), random values."""
    from safetensors.numpy import save_file

    if (folder / "adapter_model.safetensors").exists():
        return folder
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, out_f, in_f in linear_modules(base):
        flat = rng.choice(out_f * in_f, size=r * (in_f + out_f), replace=False)
        key = f"base_model.model.{module}"
        tensors[key + ".shira_indices"] = np.stack([flat // in_f, flat % in_f]).astype(np.int64)
        tensors[key + ".shira_weight"] = (rng.standard_normal(flat.size) * std).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "SHIRA", "r": r, "target_modules": list(MODULES), "base_model_name_or_path": base.name},
        indent=1))
    return folder


def export(out: Path, base: Path, backend: str, quant: str, adapters: list[str], mode: str) -> float:
    from edgeq.api import ExportOptions, export as run_export

    t0 = time.perf_counter()
    if not (out / "manifest.json").exists():
        run_export(ExportOptions(model=str(base), target="cpu", backend=backend, quant=quant, out=str(out),
                                 force=True, adapters=adapters, adapter_mode=mode))
    dt = time.perf_counter() - t0
    log(f"exported {out.name} in {dt:.1f} s")
    return dt


def decode_run(session, prompt: list[int], n: int) -> float:
    """Seconds per decoded token after `prompt` (greedy, one token per call through the KV cache)."""
    session.backend.reset()
    logits = session.backend.feed(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = session.backend.feed([int(np.argmax(logits))])
    return (time.perf_counter() - t0) / n


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_probe(bundle: str, backend: str, threads: int) -> dict[str, int]:
    """Run in a fresh process: resident memory after the base, after adapter A, after A and B together, after B
    alone and after the base again, each after two 64-token logits calls (TVM's allocator pool settles on the
    second) and after returning the heap this probe's own dropped logits arrays left (`*_untrimmed`: before)."""
    from edgeq import runtime
    from edgeq.runtime.memory import release_freed_heap

    ids = list(range(100, 164))
    out = {}
    s = runtime.load(bundle, backend=backend, threads=threads, verify=False)
    for key, choice in (("base", None), ("A", ["A"]), ("A+B", ["A", "B"]), ("B", ["B"]), ("base again", {})):
        if choice is not None:
            s.set_adapters(choice)
        s.logits(ids)
        s.logits(ids)
        out[key + "_untrimmed"] = rss_bytes()
        release_freed_heap()
        out[key] = rss_bytes()
    s.close()
    return out


def median_ms(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3}


def bench_backend(backend: str, base: Path, ads: dict[str, Path], work: Path, refs: dict[str, ReferenceCache],
                  args: argparse.Namespace) -> dict[str, Any]:
    from edgeq import runtime
    from edgeq.evaluate.bundle import evaluate_bundle

    q4 = Q4[backend]
    both = [f"{ads['A']}=A", f"{ads['B']}=B"]
    b = {"sep_f32": work / f"{backend}-sep-f32", "sep_q4": work / f"{backend}-sep-{q4}",
         "merged_q4": work / f"{backend}-merged-{q4}"}
    row: dict[str, Any] = {"backend": backend, "q4_preset": q4, "export_s": {}}
    row["export_s"]["sep_f32"] = export(b["sep_f32"], base, backend, "f32", both, "separate")
    row["export_s"]["sep_q4"] = export(b["sep_q4"], base, backend, q4, both, "separate")
    row["export_s"]["merged_q4"] = export(b["merged_q4"], base, backend, q4, [str(ads["A"])], "merged")

    def kld(bundle: Path, use: dict | None, ref: str) -> dict[str, float]:
        r = evaluate_bundle(bundle, ctx=args.ctx, chunks=args.chunks, reference_logits=refs[ref], backend=backend,
                            threads=args.threads, record=False, pareto=False, use_adapters=use)
        return {k: r[k] for k in ("kld_mean", "kld_p99", "top1", "ppl", "ppl_reference")}

    fid = {"sep_f32+A": kld(b["sep_f32"], {"A": 1.0}, "A"), "sep_q4+A": kld(b["sep_q4"], {"A": 1.0}, "A"),
           "merged_q4(A)": kld(b["merged_q4"], None, "A"), "sep_q4 no adapter vs A": kld(b["sep_q4"], None, "A"),
           "sep_q4+B": kld(b["sep_q4"], {"B": 1.0}, "B")}
    fid["ratio_sep_over_merged_q4"] = fid["sep_q4+A"]["kld_mean"] / fid["merged_q4(A)"]["kld_mean"]
    row["fidelity"] = fid
    log(f"{backend}: fidelity {json.dumps({k: v if isinstance(v, float) else v['kld_mean'] for k, v in fid.items()})}")

    m = json.loads((b["sep_q4"] / "manifest.json").read_text())
    files = {a["name"]: a["bytes"] for a in m["artifacts"] if a.get("role") == "lora"}
    row["adapter_file_bytes"] = files
    row["base_file_bytes"] = sum(a["bytes"] for a in m["artifacts"] if a["backend"] == backend
                                 and a.get("role") != "lora")

    row.update(switch_times(b["sep_q4"], backend, args.rounds, args.threads))
    # llama.cpp only marks its graph for re-reservation on a switch: the first token after it pays the rest
    s = runtime.load(b["sep_q4"], backend=backend, threads=args.threads, verify=False)
    token_after_switch, token = [], []
    for i in range(2 * args.rounds):
        s.set_adapters(["A" if i % 2 == 0 else "B"])
        t0 = time.perf_counter()
        s.backend.feed([100])
        token_after_switch.append(time.perf_counter() - t0)
        s.backend.reset()
        t0 = time.perf_counter()
        s.backend.feed([100])
        token.append(time.perf_counter() - t0)
        s.backend.reset()
    s.close()
    row["first_token_after_switch"] = median_ms(token_after_switch)
    row["first_token_no_switch"] = median_ms(token)

    prompt = list(range(200, 232))
    sessions = {"separate+A": runtime.load(b["sep_q4"], backend=backend, threads=args.threads, adapters=["A"]),
                "merged": runtime.load(b["merged_q4"], backend=backend, threads=args.threads),
                "separate, no adapter": runtime.load(b["sep_q4"], backend=backend, threads=args.threads)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        decode_run(s, prompt, 4)                        # warm-up
    for r in range(args.rounds):
        for k in (list(sessions) if r % 2 == 0 else list(reversed(list(sessions)))):
            times[k].append(decode_run(sessions[k], prompt, args.tokens))
    for s in sessions.values():
        s.close()
    row["decode_tok_s"] = {k: {"median": 1 / statistics.median(v), "min": 1 / max(v), "max": 1 / min(v)}
                           for k, v in times.items()}
    row["unmerged_latency_over_merged"] = statistics.median(times["separate+A"]) / statistics.median(times["merged"])

    probe = subprocess.run([sys.executable, __file__, "--rss-probe", str(b["sep_q4"]), backend, str(args.threads)],
                           capture_output=True, text=True, timeout=900)
    if probe.returncode == 0:
        rss = json.loads(probe.stdout.strip().splitlines()[-1])
        row["rss_bytes"] = rss
        row["rss_growth_over_file"] = {"A": (rss["A"] - rss["base"]) / files["A"],
                                       "B": (rss["A+B"] - rss["A"]) / files["B"],
                                       "B alone after A+B": (rss["B"] - rss["base"]) / files["B"],
                                       "base again, both read": (rss["base again"] - rss["base"])
                                       / (files["A"] + files["B"]),
                                       "A, untrimmed": (rss["A_untrimmed"] - rss["base_untrimmed"]) / files["A"],
                                       "B, untrimmed": (rss["A+B_untrimmed"] - rss["A_untrimmed"]) / files["B"]}
    else:
        row["rss_error"] = probe.stderr.strip().splitlines()[-1:]
    if backend == "tvm" and "S" in ads:
        row["shira"] = bench_shira(base, ads, work, refs, args)
    log(f"{backend}: {json.dumps({k: row[k] for k in ('load_base', 'switch', 'decode_tok_s')})}")
    return row


# every kind of switch, in the order a round makes them (one session per round, after a base load): (name, choice)
SWITCHES = (("first A", ["A"]), ("first B", ["B"]), ("B to A", ["A"]), ("A to B", ["B"]), ("B to A+B", ["A", "B"]),
            ("A+B to A", ["A"]), ("A to A+B", ["A", "B"]), ("A+B to base", {}), ("base to A", ["A"]),
            ("A to base", {}), ("base to A+B", ["A", "B"]), ("A+B to A:0.5", {"A": 0.5}), ("A:0.5 to A", ["A"]))


def switch_times(bundle: Path, backend: str, rounds: int, threads: int) -> dict[str, Any]:
    """Per round: the base loaded with its checksums (the yardstick) and without, then in that session every kind
    of switch (`SWITCHES`: first use, between adapters already read, between an adapter and a combination with
    it, to and from the base, to another weight and back), each timed alone; medians over the rounds and each
    median over the verified load's."""
    from edgeq import runtime

    loads, loads_unverified = [], []
    times: dict[str, list[float]] = {k: [] for k, _ in SWITCHES}
    for _ in range(rounds):
        t0 = time.perf_counter()
        runtime.load(bundle, backend=backend, threads=threads).close()
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        s = runtime.load(bundle, backend=backend, threads=threads, verify=False)
        loads_unverified.append(time.perf_counter() - t0)
        for k, choice in SWITCHES:
            t0 = time.perf_counter()
            s.set_adapters(choice)
            times[k].append(time.perf_counter() - t0)
        s.close()
    load = statistics.median(loads)
    out: dict[str, Any] = {"load_base": median_ms(loads), "load_base_unverified": median_ms(loads_unverified),
                           "switches": {k: {**median_ms(v), "over_load": statistics.median(v) / load}
                                        for k, v in times.items()}}
    out["first_switch"] = median_ms(times["first A"] + times["first B"])
    out["switch"] = median_ms(times["B to A"] + times["A to B"])
    out["switch_over_load"] = out["switch"]["median_ms"] / out["load_base"]["median_ms"]
    out["worst_switch_over_load"] = max(v["over_load"] for v in out["switches"].values())
    return out


def switch_table(rows: list[dict[str, Any]]) -> str:
    """Each kind of switch's median ms and its share of the verified base load, per backend."""
    lines = ["| switch | " + " | ".join(f"{r['backend']} ({r['q4_preset']})" for r in rows) + " |",
             "|---|" + "---|" * len(rows),
             "| load base (verified) | " + " | ".join(f"{r['load_base']['median_ms']:.0f} ms" for r in rows) + " |"]
    for k, _ in SWITCHES:
        lines.append(f"| {k} | " + " | ".join(f"{r['switches'][k]['median_ms']:.1f} ms "
                                               f"({r['switches'][k]['over_load']:.3f}x)" for r in rows) + " |")
    lines.append("| worst / load | " + " | ".join(f"{r['worst_switch_over_load']:.3f}x" for r in rows) + " |")
    return "\n".join(lines)


def bench_shira(base: Path, ads: dict[str, Path], work: Path, refs: dict[str, ReferenceCache],
                args: argparse.Namespace) -> dict[str, Any]:
    """TVM f16 base with LoRA A and SHiRA S (same parameter count): switch times of each, S's fidelity."""
    from edgeq import runtime
    from edgeq.evaluate.bundle import evaluate_bundle

    bundle = work / "tvm-sep-f16-shira"
    export(bundle, base, "tvm", "f16", [f"{ads['A']}=A", f"{ads['S']}=S"], "separate")
    out: dict[str, Any] = {}
    for name in ("A", "S"):
        r = evaluate_bundle(bundle, ctx=args.ctx, chunks=args.chunks, reference_logits=refs[name], backend="tvm",
                            threads=args.threads, record=False, pareto=False, use_adapters={name: 1.0})
        out[f"kld_f16+{name}"] = r["kld_mean"]
    r = evaluate_bundle(bundle, ctx=args.ctx, chunks=args.chunks, reference_logits=refs["S"], backend="tvm",
                        threads=args.threads, record=False, pareto=False)
    out["kld_f16 no adapter vs S"] = r["kld_mean"]
    out.update(shira_switch_times(bundle, args.rounds, args.threads))
    log(f"tvm shira: {json.dumps(out)}")
    return out


def shira_switch_times(bundle: Path, rounds: int, threads: int) -> dict[str, Any]:
    """First switch (file read) and later switches to LoRA A and to SHiRA S, and back to the base, on TVM."""
    from edgeq import runtime

    first: dict[str, list[float]] = {"A": [], "S": []}
    switch: dict[str, list[float]] = {"A": [], "S": []}
    back: dict[str, list[float]] = {"A": [], "S": []}
    for _ in range(rounds):
        s = runtime.load(bundle, backend="tvm", threads=threads, verify=False)
        for name in ("A", "S"):
            t0 = time.perf_counter()
            s.set_adapters([name])
            first[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s.set_adapters({})
            back[name].append(time.perf_counter() - t0)
        for _ in range(3):
            for name in ("A", "S"):
                t0 = time.perf_counter()
                s.set_adapters([name])
                switch[name].append(time.perf_counter() - t0)
                s.set_adapters({})
        s.close()
    m = json.loads((bundle / "manifest.json").read_text())
    out: dict[str, Any] = {"file_bytes": {a["name"]: a["bytes"] for a in m["artifacts"] if a.get("role") == "lora"}}
    for name in ("A", "S"):
        out[f"first_switch_{name}"] = median_ms(first[name])
        out[f"switch_{name}"] = median_ms(switch[name])
        out[f"back_to_base_{name}"] = median_ms(back[name])
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | KLD sep f32+A | KLD sep q4+A | KLD merged q4 | ratio | load base ms | first switch ms | "
             "switch ms | decode tok/s sep+A / merged / base | RSS growth / file (A, B) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, d = r["fidelity"], r["decode_tok_s"]
        g = r.get("rss_growth_over_file", {})
        lines.append(
            f"| {r['backend']} ({r['q4_preset']}) | {f['sep_f32+A']['kld_mean']:.2e} | {f['sep_q4+A']['kld_mean']:.4f} "
            f"| {f['merged_q4(A)']['kld_mean']:.4f} | {f['ratio_sep_over_merged_q4']:.2f} "
            f"| {r['load_base']['median_ms']:.0f} | {r['first_switch']['median_ms']:.1f} "
            f"| {r['switch']['median_ms']:.2f} | {d['separate+A']['median']:.1f} / {d['merged']['median']:.1f} / "
            f"{d['separate, no adapter']['median']:.1f} | {g.get('A', float('nan')):.2f}, "
            f"{g.get('B', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="gguf,onnx,tvm")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--std", type=float, default=0.05, help="standard deviation of the random A and B entries")
    ap.add_argument("--shira-std", type=float, default=0.02,
                    help="standard deviation of the SHiRA adapter's values (tvm only)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/edgeq-bench-adapters")
    ap.add_argument("--out", default=str(DEFAULT_OUT / "adapters.json"))
    ap.add_argument("--shira-switch-only", action="store_true",
                    help="only time the TVM LoRA/SHiRA switches again on the bundle of an earlier run (--work), into "
                         "the JSON's rows[tvm].shira_switch_rerun")
    ap.add_argument("--switch-only", action="store_true",
                    help="only time every kind of switch (and the base load) again on the q4 bundles of an earlier "
                         "run (--work), exporting them first if missing; writes --out's rows with those fields only "
                         "(default bench/results/adapters_switch.json)")
    ap.add_argument("--rss-probe", nargs=3, metavar=("BUNDLE", "BACKEND", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe[0], args.rss_probe[1], int(args.rss_probe[2]))))
        return 0
    if args.shira_switch_only:
        out = Path(args.out)
        result = json.loads(out.read_text())
        times = shira_switch_times(Path(args.work) / "tvm-sep-f16-shira", args.rounds, args.threads)
        times["load"] = os.getloadavg()
        next(r for r in result["rows"] if r["backend"] == "tvm")["shira_switch_rerun"] = times
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(times))
        return 0
    if args.switch_only:
        return switch_only(args)
    from edgeq.core.executor import Executor
    from edgeq.importers.hf import import_hf
    from edgeq.passes import Context
    from edgeq.passes.merge_adapters import MergeAdapters
    from edgeq.core.plan import Plan

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = smollm_folder(work)
    ads = {"A": random_lora(work / "lora-A", base, args.rank, 1, args.std),
           "B": random_lora(work / "lora-B", base, args.rank, 2, args.std)}
    if "tvm" in args.backends.split(","):
        ads["S"] = random_shira(work / "shira-S", base, args.rank, 3, args.shira_std)

    def merged_executor(name: str):
        def make():
            g, _ = MergeAdapters([str(ads[name])]).run(import_hf(base), Plan(), Context(backend="gguf"))
            return Executor(g, cache_weights=True).logits
        return make

    refs = {k: ReferenceCache(merged_executor(k)) for k in ads}
    rows = []
    result: dict[str, Any] = {
        "machine": {"cpu_flags": _flags(), "load_at_start": os.getloadavg(), "threads": args.threads,
                    "python": platform.python_version()},
        "versions": versions(), "args": {k: v for k, v in vars(args).items() if k != "rss_probe"}, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for backend in args.backends.split(","):
        rows.append(bench_backend(backend, base, ads, work, refs, args))
        result["machine"]["load_at_end"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(switch_table(rows))
    log(f"wrote {out}")
    return 0


def switch_only(args: argparse.Namespace) -> int:
    """`--switch-only`: the q4 separate bundles (exported from the same SmolLM2 and adapters when missing), then
    `switch_times` per backend, in one process."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = smollm_folder(work)
    ads = {k: random_lora(work / f"lora-{k}", base, args.rank, seed, args.std) for k, seed in (("A", 1), ("B", 2))}
    rows = []
    result: dict[str, Any] = {"machine": {"cpu_flags": _flags(), "load_at_start": os.getloadavg(),
                                          "threads": args.threads, "python": platform.python_version()},
                              "versions": versions(), "args": vars(args), "rows": rows}
    out = Path(args.out if args.out != str(DEFAULT_OUT / "adapters.json") else DEFAULT_OUT / "adapters_switch.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for backend in args.backends.split(","):
        bundle = work / f"{backend}-sep-{Q4[backend]}"
        export(bundle, base, backend, Q4[backend], [f"{ads['A']}=A", f"{ads['B']}=B"], "separate")
        rows.append({"backend": backend, "q4_preset": Q4[backend],
                     "adapter_file_bytes": {a["name"]: a["bytes"] for a in json.loads(
                         (bundle / "manifest.json").read_text())["artifacts"] if a.get("role") == "lora"},
                     **switch_times(bundle, backend, args.rounds, args.threads)})
        result["machine"]["load_at_end"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=1) + "\n")
        log(f"{backend}: worst switch {rows[-1]['worst_switch_over_load']:.3f}x the base load")
    print(switch_table(rows))
    log(f"wrote {out}")
    return 0


def _flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            line = next(x for x in f if x.startswith("flags"))
        wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c")
        return " ".join(w for w in wanted if f" {w}" in line)
    except (OSError, StopIteration):
        return ""


if __name__ == "__main__":
    sys.exit(main())
