"""calibrate_replay: a linear input's full second moments Σ_t x_t x_tᵀ over the calibration windows, recomputed
when a pass asks for them, so that nobody holds every input's covariance at once.

Calibration keeps, per input, the diagonal (the importance matrix) and, where a cost reads it all the time, the full
sum of outer products: on a 135M model that is ~0.8 GB of float64 matrices held through the whole plan, on a 1B
model several GB. GPTQ's pricing reads each input's H only while it prices that input's weights (q/k/v share one,
gate/up share one), so its covariances come from here instead: the residual stream entering a few segments (the
graph cut where a single value is live, as the Fisher pass cuts it) is stored per window after one forward run,
and the input of a linear is recomputed from the nearest stored value below it. Checkpoints every ~√S of the S
segments, and the values between the last checkpoint and the segment asked for kept until a lower one is asked
for, so a top-down walk (the Fisher stream's order) recomputes the forward about once in all (a walk up goes on
from the last value recomputed: once too).

The sums are those `calibrate.collect` would have accumulated, bit for bit: the same ops on each window alone, in
window order, each window's float32 product xᵀx added to a float64 sum, then symmetrised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeq.core.executor import OPS, Executor
from edgeq.core.ir import Graph

FED = ("tokens", "positions", "token_types")


def segments(graph: Graph) -> list[tuple[int, int, str | None]]:
    """[(first node, end, the one value live on entry or None for the graph's inputs)], cut wherever a single
    value produced by a node (on a decoder: the residual stream) is all that later nodes still read."""
    nodes = graph.nodes
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            last_use[v] = i
    cuts: list[tuple[int, str | None]] = [(0, None)]
    live: set[str] = set()
    for i in range(1, len(nodes)):
        out = nodes[i - 1].outputs[0]
        if last_use.get(out, -1) >= i:
            live.add(out)
        live = {v for v in live if last_use[v] >= i}
        if len(live) == 1:
            cuts.append((i, next(iter(live))))
    return [(lo, hi, v) for (lo, v), (hi, _) in zip(cuts, cuts[1:] + [(len(nodes), None)])]


@dataclass
class MomentReplay:
    """Full input second moments of `graph`'s linears over `windows`, one input at a time (`sum_outer`)."""

    graph: Graph
    windows: list[list[int]]
    _segs: list = field(default_factory=list, repr=False)
    _stored: dict[int, list[np.ndarray]] | None = field(default=None, repr=False)     # checkpoints' entries
    _between: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)  # recomputed, kept while useful

    def __post_init__(self) -> None:
        self._segs = segments(self.graph)
        self._ex = Executor(self.graph, cache_weights=False)
        self._every = max(1, round(math.sqrt(len(self._segs))))
        self._reader: dict[str, int] = {}           # input -> the first linear node that reads it
        for i, node in enumerate(self.graph.nodes):
            if node.op == "linear":
                self._reader.setdefault(node.inputs[0], i)

    @property
    def held(self) -> int:
        """Residual-stream values held (one per window each): checkpoints plus the values kept between."""
        return len(self._stored or {}) + len(self._between)

    def sum_outer(self, key: str) -> np.ndarray:
        """Σ over every window's tokens of x xᵀ for the linear input `key` (float64, symmetrised)."""
        i = self._reader[key]
        k = max(j for j, (lo, _, _) in enumerate(self._segs) if lo <= i)
        envs = self._entering(k)
        self._run(envs, self._segs[k][0], i)
        total = np.zeros((envs[0][key].shape[-1],) * 2)
        for env in envs:                    # window order, as calibration accumulates them
            x = np.asarray(env[key], dtype=np.float32)
            total += x.T @ x
        del envs
        total += total.T                    # (in place: the same sums as (total + total.T) / 2, one matrix less)
        total /= 2
        return total

    def drop(self) -> None:
        """Let go of the stored residual streams (recomputed if asked again)."""
        self._stored, self._between = None, {}

    # --- the residual stream at segment entries ------------------------------------------------------------
    def _fresh(self, k: int, entry: list[np.ndarray] | None) -> list[dict]:
        envs = []
        for w, tokens in enumerate(self.windows):
            t = np.asarray(tokens, dtype=np.int64)
            env = {"tokens": t, "positions": np.arange(t.size), "token_types": np.zeros_like(t)}
            if entry is not None:
                env[self._segs[k][2]] = entry[w]
            envs.append(env)
        return envs

    def _entering(self, k: int) -> list[dict]:
        """Fresh per-window environments holding what enters segment k."""
        if self._stored is None:
            self._stored = {0: None}
            self._advance(0, max(j for j in range(0, len(self._segs), self._every)), store_every=True)
        if k in self._stored:
            return self._fresh(k, self._stored[k])
        if k in self._between:
            # a walk down needs nothing above this any more
            self._between = {j: v for j, v in self._between.items() if j <= k}
            return self._fresh(k, self._between[k])
        # from the nearest value below: a checkpoint, or (a walk up) the last value recomputed
        c = max(j for j in (*self._stored, *self._between) if j < k)
        self._between = {c: self._between[c]} if c in self._between else {}
        self._advance(c, k, store_every=False)
        return self._fresh(k, self._between[k])

    def _advance(self, c: int, k: int, store_every: bool) -> None:
        """Run segments c..k-1 from the stored entry of c, storing the entries of c+1..k (checkpoints only, or
        all of them)."""
        envs = self._fresh(c, self._stored[c] if c in self._stored else self._between[c])
        for j in range(c, k):
            lo, hi, _ = self._segs[j]
            self._run(envs, lo, hi)
            nxt = self._segs[j + 1][2]
            entry = [env[nxt] for env in envs]
            if store_every:
                if (j + 1) % self._every == 0:
                    self._stored[j + 1] = entry
            else:
                self._between[j + 1] = entry
            for env in envs:
                for name in [n for n in env if n not in FED and n != nxt]:
                    del env[name]

    def _run(self, envs: list[dict], lo: int, hi: int) -> None:
        """Nodes [lo, hi) over every window, each weight loaded once for all of them (as the executor streams)."""
        for node in self.graph.nodes[lo:hi]:
            weights = {n: self._ex.weight(n) for n in node.inputs if n in self.graph.weights}
            for env in envs:
                env[node.outputs[0]] = OPS[node.op](self._ex, node, [env[n] if n in env else weights[n]
                                                                     for n in node.inputs])
            del weights
