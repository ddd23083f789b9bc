"""Prefill and decode speed of GGUF files in llama.cpp, measured side by side.

A budgeted plan trades bytes for quality; its user should see what it costs in speed beside the preset of
the same bytes, measured the same way on the same machine (until the latency predictor predicts it). Files
are timed interleaved (A, B, A, B, ...) so that load drifts hit them alike; each figure is the median of the
repeats, with the spread of the repeats beside it. The loop is llama.cpp's own batch decode through
llama-cpp-python with no logits copied out, so the figures are llama.cpp's kernels, not edgeq's runtime.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

PROMPT_TOKENS = 128
DECODE_TOKENS = 32


def _open(path: Path, threads: int, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           n_threads=threads, n_threads_batch=threads, logits_all=False, seed=0, verbose=False)


def _one(llm, prompt: list[int], decode: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one run from an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = prompt[-1]
    for _ in range(decode):
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), decode / (t2 - t1)


def compare_speed(files: dict[str, Path], threads: int = 1, repeats: int = 5, prompt_tokens: int = PROMPT_TOKENS,
                  decode_tokens: int = DECODE_TOKENS) -> dict[str, dict[str, float]]:
    """{label: {prefill_tps, decode_tps, prefill_spread, decode_spread}} of each file, timed interleaved. The
    prompt is the same ids for every file (token 1 onwards, inside every vocabulary); spreads are the relative
    interquartile ranges of the repeats."""
    llms = {k: _open(p, threads, prompt_tokens + decode_tokens + 8) for k, p in files.items()}
    try:
        n_vocab = min(llm.n_vocab() for llm in llms.values())
        prompt = [1 + (7 * i) % (n_vocab - 1) for i in range(prompt_tokens)]
        for llm in llms.values():                   # warm-up: pages mapped, buffers allocated, repacking done
            _one(llm, prompt[:16], 2)
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in llms}
        for _ in range(repeats):
            for k, llm in llms.items():
                runs[k].append(_one(llm, prompt, decode_tokens))
    finally:
        for llm in llms.values():
            llm.close()
    out = {}
    for k, rs in runs.items():
        pre, dec = [r[0] for r in rs], [r[1] for r in rs]
        out[k] = {"prefill_tps": round(statistics.median(pre), 2), "decode_tps": round(statistics.median(dec), 2),
                  "prefill_spread": round(_spread(pre), 4), "decode_spread": round(_spread(dec), 4)}
    return out


def _spread(xs: list[float]) -> float:
    if len(xs) < 4:
        return (max(xs) - min(xs)) / statistics.median(xs)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)
