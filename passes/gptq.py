"""gptq: error compensation across a weight's format blocks (GPTQ/OBS), for any block format of the registry.

A block format quantizes each block of a row on its own; the error one block leaves can be paid back by the
columns not yet quantized, through the input covariance H = E[xxᵀ]: quantizing the blocks of the columns in
order, after block S the remaining columns R move by

    W_R ← W_R − (W_S − Q_S) · U_SS⁻¹ U_SR,        H⁻¹ = UᵀU (U upper: the Cholesky factor of H's inverse)

(the optimal-brain-surgeon update for removing the set S, with every sub-Hessian's inverse read off one
Cholesky factor, as GPTQ does column by column). The format's own quantizer quantizes each block jointly (its
scales and codes come from ggml's code, bit-exact), so the result is a float matrix W' whose plain quantization
by that format is the compensated one: the writer needs nothing new, and the file is still what llama.cpp
reads. H is damped (λ·mean diag) because a few thousand calibration tokens leave H's small directions noisy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format, get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.passes.base import Context, Pass

DEFAULT_DAMP = 0.01


def inverse_cholesky(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """U upper with (H + λ·mean(diag H)·I)⁻¹ = UᵀU; dead inputs (zero variance) get the mean."""
    h = np.array(h, dtype=np.float64)
    d = np.diag(h).copy()
    dead = d <= 0
    mean = float(d[~dead].mean()) if (~dead).any() else 1.0
    h[dead, dead] = mean
    h[np.diag_indices_from(h)] += damp * mean
    hinv = cho_solve(cho_factor(h, lower=True), np.eye(h.shape[0]))
    return np.linalg.cholesky(hinv).T           # lower L with H⁻¹ = LLᵀ, so U = Lᵀ


def compensate(w: np.ndarray, fmt: Format, u: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """W' (float32, w's shape): the weights whose quantization by `fmt` block by block is GPTQ's."""
    step = fmt.block[1]
    cols = w.shape[1]
    out = np.array(w, dtype=np.float32)
    for s0 in range(0, cols, step):
        s1 = s0 + step
        blk = out[:, s0:s1]
        imp = None if importance is None or not fmt.takes_imatrix else importance[s0:s1]
        err = blk - fmt.roundtrip(blk, imp)
        if s1 < cols:
            x = solve_triangular(u[s0:s1, s0:s1], u[s0:s1, s1:], lower=False)
            out[:, s1:] -= (err.astype(np.float64) @ x).astype(np.float32)
    return out


class GptqCompensate(Pass):
    """Analysis pass: ctx.analysis['written'] = the graph whose weights the writer quantizes, each 2-D weight whose
    planned format quantizes (not the token embedding, whose rows are also looked up one by one) replaced by its
    compensated W', computed when the writer reads it, so that memory holds one weight at a time. The model itself
    is unchanged: W' is not a better float model, only a better thing to quantize, so the reference outputs and
    the presets measured beside a plan still come from the source weights. Weights whose input has no full
    covariance in the calibration stay as they are (the calibration's max_full bounds what a big model's
    statistics cost)."""

    name = "gptq"

    def __init__(self, damp: float = DEFAULT_DAMP):
        self.damp = damp

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        cal = ctx.analysis.get("calibration")
        if cal is None:
            raise EdgeqError(None, "--gptq compensates with the calibration's input covariances: drop "
                                   "--no-calibration")
        skip = {n for node in graph.nodes if node.op == "embedding" for n in node.inputs[1:2]}
        imatrix = cal.imatrix()
        factors: dict[str, np.ndarray] = {}     # one U per input (q/k/v share theirs), made on first use

        def factor(key: str) -> np.ndarray:
            if key not in factors:
                factors.clear()                 # the writer goes layer by layer: keep one input's factor
                factors[key] = inverse_cholesky(cal.inputs[key].full(), self.damp)
            return factors[key]

        weights = dict(graph.weights)
        done = []
        for name, t in graph.weights.items():
            tp = plan.tensors.get(name)
            stats = cal.stats(name)
            if tp is None or name in skip or len(t.shape) != 2 or stats is None or stats.sum_outer is None:
                continue
            fmt = get_format(tp.format)
            if fmt.quantize_fn is None or fmt.bits_per_weight >= 16 or tp.rank:
                continue
            key = cal.weight_input[name]

            def load(t=t, fmt=fmt, key=key, imp=imatrix.get(name)) -> np.ndarray:
                return compensate(t.numpy(), fmt, factor(key), imp)

            weights[name] = replace(t, load=load, source_bytes=None)
            done.append(name)
        ctx.record(self.name, damp=self.damp, compensated=len(done),
                   skipped=sum(1 for t in graph.weights.values() if len(t.shape) == 2) - len(done))
        ctx.analysis["written"] = replace(graph, weights=weights)
        return graph, plan
