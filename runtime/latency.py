"""Latency measurements on the device (the runner's `latency` op). No torch, no compiler.

What a latency profile and a prediction's check measure, the same way everywhere: a decoder's prefill
(one `feed` of N tokens into an empty cache; time to the last token's logits) and its decode step (one
`feed` of one token with C tokens already in the cache), through the bundle's own runtime backend, as
`edgeq run` uses it, `steps` timed calls after `warmup` calls. An encoder's call is one forward pass of a
batch of one sequence of N tokens (`model_latency`, timed under the same `prefill` key: N tokens in, one
result out); a CNN's, one image (N = 1). Every call is reported in wall time and in the
process's CPU time (what an idle device's wall time would be with one thread; `--clock cpu`).

With `ops`, the backend's own per-kernel timings of the same calls come back instead (llama.cpp: ggml's graph
evaluation callback, runtime/gguf_ops.py; onnxruntime: its profiler, runtime/onnx_ops.py), so one run
yields a cost for every weight's kernel.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from typing import Any, Callable

import numpy as np


def interleaved_times(runs: dict[str, Callable[[], object]], rounds: int, per_round: int,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call for each variant; variants alternate order round by round, so load on a shared
    machine hits all of them alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for k in (list(runs) if r % 2 == 0 else list(reversed(list(runs)))):
            for _ in range(per_round):
                t0 = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t0)
    return times


def device_facts(dists: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What a latency profile is valid for: the CPU (model and feature flags), cores, OS and the versions of the
    runtime distributions `dists` (edgeq.runtime.runtime_dists())."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = sorted(value.split())
    except OSError:
        pass
    versions = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"machine": platform.machine(), "cpu": cpu, "flags": flags, "cores": os.cpu_count(),
            "system": platform.system(), "python": platform.python_version(), "runtime_versions": versions}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def token_ids(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    """`n` ordinary token ids (no control tokens at the start of the vocabulary): timing does not depend on
    which, so any fixed sequence serves."""
    rng = np.random.default_rng(seed)
    low = min(8, max(n_vocab - 1, 0))
    return [int(x) for x in rng.integers(low, max(n_vocab, low + 1), size=n)]


def _timed(fn, *args) -> tuple[Any, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def decoder_latency(backend, args: dict[str, Any]) -> dict[str, Any]:
    """Prefill of each length in args['prefill'] and decode steps at each context in args['decode'].

    Returns, per length and per context, the wall seconds of every timed call and their CPU seconds."""
    n_vocab = int(backend.n_vocab)
    steps = int(args.get("steps", 5))
    warmup = int(args.get("warmup", 1))
    prefill_steps = int(args.get("prefill_steps", max(1, steps // 2)))
    out: dict[str, Any] = {"prefill": {}, "decode": {}}
    for i in range(warmup):                                   # page in the weights, warm the caches
        backend.reset()
        backend.feed(token_ids(min(32, backend.n_ctx), n_vocab, seed=99 + i))
    for n in args.get("prefill", []):
        n = int(n)
        walls, cpus = [], []
        for rep in range(prefill_steps):
            backend.reset()
            _, w, c = _timed(backend.feed, token_ids(n, n_vocab, seed=rep))
            walls.append(w)
            cpus.append(c)
        out["prefill"][str(n)] = {"wall_s": walls, "cpu_s": cpus}
    for ctx in args.get("decode", []):
        ctx = int(ctx)
        backend.reset()
        ids = token_ids(ctx + warmup + steps, n_vocab, seed=1)
        if ctx:
            backend.feed(ids[:ctx])
        walls, cpus = [], []
        for k in range(warmup + steps):
            _, w, c = _timed(backend.feed, [ids[ctx + k]])
            if k >= warmup:
                walls.append(w)
                cpus.append(c)
        out["decode"][str(ctx)] = {"wall_s": walls, "cpu_s": cpus}
    backend.reset()
    return out


def model_feeds(session, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The inputs of one call of an encoder (a batch of one sequence of `n` ordinary tokens, no padding) or a
    CNN (one image; `n` is ignored): what timing needs, not real data."""
    model = session.manifest["model"]
    cfg = model.get("config") or {}
    if model["kind"] == "cnn":
        shape = (1, int(cfg["in_channels"]), int(cfg["height"]), int(cfg["width"]))
        return {"images": np.random.default_rng(seed).random(shape, dtype=np.float32)}
    ids = np.array([token_ids(n, int(cfg.get("vocab_size", 1000)), seed)], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def model_latency(session, args: dict[str, Any]) -> dict[str, Any]:
    """One call of an encoder at each sequence length in args['prefill'] (a CNN: one image, key "1"), timed
    `prefill_steps` times after `warmup` calls; the same layout as decoder_latency's prefill."""
    steps = int(args.get("prefill_steps", 2))
    warmup = int(args.get("warmup", 1))
    out: dict[str, Any] = {"prefill": {}, "decode": {}}
    for n in args.get("prefill", []):
        feeds = model_feeds(session, int(n))
        for _ in range(warmup):
            session.run(feeds)
        walls, cpus = [], []
        for _ in range(steps):
            _, w, c = _timed(session.run, feeds)
            walls.append(w)
            cpus.append(c)
        out["prefill"][str(n)] = {"wall_s": walls, "cpu_s": cpus}
    return out
