"""Per-kernel timings inside onnxruntime: its own profiler, on a second session of the same model. No torch.

onnxruntime times every node it runs when profiling is on (`enable_profiling`) and writes the events as JSON
at `end_profiling()`; each node event falls inside the `model_run` event of its call. The timed calls are
those runtime/latency.py times (prefills of N tokens, decode steps at a context), run through a copy of the
runtime's own decoder backend, so the graph, the optimisations and the threads are the runtime's. The nodes
the host names in args['kernels'] (the ones that multiply with a weight) are reported one by one; every
other node is summed per op type. Each call is also timed through the runtime's own session, alternately
(`call_us`), so that the whole call and its nodes see the same load. The profiler times nodes by the wall
clock; with args['clock'] `cpu` the nodes' CPU time of a call (their wall time times the call's CPU time over its
wall time) is spread over the nodes in proportion to each node's least wall time over the calls (`op_latency`:
why).
Encoders and CNNs (`model_op_latency`) are timed the same way, one call per sequence length (runtime/latency.py's
`model_latency`), under the `prefill` key.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from edgeq.runtime.latency import model_feeds, token_ids


# under the CPU clock, a node shorter than this is priced by its least wall time over the calls (the OS's waits
# on this VM are 4 ms slices, which a node this short misses in most calls); longer ones share the rest
LONG_NODE_US = 2000.0


def _profiled_backend(backend, threads: int, folder: str, session_options):
    """A copy of an OnnxDecoderBackend whose session (`session_options(threads)`, the runtime's) profiles every
    node."""
    copy = object.__new__(type(backend))
    copy.__dict__.update(backend.__dict__)
    copy.session = _profiled_session(backend.model_path, threads, folder, session_options)
    copy._io = copy.session.io_binding()
    copy.reset()
    return copy


def _calls(events: list[dict[str, Any]]) -> list[list[tuple[str, str, float]]]:
    """Per `model_run`, in order: the (node name, op type, µs) of the nodes it ran."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    out: list[list[tuple[str, str, float]]] = [[] for _ in runs]
    starts = np.array([r[0] for r in runs])
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if 0 <= i < len(runs) and e["ts"] <= runs[i][1]:
            out[i].append((e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "?"), float(e["dur"])))
    return out


def _summary(calls: list[list[tuple[str, str, float]]], kernels: set[str], reduce=np.median,
             total: float | None = None, long_us: float = 0.0) -> dict[str, Any]:
    """Per node, `reduce` of its times over the calls; with `total`, the nodes of at least `long_us` scaled so that
    all add up to it (never up: by at most 1)."""
    per: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for c in calls:
        seen: dict[str, float] = {}
        for name, op, us in c:
            seen[name] = seen.get(name, 0.0) + us
            op_of[name] = op
        for name, us in seen.items():
            per.setdefault(name, []).append(us)
    weights: dict[str, float] = {}
    ops: dict[str, list[float]] = {}
    scale = 1.0
    if total is not None:
        short = sum(float(reduce(v)) for v in per.values() if float(reduce(v)) < long_us)
        scale = (total - short) / max(sum(float(reduce(v)) for v in per.values()) - short, 1e-9)
        scale = max(0.0, min(1.0, scale)) if long_us else scale
    for name, v in per.items():
        t = float(reduce(v))
        t *= scale if t >= long_us else 1.0
        if name in kernels:
            weights[name] = round(t, 2)
        else:
            c = ops.setdefault(op_of[name], [0, 0.0])
            c[0] += 1
            c[1] = round(c[1] + t, 2)
    total = sum(weights.values()) + sum(c[1] for c in ops.values())
    return {"weights_us": weights, "ops_us": ops, "handover_us": 0.0, "nodes": len(per), "total_us": round(total, 1),
            "kv_len": 0}


def _profiled_session(model_path, threads: int, folder: str, session_options):
    import onnxruntime as ort

    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(folder, "ort")
    return ort.InferenceSession(os.fspath(model_path), so, providers=["CPUExecutionProvider"])


def _node_calls(session, runs: int) -> list[list[tuple[str, str, float]]]:
    """The profiled session's `runs` calls, node by node (wall µs), its profile file read and gone."""
    path = session.end_profiling()
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    calls = _calls(events)
    if len(calls) != runs:
        raise RuntimeError(f"onnxruntime's profile has {len(calls)} runs, {runs} were made")
    return calls


def _timed(clock, fn, *args) -> float:
    t0 = clock()
    fn(*args)
    return clock() - t0


def op_latency(backend, args: dict[str, Any], threads: int, session_options) -> dict[str, Any]:
    """Node-by-node timings of the prefills and decode steps `decoder_latency` times (runtime/latency.py)."""
    kernels = set(args.get("kernels") or ())
    # onnxruntime's profiler times nodes by the wall clock; the whole calls beside them follow args['clock']
    call_clock = time.process_time if args.get("clock") == "cpu" else time.perf_counter
    steps = int(args.get("steps", 5))
    prefill_steps = int(args.get("prefill_steps", max(1, steps // 2)))
    with tempfile.TemporaryDirectory(prefix="edgeq-ort-prof-") as folder:
        b = _profiled_backend(backend, threads, folder, session_options)
        n_vocab = int(b.n_vocab)
        plan: list[tuple[str, str, bool]] = []          # (kind, key, timed) per session.run, in order
        ratio: list[float] = []                         # per session.run: its CPU time / its wall time
        walls: dict[tuple[str, str], list[float]] = {}  # the same calls through the runtime's session, alternating

        def profiled(kind: str, key: str, timed: bool, ids: list[int]) -> None:
            c0, t0 = time.process_time(), time.perf_counter()
            b.feed(ids)
            ratio.append(min(1.0, (time.process_time() - c0) / max(time.perf_counter() - t0, 1e-9)))
            plan.append((kind, key, timed))

        profiled("warmup", "", False, token_ids(min(32, b.n_ctx), n_vocab, seed=99))
        for n in args.get("prefill", []):
            for rep in range(prefill_steps):
                ids = token_ids(int(n), n_vocab, seed=rep)
                b.reset()
                profiled("prefill", str(n), True, ids)
                backend.reset()
                walls.setdefault(("prefill", str(n)), []).append(_timed(call_clock, backend.feed, ids))
        for ctx in args.get("decode", []):
            ctx = int(ctx)
            b.reset()
            backend.reset()
            ids = token_ids(ctx + steps + 1, n_vocab, seed=1)
            if ctx:
                profiled("fill", "", False, ids[:ctx])
                backend.feed(ids[:ctx])
            profiled("decode", str(ctx), False, [ids[ctx]])
            backend.feed([ids[ctx]])
            for k in range(steps):
                profiled("decode", str(ctx), True, [ids[ctx + 1 + k]])
                walls.setdefault(("decode", str(ctx)), []).append(_timed(call_clock, backend.feed, [ids[ctx + 1 + k]]))
        backend.reset()
        calls = _node_calls(b.session, len(ratio))
        b.session = None
    cpu = args.get("clock") == "cpu"
    out: dict[str, Any] = {"prefill": {}, "decode": {}}
    for kind in ("prefill", "decode"):
        keys = sorted({k for kd, k, timed in plan if kd == kind and timed}, key=int)
        for key in keys:
            chosen = [i for i, (kd, k, timed) in enumerate(plan) if kd == kind and k == key and timed]
            picked = [calls[i] for i in chosen]
            if cpu:
                # the nodes' CPU time per call is their wall time times the call's CPU share. A wait of the OS
                # (a few ms) lands on some node in some calls: a node's least wall time over the calls is its CPU
                # time when it is short (LONG_NODE_US), and the long nodes, which a wait rarely misses, share
                # what is left. Was: each call's nodes scaled by its share and each node's median kept, which
                # priced short nodes, a median keeps free of waits, at the share. Measured on an int4 SmolLM2's
                # prefill of 128 (onnxruntime 1.32, load 6) against the same calls run at real-time priority:
                # the node sum 12 % short, norms, adds, softmax at 0.4-0.7 of their time, nodes over 0.5 ms -48 %
                # (median); now the sum +4 %, nodes over 0.5 ms -2 % (median; median |error| 9 %), short ops
                # +5-19 %. Held-out SmolLM2 plans were priced 19 % low (load 8).
                total = float(np.median([sum(us for _, _, us in calls[i]) * ratio[i] for i in chosen]))
                summary = _summary(picked, kernels, np.min, total, LONG_NODE_US)
            else:
                summary = _summary(picked, kernels)
            out[kind][key] = {**summary, "call_us": round(float(np.median(walls[(kind, key)])) * 1e6, 1)}
    return out


def model_op_latency(session, args: dict[str, Any], threads: int, session_options) -> dict[str, Any]:
    """Node-by-node timings of the encoder or CNN calls `model_latency` times (runtime/latency.py), and beside
    them the same calls through the runtime's own session (`call_us`). Each length's profiled calls run back to
    back, then its plain ones: alternating call by call would have two copies of the weights evict each other
    from the caches, which a small model's repeated calls (what is predicted) never see."""
    kernels = set(args.get("kernels") or ())
    call_clock = time.process_time if args.get("clock") == "cpu" else time.perf_counter
    # `op_steps`: profiled calls per length (default `prefill_steps`); a node's least time needs several calls on a
    # loaded machine, where a wait lands on a long node in about one call of two
    steps = int(args.get("op_steps") or args.get("prefill_steps", 2))
    keys: list[str] = []
    cpu_us: list[float] = []
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeq-ort-prof-") as folder:
        prof = _profiled_session(session.model_path, threads, folder, session_options)
        for n in args.get("prefill", []):
            feeds = model_feeds(session, int(n))
            for rep in range(steps + 1):                      # the first call warms up
                c0 = time.process_time()
                prof.run(None, feeds)
                cpu_us.append((time.process_time() - c0) * 1e6)
                keys.append(str(n) if rep else "")
            session.run(feeds)
            walls[str(n)] = [_timed(call_clock, session.run, feeds) for _ in range(steps)]
        calls = _node_calls(prof, len(keys))
    out: dict[str, Any] = {"prefill": {}, "decode": {}}
    cpu = args.get("clock") == "cpu"
    for key in walls:
        picked = [c for c, k in zip(calls, keys) if k == key]
        # CPU clock: the profiler times nodes by the wall clock, and on a loaded machine a wait lands on whichever
        # node was running; each node's least time over the calls is its share, the calls' CPU time the total
        summary = (_summary(picked, kernels, np.min, float(np.median([u for u, k in zip(cpu_us, keys) if k == key])))
                   if cpu else _summary(picked, kernels))
        out["prefill"][key] = {**summary, "call_us": round(float(np.median(walls[key])) * 1e6, 1)}
    return out
