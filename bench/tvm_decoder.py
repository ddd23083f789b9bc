"""SmolLM2-135M decode speed: edgeq's TVM builds (untuned and meta-schedule tuned) vs the GGUF bundle of the
same format (q4_0 vs int4, q8_0 vs int8), side by side in one run.

Each variant is exported once, loaded with the same thread count, fed the same
prompt, then timed over `--tokens` greedy decode steps (one token per call,
through the KV cache); variants interleave round by round and the median
tokens/s per variant is reported with its ratio to the GGUF bundle of its
format. The tuned builds use `--tune-trials` trials in all, with their own
tuning database (a fresh folder, so the stated budget is what was spent).

    python bench/tvm_decoder.py                                  # int4 + int8, 64 trials, 2 threads
    python bench/tvm_decoder.py --formats int4 --trials 32 --rounds 3

Prints a table and writes bench/results/tvm_decoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

GGUF_OF = {"int4": "q4_0", "int8": "q8_0", "f32": "f32"}


def decode_rate(session, prompt: list[int], n: int) -> float:
    """Greedy tokens/s over n single-token decode steps after a prefill (prefill not timed)."""
    b = session.backend
    b.reset()
    logits = b.feed(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = b.feed([int(np.argmax(logits))])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int4,int8", help="TVM presets (each against its GGUF format)")
    ap.add_argument("--trials", type=int, default=64, help="meta-schedule trials in all for the tuned builds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--out", default="bench/results/tvm_decoder.json")
    a = ap.parse_args()

    from edgeq import runtime
    from edgeq.pipeline import ExportOptions, export

    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-tvmdec-"))
    os.environ["EDGEQ_TVM_TUNE_DIR"] = str(work / "tune")
    bundles: dict[str, Path] = {}
    export_s: dict[str, float] = {}
    pairs: dict[str, str] = {}
    for q in [q.strip() for q in a.formats.split(",") if q.strip()]:
        variants = [(f"gguf {GGUF_OF[q]}", dict(backend="gguf", quant=GGUF_OF[q])),
                    (f"tvm {q}", dict(backend="tvm", quant=q))]
        if a.trials:
            variants.append((f"tvm {q} tuned {a.trials}", dict(backend="tvm", quant=q, tune_trials=a.trials)))
        for name, kw in variants:
            out = work / name.replace(" ", "-")
            t0 = time.perf_counter()
            export(ExportOptions(out=str(out), check=False, **kw))
            export_s[name] = time.perf_counter() - t0
            bundles[name] = out
            pairs[name] = f"gguf {GGUF_OF[q]}"
            print(f"exported {name} in {export_s[name]:.0f} s", flush=True)

    sessions = {k: runtime.load(v, threads=a.threads, n_ctx=512) for k, v in bundles.items()}
    first = next(iter(sessions.values()))
    prompt = first.tokenize(first.chat_prompt("Explain in two sentences why the sky is blue."), parse_special=True)
    greedy = {k: s.generate_ids(prompt, max_tokens=16) for k, s in sessions.items()}
    for s in sessions.values():
        decode_rate(s, prompt, 2)                                        # warm-up
    rates: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(a.rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(list(sessions)))
        for k in order:
            rates[k].append(decode_rate(sessions[k], prompt, a.tokens))
    med = {k: statistics.median(v) for k, v in rates.items()}
    rows = []
    for k, b in bundles.items():
        m = json.loads((b / "manifest.json").read_text())
        size = sum(x["bytes"] for x in m["artifacts"] if x["role"] in ("model", "params"))
        rows.append({"variant": k, "files_mb": size / 1e6, "decode_tok_s_median": med[k],
                     "decode_tok_s_all": rates[k], "vs_gguf_same_format": med[k] / med[pairs[k]],
                     "export_s": export_s[k], "tune_trials": (m.get("tvm") or {}).get("tune_trials"),
                     "greedy_16_equal_gguf": greedy[k] == greedy[pairs[k]]})
    print(f"SmolLM2-135M decode, {a.threads} threads, prompt {len(prompt)} tokens, {a.rounds} rounds x "
          f"{a.tokens} tokens interleaved; tuned = meta-schedule with {a.trials} trials in all")
    print(f"{'variant':24s} {'MB':>6s} {'tok/s':>8s} {'x GGUF':>7s} {'export s':>9s}")
    for r in rows:
        print(f"{r['variant']:24s} {r['files_mb']:6.1f} {r['decode_tok_s_median']:8.2f} "
              f"{r['vs_gguf_same_format']:7.3f} {r['export_s']:9.0f}")
    for s in sessions.values():
        s.close()
    from importlib import metadata

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": a.threads, "rounds": a.rounds, "tokens_per_round": a.tokens,
                               "prompt_tokens": len(prompt), "tune_trials": a.trials,
                               "apache-tvm": metadata.version("apache-tvm"),
                               "llama-cpp-python": metadata.version("llama-cpp-python"),
                               "rows": rows, "load_avg": os.getloadavg()}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
