"""Every backend x format class on this machine, beside the runtimes edgeq competes with, in one table.

Decoders (SmolLM2-135M): greedy decode tokens/s (one token per call after a
prompt, KV cache kept) and prefill tokens/s (one call of `--prefill` tokens into
an empty cache), for
  - llama.cpp: llama-cpp-python's own loop (`Llama.eval` + greedy `Llama.sample`)
    on the GGUF files edgeq wrote (q4_0, q8_0),
  - edgeq's runtime on the GGUF, ONNX (int4, int8) and TVM (int4, int8, untuned:
    edgeq's fixed schedules) bundles.
Encoders (all-MiniLM-L6-v2, batch 1, sequence `--seq`): latency for
  - onnxruntime float after its transformer optimizer, and onnxruntime's own
    `quantize_dynamic` (per-channel int8) of the same float model,
  - edgeq's ONNX f32 / int8 / int8-dyn files (opened as a plain
    `onnxruntime.InferenceSession`), edgeq's TVM f32 / int8 bundles (untuned).

Every variant of a section runs on the same thread count, interleaved round by
round with the order alternating, so load on a shared machine hits all alike;
rows give the median and the 10th/90th percentiles, and the ratio to the
competitor of their class (llama.cpp of the same format, onnxruntime float /
`quantize_dynamic`). The CPU's kernel-relevant flags, model name, load average
before and after, and versions go into the JSON: compare ratios within one run,
never figures from machines with different flags. onnxruntime sessions run with
spinning off unless `--ort-spinning` (default options; on a busy 2-core machine
spinning threads steal the cores).

    python bench/speed.py                          # both sections, 2 threads
    python bench/speed.py --only encoder --rounds 15
    python bench/speed.py --only decoder --decoders gguf,onnx

Writes bench/results/speed.json and bench/results/speed.png. llama-bench is not
in the table: llama-cpp-python ships no llama-bench binary and building one from
its vendored sources is left to a machine with time for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import (  # noqa: E402
    cpu_model,
    encoder_fixture,
    fidelity,
    interleaved_times,
    isa_flags,
    optimized_ops,
    ort_float_optimized,
    ort_quantize_dynamic,
    spread,
)

DECODER = "SmolLM2-135M-Instruct"
ENCODER = "all-MiniLM-L6-v2"
GGUF_OF = {"int4": "q4_0", "int8": "q8_0", "int8-dyn": "q8_0", "q4_0": "q4_0", "q8_0": "q8_0"}


@dataclass
class Row:
    section: str                 # decoder | encoder
    variant: str
    backend: str
    fmt: str                     # format class: int4, int8, int8-dyn, f32
    versus: str | None           # the competitor row this one is compared with


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def export_bundle(out: Path, **kw) -> dict:
    from edgeq.api import ExportOptions, export

    return export(ExportOptions(target="cpu", out=str(out), force=True, check=False, **kw))["manifest"]


# ---------------------------------------------------------------------------------------------- decoders

class LlamaCppLoop:
    """llama-cpp-python's own greedy loop on a GGUF file: what a user of that package gets."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def decode(self, n: int) -> None:
        for _ in range(n):
            tok = self.llm.sample(temp=0.0)
            self.llm.eval([tok])

    def close(self) -> None:
        self.llm.close()


class EdgeqLoop:
    """A bundle through edgeq's runtime backend (`feed` of ids, logits back), greedy."""

    def __init__(self, bundle: Path, threads: int, n_ctx: int):
        from edgeq import runtime

        self.session = runtime.load(bundle, threads=threads, n_ctx=n_ctx)
        self.backend = self.session.backend
        self.logits: np.ndarray | None = None

    def prefill(self, ids: list[int]) -> None:
        self.backend.reset()
        self.logits = self.backend.feed(ids)

    def decode(self, n: int) -> None:
        for _ in range(n):
            self.logits = self.backend.feed([int(np.argmax(self.logits))])

    def close(self) -> None:
        self.session.close()


def decoder_section(a, work: Path) -> list[dict[str, Any]]:
    from edgeq.runtime.latency import token_ids

    rows: list[tuple[Row, Path]] = []
    for q in [x for x in a.decoder_quants.split(",") if x]:
        g = GGUF_OF[q]
        gdir = work / f"dec-gguf-{g}"
        if not (gdir / "manifest.json").exists():
            log(f"export {DECODER} gguf {g}")
            export_bundle(gdir, backend="gguf", quant=g, calibration=False)
        gguf_file = next(gdir.glob("*.gguf"))
        rows.append((Row("decoder", f"llama.cpp {g} (llama-cpp-python loop)", "llama.cpp", q, None), gguf_file))
        for backend in [x for x in a.decoders.split(",") if x]:
            quant = g if backend == "gguf" else q
            out = work / f"dec-{backend}-{quant}"
            if backend != "gguf" and not (out / "manifest.json").exists():
                log(f"export {DECODER} {backend} {quant}")
                t0 = time.perf_counter()
                export_bundle(out, backend=backend, quant=quant, calibration=False)
                log(f"exported in {time.perf_counter() - t0:.0f} s")
            rows.append((Row("decoder", f"edgeq {backend} {quant}" + (" (untuned)" if backend == "tvm" else ""),
                             backend, q, f"llama.cpp {g} (llama-cpp-python loop)"), gdir if backend == "gguf" else out))
    loops: dict[str, Any] = {}
    for row, path in rows:
        loops[row.variant] = (LlamaCppLoop(path, a.threads, a.n_ctx) if row.backend == "llama.cpp"
                              else EdgeqLoop(path, a.threads, a.n_ctx))
    prompt = token_ids(a.prefill, 49152, seed=0)
    decode_prompt = prompt[:16]
    prefill_calls = {k: (lambda lp=lp: lp.prefill(prompt)) for k, lp in loops.items()}
    log(f"decoder prefill, {a.rounds} rounds")
    t_prefill = interleaved_times(prefill_calls, a.rounds, 1)
    log(f"decoder decode, {a.rounds} rounds x {a.tokens} tokens")
    t_decode: dict[str, list[float]] = {k: [] for k in loops}
    for lp in loops.values():
        lp.prefill(decode_prompt)
        lp.decode(2)
    for r in range(a.rounds):         # the prompt is fed untimed before each timed stretch of decode steps
        for k in (list(loops) if r % 2 == 0 else list(reversed(list(loops)))):
            loops[k].prefill(decode_prompt)
            t0 = time.perf_counter()
            loops[k].decode(a.tokens)
            t_decode[k].append(time.perf_counter() - t0)
    for lp in loops.values():
        lp.close()
    out = []
    for row, path in rows:
        dec = spread([a.tokens / t for t in t_decode[row.variant]])
        pre = spread([a.prefill / t for t in t_prefill[row.variant]])
        out.append({**row.__dict__, "decode_tok_s": dec, "prefill_tok_s": pre,
                    "file_mb": _bytes(path) / 1e6})
    by = {r["variant"]: r for r in out}
    for r in out:
        ref = by.get(r["versus"]) if r["versus"] else None
        r["decode_vs"] = r["decode_tok_s"]["median"] / ref["decode_tok_s"]["median"] if ref else None
        r["prefill_vs"] = r["prefill_tok_s"]["median"] / ref["prefill_tok_s"]["median"] if ref else None
    return out


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    m = json.loads((path / "manifest.json").read_text())
    return sum(x["bytes"] for x in m["artifacts"] if x["role"] in ("model", "model_data", "params"))


# ---------------------------------------------------------------------------------------------- encoders

def encoder_section(a, work: Path) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from edgeq import runtime

    onnx_files: dict[str, str] = {}
    for q in ("f32", "int8", "int8-dyn"):
        out = work / f"enc-onnx-{q}"
        if not (out / "manifest.json").exists():
            log(f"export {ENCODER} onnx {q}")
            export_bundle(out, model=ENCODER, backend="onnx", quant=q)
        onnx_files[q] = str(out / "model.onnx")
    rows: list[Row] = []
    files: dict[str, str] = {}
    opt = ort_float_optimized(onnx_files["f32"], work / "enc-ort-f32-opt.onnx")
    base_f32 = "onnxruntime f32 (transformer optimizer)"
    if opt:
        rows.append(Row("encoder", base_f32, "onnxruntime", "f32", None))
        files[base_f32] = opt
    base_dyn = "onnxruntime quantize_dynamic (per-channel int8)"
    rows.append(Row("encoder", base_dyn, "onnxruntime", "int8-dyn", None))
    files[base_dyn] = ort_quantize_dynamic(onnx_files["f32"], work / "enc-ort-dyn-pc.onnx")
    for q, vs in (("f32", base_f32), ("int8", base_dyn), ("int8-dyn", base_dyn)):
        name = f"edgeq onnx {q}"
        rows.append(Row("encoder", name, "onnx", q, vs if vs in files else None))
        files[name] = onnx_files[q]
    tvm: dict[str, Any] = {}
    for q in [x for x in a.tvm_encoder_quants.split(",") if x]:
        out = work / f"enc-tvm-{q}"
        if not (out / "manifest.json").exists():
            log(f"export {ENCODER} tvm {q}")
            export_bundle(out, model=ENCODER, backend="tvm", quant=q)
        name = f"edgeq tvm {q} (untuned)"
        rows.append(Row("encoder", name, "tvm", q, base_f32 if q == "f32" else base_dyn))
        tvm[name] = runtime.load(out, threads=a.threads)
        files[name] = str(out)

    fx = encoder_fixture(ENCODER, a.seq, a.sentences)
    feed = {"input_ids": np.array([fx.long_ids], np.int64), "attention_mask": np.ones((1, a.seq), np.int64)}
    sessions = {r.variant: ort.InferenceSession(files[r.variant], _ort_options(a.threads, a.ort_spinning),
                                                providers=["CPUExecutionProvider"])
                for r in rows if r.variant not in tvm}
    calls: dict[str, Callable[[], object]] = {}
    embed: dict[str, Callable[[list[int]], np.ndarray]] = {}
    for r in rows:
        if r.variant in tvm:
            s = tvm[r.variant]
            calls[r.variant] = lambda s=s: s.embed_ids([fx.long_ids])
            embed[r.variant] = lambda ids, s=s: s.embed_ids([ids])[0]
        else:
            s = sessions[r.variant]
            calls[r.variant] = lambda s=s: s.run(["embedding"], feed)
            embed[r.variant] = lambda ids, s=s: s.run(["embedding"], {
                "input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)})[0][0]
    quality = {k: fidelity(fx.reference, np.stack([f(i) for i in fx.sentence_ids])) for k, f in embed.items()}
    log(f"encoder latency, {a.rounds} rounds x {a.runs_per_round}")
    times = interleaved_times(calls, a.rounds, a.runs_per_round, warmup=3)
    for s in tvm.values():
        s.close()
    out = []
    for r in rows:
        ops = optimized_ops(files[r.variant], a.threads, work) if r.variant not in tvm else None
        out.append({**r.__dict__, "latency_ms": spread([t * 1e3 for t in times[r.variant]]), **quality[r.variant],
                    "file_mb": _bytes(Path(files[r.variant])) / 1e6, "optimized_ops": ops})
    by = {r["variant"]: r for r in out}
    for r in out:
        ref = by.get(r["versus"]) if r["versus"] else None
        # speed-up over the competitor: its latency / ours (above 1: faster)
        r["speedup_vs"] = ref["latency_ms"]["median"] / r["latency_ms"]["median"] if ref else None
    return out


def _ort_options(threads: int, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


# ---------------------------------------------------------------------------------------------- report

def print_tables(doc: dict) -> None:
    print(f"\n{doc['cpu']}; flags {' '.join(doc['isa_flags'])}; {doc['threads']} threads; load {doc['load_before']} "
          f"-> {doc['load_after']}")
    dec = [r for r in doc["rows"] if r["section"] == "decoder"]
    if dec:
        print(f"\n{DECODER}: decode (after a 16-token prompt, {doc['tokens']} tokens a round) and prefill of "
              f"{doc['prefill']} tokens, tok/s median [p10, p90], ratio to llama.cpp of the same format")
        print(f"{'variant':44s} {'MB':>6s} {'decode':>22s} {'x':>6s} {'prefill':>24s} {'x':>6s}")
        for r in dec:
            d, p = r["decode_tok_s"], r["prefill_tok_s"]
            print(f"{r['variant']:44s} {r['file_mb']:6.1f} {d['median']:7.1f} [{d['p10']:6.1f},{d['p90']:6.1f}] "
                  f"{_x(r['decode_vs'])} {p['median']:8.1f} [{p['p10']:6.1f},{p['p90']:6.1f}] {_x(r['prefill_vs'])}")
    enc = [r for r in doc["rows"] if r["section"] == "encoder"]
    if enc:
        print(f"\n{ENCODER}: batch 1, seq {doc['seq']}, latency ms median [p10, p90], speed-up over the "
              f"onnxruntime baseline of its class (f32: optimised float; int8: quantize_dynamic), cosine on "
              f"{doc['sentences']} held-out sentences")
        print(f"{'variant':48s} {'MB':>6s} {'ms':>22s} {'x':>6s} {'cos mean':>9s} {'cos min':>8s}")
        for r in enc:
            t = r["latency_ms"]
            print(f"{r['variant']:48s} {r['file_mb']:6.1f} {t['median']:7.2f} [{t['p10']:6.2f},{t['p90']:6.2f}] "
                  f"{_x(r['speedup_vs'])} {r['cosine_mean']:9.5f} {r['cosine_min']:8.5f}")


def _x(v: float | None) -> str:
    return f"{v:6.2f}" if v is not None else f"{'':6s}"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, k, lab) for s, k, lab in (("decoder", "decode_tok_s", "decode tok/s"),
                                             ("decoder", "prefill_tok_s", "prefill tok/s"),
                                             ("encoder", "latency_ms", "MiniLM b1 latency, ms"))
              if any(r["section"] == s for r in doc["rows"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    colours = {"llama.cpp": "tab:gray", "onnxruntime": "tab:gray", "gguf": "tab:orange", "onnx": "tab:blue",
               "tvm": "tab:green"}
    for ax, (section, key, label) in zip(axes[0], panels):
        rows = [r for r in doc["rows"] if r["section"] == section]
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["p10"] for m, r in zip(med, rows)], [r[key]["p90"] - m for m, r in zip(med, rows)]]
        ax.barh([r["variant"] for r in rows], med, xerr=err, color=[colours[r["backend"]] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.tick_params(axis="y", labelsize=7)
    isa = " ".join(f for f in doc["isa_flags"] if "vnni" in f or "512f" in f) or "AVX2"
    fig.suptitle(f"{doc['cpu']}; {isa}; {doc['threads']} threads; load {doc['load_before'][0]:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("decoder", "encoder"), help="one section (default: both)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per section")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens of the timed prefill")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--decoder-quants", default="int4,int8",
                    help="format classes (int4 -> q4_0, int8 and int8-dyn -> q8_0)")
    ap.add_argument("--decoders", default="gguf,onnx,tvm", help="edgeq backends timed on the decoder")
    ap.add_argument("--tvm-encoder-quants", default="f32,int8", help="TVM encoder presets ('' for none)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs-per-round", type=int, default=10, help="encoder calls per variant per round")
    ap.add_argument("--sentences", type=int, default=200, help="held-out sentences for the encoders' cosine")
    ap.add_argument("--ort-spinning", action="store_true", help="onnxruntime sessions with spinning on (its default)")
    ap.add_argument("--work", type=Path, help="folder for the exports (kept; default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "speed.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))

    import shutil
    from importlib import metadata

    work = a.work or Path(tempfile.mkdtemp(prefix="edgeq-bench-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    versions = {}
    for dist in ("onnxruntime", "llama_cpp_python", "apache-tvm", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    doc: dict[str, Any] = {"cpu": cpu_model(), "isa_flags": isa_flags(), "cores": os.cpu_count(), "threads": a.threads,
                           "rounds": a.rounds, "tokens": a.tokens, "prefill": a.prefill, "seq": a.seq,
                           "sentences": a.sentences, "runs_per_round": a.runs_per_round,
                           "ort_spinning": a.ort_spinning, "versions": versions,
                           "load_before": [round(x, 2) for x in os.getloadavg()], "rows": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for section, run in (("encoder", encoder_section), ("decoder", decoder_section)):
            if a.only in (None, section):
                doc["rows"] += run(a, work)
                doc["load_after"] = [round(x, 2) for x in os.getloadavg()]
                a.out.write_text(json.dumps(doc, indent=1) + "\n")      # after each section: a stopped run keeps it
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(doc)
    plot(doc, a.out.with_suffix(".png"))
    print(f"\nwrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
