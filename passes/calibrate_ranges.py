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

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.evaluate.texts import calibration_sentences
from edgeq.importers.calibration_text import CalibrationText, default_calibration_text
from edgeq.importers.hf_bert import encoder_tokenizer
from edgeq.models.cnn import quantized_activations
from edgeq.passes.base import Context, Pass
from edgeq.passes.calibrate import calibration_tokens, calibration_windows


def needs_ranges(plan: Plan) -> bool:
    """Whether any of the plan's formats quantizes activations with a range calibrated ahead (static INT8)."""
    return any(get_format(d.format).static_activations for d in plan.tensors.values())


def text_inputs(graph: Graph, n: int = 128, source: CalibrationText | None = None) -> tuple[list[np.ndarray], str]:
    """The calibration inputs of a text model: sentences of the calibration text for an encoder (its lines, or
    the messages of a chat source, spread over it), 512-token windows of it for a decoder; by default the
    calibration half of pydoc's topics (never the evaluation half)."""
    source = source or default_calibration_text()
    if graph.kind == "encoder":
        tok = encoder_tokenizer(graph)
        if source.is_default:
            sentences, what = calibration_sentences(n), f"{n} sentences of pydoc_data.topics (even-indexed topics)"
        else:
            every = source.sentences()
            if not every:
                raise EdgeqError(source.path, "calibration text has no non-empty lines")
            sentences = [every[i * len(every) // min(n, len(every))] for i in range(min(n, len(every)))]
            what = f"{len(sentences)} lines of {source.name} (sha256 {source.sha256[:12]})"
        return [np.array(tok.encode(s).ids, dtype=np.int64) for s in sentences], what
    if graph.kind == "decoder":
        tokens, bos, add_bos = calibration_tokens(graph, source)
        wins = calibration_windows(tokens, 512, 4, bos, add_bos, source)
        name = source.name if source.is_default else f"{source.name} (sha256 {source.sha256[:12]})"
        return [np.array(w, dtype=np.int64) for w in wins], f"{len(wins)} windows of {len(wins[0])} tokens of {name}"
    raise EdgeqError(None, f"no default calibration data for {graph.kind} models; pass calibration inputs")


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
                    raise EdgeqError(self.source, f"calibration input {i} has shape {x.shape}; expected "
                                                  f"(n, {', '.join(map(str, want))})")

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        if graph.kind == "cnn":
            return self._run_cnn(graph, plan, ctx)
        multiplied = {n.inputs[1] for n in graph.nodes if n.op == "linear"}
        wanted = {n for n, d in plan.tensors.items()
                  if get_format(d.format).static_activations and d.act_range is None and n in multiplied}
        if not wanted:
            ctx.record(self.name, tensors=0)
            return graph, plan
        self._check(graph)
        # ranges belong to activations: layers reading the same activation (q, k, v) get the same range
        act_of = {n.inputs[1]: n.inputs[0] for n in graph.nodes if n.op == "linear" and n.inputs[1] in wanted}
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
        hooks = {"linear": observe}
        ex = Executor(graph, observers=hooks)
        it = self.inputs if ctx.progress is None else ctx.progress(self.inputs, desc="calibrate", unit="input")
        for x in it:
            seen.clear()
            ex.run(np.asarray(x), outputs=(graph.outputs[0].name,))
        samples = self._pending
        del self._pending
        missing = sorted(w for w in wanted if act_of.get(w) not in lo)
        if missing:
            raise EdgeqError(None, f"calibration never reached {missing[0]} (no linear node reads it)")
        ranges = self._ranges(lo, hi, samples)
        tensors = dict(plan.tensors)
        for w in sorted(wanted):
            tensors[w] = replace(tensors[w], act_range=list(ranges[act_of[w]]))
        ctx.record(self.name, tensors=len(wanted), inputs=len(self.inputs), source=self.source,
                   estimator="minmax" if self.percentile is None else f"percentile {self.percentile}")
        return graph, replace(plan, tensors=tensors)

    def _ranges(self, lo: dict[str, float], hi: dict[str, float], samples: dict[str, list[np.ndarray]]) -> dict:
        ranges: dict[str, list[float]] = {}
        for a in sorted(lo):
            l, h = lo[a], hi[a]
            if self.percentile is not None:
                c = float(np.percentile(np.concatenate(samples[a]), self.percentile))
                l, h = max(l, -c), min(h, c)
            ranges[a] = [round(l, 6), round(h, 6)]
        return ranges

    def _run_cnn(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        """CNNs are quantized between layers: a range per activation (the plan's `activations`), not per weight.

        Ranges already in the plan are kept as they are (an activation the plan leaves out stays float)."""
        if plan.activations is not None or not needs_ranges(plan):
            ctx.record(self.name, activations=0)
            return graph, plan
        self._check(graph)
        wanted = set(quantized_activations(graph))
        lo: dict[str, float] = {}
        hi: dict[str, float] = {}
        samples: dict[str, list[np.ndarray]] = {}
        rng = np.random.default_rng(0)
        batches = [np.asarray(x, np.float32) for x in self.inputs]
        batches = [x[None] if x.ndim == 3 else x for x in batches]
        per_batch = max(1, self.max_samples // len(batches))

        def see(name: str, x: np.ndarray) -> None:
            lo[name] = min(lo.get(name, 0.0), float(x.min()))
            hi[name] = max(hi.get(name, 0.0), float(x.max()))
            if self.percentile is not None:
                flat = np.abs(x.reshape(-1))
                k = min(flat.size, per_batch)
                samples.setdefault(name, []).append(flat if k == flat.size else rng.choice(flat, k, replace=False))

        def observe(node, args):
            for name, x in zip(node.inputs, args):
                if name in wanted and name not in graph.weights:
                    see(name, x)

        ex = Executor(graph, observers={op: observe for op in {n.op for n in graph.nodes}})
        it = batches if ctx.progress is None else ctx.progress(batches, desc="calibrate", unit="batch")
        for x in it:
            out = ex.run_inputs({graph.inputs[0].name: x}, outputs=(graph.outputs[0].name,))
            if graph.outputs[0].name in wanted:
                see(graph.outputs[0].name, out[graph.outputs[0].name])
        ranges = self._ranges(lo, hi, samples)
        order = quantized_activations(graph)
        activations = {a: ranges[a] for a in order if a in ranges}
        ctx.record(self.name, activations=len(activations), images=int(sum(len(x) for x in batches)),
                   source=self.source, estimator="minmax" if self.percentile is None else f"percentile {self.percentile}")
        return graph, replace(plan, activations=activations)
