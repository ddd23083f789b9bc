"""calibrate_ranges: activation ranges for static INT8, from real inputs run through the reference executor.

For every tensor the plan quantizes with static activations (`int8`), the
range of the activation it multiplies is observed on calibration inputs
(text the evaluation never sees) and written into the plan (`act_range`), so
the plan alone determines the exported bytes and a person can read or edit
each range. Ranges already in the plan (set by hand) are kept.

Estimator: min/max (the whitepaper's baseline) or a symmetric percentile of
|x| per tensor (clips rare outliers; `percentile=99.99`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.executor import Executor
from edgeq.ir import Graph
from edgeq.passes.base import Context, Pass
from edgeq.plan import Plan

STATIC_FORMATS = ("int8",)


class CalibrateRanges(Pass):
    name = "calibrate_ranges"

    def __init__(self, inputs: list[np.ndarray], source: str = "calibration inputs", percentile: float | None = None,
                 max_samples_per_tensor: int = 1 << 20):
        self.inputs = inputs
        self.source = source
        self.percentile = percentile
        self.max_samples = max_samples_per_tensor

    def _check(self, graph: Graph) -> None:
        if not self.inputs:
            raise EdgeqError(self.source, "no calibration inputs")
        for i, x in enumerate(self.inputs):
            x = np.asarray(x)
            if graph.kind in ("encoder", "decoder"):
                if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.integer):
                    raise EdgeqError(self.source, f"calibration input {i} has shape {x.shape} and dtype {x.dtype}; "
                                                  "expected a non-empty 1-D sequence of token ids")
                vocab = graph.config.vocab_size
                if x.min() < 0 or x.max() >= vocab:
                    raise EdgeqError(self.source, f"calibration input {i} has token ids outside [0, {vocab})")
            else:
                want = tuple(graph.inputs[0].shape[1:])
                if x.shape[1:] != want and x.shape != want:
                    raise EdgeqError(self.source, f"calibration input {i} has shape {x.shape}; expected (n, *{want})")

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        multiplied = {n.inputs[1] for n in graph.nodes if n.op in ("linear", "conv2d")}
        wanted = {n for n, d in plan.tensors.items()
                  if d.format in STATIC_FORMATS and d.act_range is None and n in multiplied}
        if not wanted:
            ctx.record(self.name, tensors=0)
            return graph, plan
        self._check(graph)
        # ranges belong to activations: layers reading the same activation (q, k, v) get the same range
        act_of = {n.inputs[1]: n.inputs[0] for n in graph.nodes if n.op in ("linear", "conv2d") and n.inputs[1] in wanted}
        lo: dict[str, float] = {}
        hi: dict[str, float] = {}
        samples: dict[str, list[np.ndarray]] = {}
        rng = np.random.default_rng(0)
        seen: set[str] = set()            # activations already observed for the current input

        def observe(node, args):
            a = node.inputs[0]
            if node.inputs[1] not in wanted or a in seen:
                return
            seen.add(a)
            x = args[0]
            lo[a] = min(lo.get(a, 0.0), float(x.min()))
            hi[a] = max(hi.get(a, 0.0), float(x.max()))
            if self.percentile is not None:
                flat = np.abs(x.reshape(-1))
                k = min(flat.size, max(1, self.max_samples // max(1, len(self.inputs))))
                self._pending.setdefault(a, []).append(flat if k == flat.size else rng.choice(flat, k, replace=False))

        self._pending: dict[str, list[np.ndarray]] = {}
        hooks = {"linear": observe, "conv2d": observe}
        ex = Executor(graph, observers=hooks)
        it = self.inputs if ctx.progress is None else ctx.progress(self.inputs, desc="calibrate", unit="input")
        for x in it:
            seen.clear()
            if graph.kind == "cnn":
                ex.run_cnn(np.asarray(x, np.float32))
            else:
                ex.run(np.asarray(x), outputs=(graph.outputs[0].name,))
        samples = self._pending
        del self._pending
        missing = sorted(w for w in wanted if act_of.get(w) not in lo)
        if missing:
            raise EdgeqError(None, f"calibration never reached {missing[0]} (no linear node reads it)")
        ranges: dict[str, list[float]] = {}
        for a in sorted(lo):
            l, h = lo[a], hi[a]
            if self.percentile is not None:
                c = float(np.percentile(np.concatenate(samples[a]), self.percentile))
                l, h = max(l, -c), min(h, c)
            ranges[a] = [round(l, 6), round(h, 6)]
        tensors = dict(plan.tensors)
        for w in sorted(wanted):
            tensors[w] = replace(tensors[w], act_range=list(ranges[act_of[w]]))
        ctx.record(self.name, tensors=len(wanted), inputs=len(self.inputs), source=self.source,
                   estimator="minmax" if self.percentile is None else f"percentile {self.percentile}")
        return graph, replace(plan, tensors=tensors)
