"""Per-kernel timings inside llama.cpp: ggml's graph evaluation callback, through ctypes. No torch.

llama.cpp asks an evaluation callback, before each node of the compute graph, whether the caller wants to
see it; a node it wants is computed on its own and handed over. Asking for every node makes the graph run
node by node in the real runtime (the same kernels, repacked weights and threads), and the time between
two hand-overs is one node's compute plus the hand-over itself. That hand-over is measured on the nodes
that compute nothing (views, reshapes, permutes) and reported beside the kernels, so the host can take it
off. A second llama.cpp context over the backend's loaded model runs the timed calls, decoding as the runtime's
backend does (runtime/llama_context.py: the last token's logits only).

Per timed call (a prefill of N tokens, a decode step at context C) the result holds, per weight, the time of
the matrix multiplication that reads it (the median over the call's repeats), the time of every other op
kind summed, the hand-over time, and the wall time of the same call through the runtime's own backend, timed
alternately with the node-by-node calls so that both see the same load.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import numpy as np

from edgeq.runtime.latency import token_ids
from edgeq.runtime.llama_context import LlamaContext

NOOPS = frozenset({"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})
# (per node, per call): the wall clock, or CPU time (this thread's per node: with one thread llama.cpp computes
# in the caller's thread; the process's per call)
CLOCKS = {"wall": (time.perf_counter, time.perf_counter), "cpu": (time.thread_time, time.process_time)}


class _Tensor(ctypes.Structure):
    """struct ggml_tensor of the ggml that llama-cpp-python 0.3.x ships (ggml.h: GGML_MAX_DIMS 4, GGML_MAX_SRC 10,
    GGML_MAX_OP_PARAMS 64, GGML_MAX_NAME 64)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml_base():
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_op_desc.restype = ctypes.c_char_p
    lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    return lib


class _Recorder:
    """The evaluation callback: while `on`, every node is asked for and timed."""

    def __init__(self, lib, clock):
        self.lib = lib
        self.clock = clock
        self.on = False
        self.times: list[float] = []
        # per node: (op, weight name or "", weight type, KV length the node reads or 0, rows (tokens) computed)
        self.nodes: list[tuple[str, str, str, int, int]] | None = None
        self._info: list[tuple[str, str, str, int, int]] = []
        self._last = 0.0

    def start(self, describe: bool) -> None:
        self.times = []
        self._info = []
        self._describe = describe
        self.on = True
        self._last = self.clock()

    def stop(self) -> None:
        self.on = False
        if self._describe:
            self.nodes = self._info

    def __call__(self, ptr, ask, _user) -> bool:
        if ask:
            return self.on
        now = self.clock()
        self.times.append(now - self._last)
        if self._describe:
            t = _Tensor.from_address(ptr)
            op = self.lib.ggml_op_desc(ptr).decode()
            weight, wtype, kv = "", "", 0
            if op == "MUL_MAT" and t.src[0]:
                s0 = _Tensor.from_address(t.src[0])
                name = s0.name.decode(errors="replace")
                if name.endswith(".weight"):
                    weight, wtype = name, self.lib.ggml_type_name(s0.type).decode()
                elif name.startswith("cache_k"):
                    kv = int(s0.ne[1])
            elif op == "FLASH_ATTN_EXT" and t.src[1]:                   # (q, k, v, mask): k is the cache read
                s1 = _Tensor.from_address(t.src[1])
                if s1.name.decode(errors="replace").startswith("cache_k"):
                    kv = int(s1.ne[1])
            self._info.append((op, weight, wtype, kv, int(t.ne[1])))
        self._last = self.clock()
        return True


class OpTimer:
    """A second context over a LlamaCppBackend's model, whose calls are timed node by node."""

    def __init__(self, backend, threads: int, clock=time.perf_counter):
        from llama_cpp import llama_cpp as lc

        self.rec = _Recorder(_ggml_base(), clock)
        self._cb = lc.ggml_backend_sched_eval_callback(self.rec)   # kept alive as long as the context
        src = backend.context_params
        params = type(src).from_buffer_copy(src)
        params.cb_eval = self._cb
        params.cb_eval_user_data = None
        params.n_threads = threads
        params.n_threads_batch = threads
        self.context = LlamaContext(backend.model, params, backend.n_vocab)
        self.n_ctx, self.n_vocab = self.context.n_ctx, self.context.n_vocab

    def reset(self) -> None:
        self.context.reset()

    def feed(self, ids: list[int]) -> None:
        self.context.decode(ids)

    def timed(self, ids: list[int], describe: bool) -> list[float]:
        self.rec.start(describe)
        try:
            self.feed(ids)
        finally:
            self.rec.stop()
        return self.rec.times

    def close(self) -> None:
        self.context.close()


def _summary(nodes: list[tuple[str, str, str, int, int]], runs: list[list[float]]) -> dict[str, Any]:
    """Per node the median over the runs, then: each weight's matmul and the rows (tokens) it computed, each
    other op kind summed, the hand-over, and the KV length attention read (llama.cpp pads the cache it reads).

    The rows are recorded because llama.cpp computes the last layer's MLP and the head only for the tokens whose
    logits are asked for (one, in a prefill): timed as a 512-token product they would read as impossibly fast."""
    n = min(len(nodes), *(len(r) for r in runs))
    med = np.median(np.array([r[:n] for r in runs]), axis=0) * 1e6
    weights: dict[str, float] = {}
    rows: dict[str, int] = {}
    ops: dict[str, list[float]] = {}
    noop = [float(t) for (op, *_), t in zip(nodes[:n], med) if op in NOOPS]
    for (op, weight, _, _, tokens), t in zip(nodes[:n], med):
        if weight:
            weights[weight] = round(weights.get(weight, 0.0) + float(t), 2)
            rows[weight] = tokens
        elif op not in NOOPS:
            c = ops.setdefault(op, [0, 0.0])
            c[0] += 1
            c[1] = round(c[1] + float(t), 2)
    return {"weights_us": weights, "weights_rows": rows, "ops_us": ops,
            "handover_us": round(float(np.median(noop)) if noop else 0.0, 3),
            "nodes": n, "total_us": round(float(med.sum()), 1), "kv_len": max((x[3] for x in nodes), default=0)}


def _timed(clock, fn, *args) -> float:
    t0 = clock()
    fn(*args)
    return clock() - t0


def _median_us(times: list[float]) -> float:
    return round(float(np.median(times)) * 1e6, 1)


def op_latency(backend, args: dict[str, Any], threads: int) -> dict[str, Any]:
    """Node-by-node timings of the prefills and decode steps `decoder_latency` times (runtime/latency.py), each
    beside the same call through the runtime's own backend, alternating (`call_us`: its median). args['clock']:
    `wall` (default) or `cpu` (the thread's CPU time per node, the process's per call: one thread only)."""
    node_clock, call_clock = CLOCKS[args.get("clock", "wall")]
    timer = OpTimer(backend, threads, node_clock)
    try:
        n_vocab = timer.n_vocab
        steps = int(args.get("steps", 5))
        prefill_steps = int(args.get("prefill_steps", max(1, steps // 2)))
        out: dict[str, Any] = {"prefill": {}, "decode": {}}
        timer.reset()
        timer.feed(token_ids(min(32, timer.n_ctx), n_vocab, seed=99))         # warm-up, not timed
        for n in args.get("prefill", []):
            runs, walls = [], []
            for rep in range(prefill_steps):
                ids = token_ids(int(n), n_vocab, seed=rep)
                timer.reset()
                runs.append(list(timer.timed(ids, describe=True)))
                backend.reset()
                walls.append(_timed(call_clock, backend.feed, ids))
            out["prefill"][str(n)] = {**_summary(timer.rec.nodes or [], runs), "call_us": _median_us(walls)}
        for ctx in args.get("decode", []):
            ctx = int(ctx)
            ids = token_ids(ctx + steps + 1, n_vocab, seed=1)
            timer.reset()
            backend.reset()
            if ctx:
                timer.feed(ids[:ctx])
                backend.feed(ids[:ctx])
            timer.feed([ids[ctx]])                                             # one untimed step each
            backend.feed([ids[ctx]])
            runs, walls = [], []
            for k in range(steps):                     # node by node and whole, alternating: the same load
                runs.append(list(timer.timed([ids[ctx + 1 + k]], describe=(k == 0))))
                walls.append(_timed(call_clock, backend.feed, [ids[ctx + 1 + k]]))
            out["decode"][str(ctx)] = {**_summary(timer.rec.nodes or [], runs), "call_us": _median_us(walls)}
        backend.reset()
        return out
    finally:
        timer.close()
