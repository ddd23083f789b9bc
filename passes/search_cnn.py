"""`edgeq search` for CNNs (APQ over a once-for-all supernet): per-stage channel widths x int8/float per layer.

The same search as the decoders' (search.py), on another space:

- the space (`CnnSpace`): one gene per conv/linear (f32 or int8: the ONNX CNN lowering's static INT8), one width
  per stage from the supernet's menu (a prefix of its importance-sorted channels; any width of a stage is valid
  whatever the formats, as per-tensor activation scales and per-channel weight scales slice freely), and the
  supernet's elastic stages after its channel stages (once-for-all's depth and kernel size: a block skipped or
  kept, a kernel 1 or 3), which ride in the same widths tuple (larger = slower and more accurate, like widths);
- what a point costs: latency from a per-layer latency table fitted on real onnxruntime timings of whole models
  (edgeq/predictor/cnn_table.py, handed in as a callable), bytes from the weights' formats;
- accuracy, APQ's transfer (search_accuracy.py): the predictor is pre-trained on cheap labels (the float error of
  the width configuration, measured on validation images with the supernet's recalibrated subnet: formats do not
  change it) and fine-tuned on expensive labels (the real int8 error of whole configurations exported through the
  compile pipeline and run in onnxruntime, on the same validation images); the error is the labels'
  cross-entropy (`cross_entropy`: the 0/1 error of 300 images cannot rank subnets a point apart);
- evolution (search.evolve), seeded from the anchor, the uniform points within the budget and the measured
  points, once per level of the limit (`levels`); the finalists (canonical points: `CnnSpace.canonical`) are
  measured for real and the best measured point (finalists and expensive labels alike, ties to the faster) is the
  result, or what `pick` chooses on real timings (compile/search_cnn.timed_pick).

Budgets: a latency limit (ms, the table's prediction); a byte budget is not offered for CNNs yet.
Deterministic without `pick`: the same supernet, table, labels and seed give the same point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.models.cnn import StageLayer
from edgeq.passes.search import SearchSettings, _unique, evolve
from edgeq.passes.search_accuracy import AccuracyPredictor
from edgeq.passes.search_space import Budgets, Candidate, Gene, GeneSpace, Measures

CNN_FORMATS = ("f32", "int8")


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean cross-entropy of the labels under the logits: the search's error (positive: the predictor learns
    log-errors). Not the 0/1 error: on 300 validation images an image is a third of a point, and among the digits
    supernet's good subnets (test accuracy >= 0.97) the validation accuracy did not rank test accuracy at all
    (Spearman -0.01, 14 subnets) while the cross-entropy did (0.78)."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def uniform_widths(menus: list[list[int]], full: list[int], channel_stages: int) -> list[tuple[int, ...]]:
    """Uniformly slimmed widths, narrowest first: every channel stage at the same menu position (the k-th
    narrowest), the elastic stages after them (depth, kernels) at full."""
    cs = channel_stages
    steps = min(len(m) for m in menus[:cs])
    return [tuple(m[len(m) - steps + k] for m in menus[:cs]) + tuple(full[cs:]) for k in range(steps)]


class CnnSpace(GeneSpace):
    """Stage widths x a format per conv/linear, with bytes and the latency table's prediction of a point."""

    hint = "raise --latency-ms: the fastest point is the floor of this supernet on this device"

    def __init__(self, layers: list[StageLayer], full: list[int], menus: list[list[int]],
                 latency: Callable[[tuple[int, ...], tuple[str, ...]], float], channel_stages: int | None = None,
                 formats: tuple[str, ...] = CNN_FORMATS):
        if "int8" not in formats or not set(formats) <= set(CNN_FORMATS):
            raise EdgeqError(None, f"a CNN search's formats are int8 or {', '.join(CNN_FORMATS)}, not "
                                   f"{', '.join(formats)}")
        self.formats = tuple(f for f in CNN_FORMATS if f in formats)      # the format menu (SpaceEvo's format set)
        super().__init__([Gene([l.weight], list(self.formats)) for l in layers], list(full),
                         [sorted(set(m) | {f}) for m, f in zip(menus, full)])
        self.layers = layers
        self._latency = latency
        self.channel_stages = len(full) if channel_stages is None else channel_stages   # the rest: depth, kernels

    def format_names(self, c: Candidate) -> tuple[str, ...]:
        return tuple(g.formats[i] for g, i in zip(self.genes, c.formats))

    def measures(self, c: Candidate) -> Measures:
        m = self._cache.get(c)
        if m is None:
            fm = self.format_names(c)
            nbytes = sum(int(l.params(c.widths) * get_format(f).bits_per_weight) // 8 for l, f in zip(self.layers, fm))
            m = self._cache[c] = Measures(nbytes, float(self._latency(c.widths, fm)))
        return m

    def canonical(self, c: Candidate) -> Candidate:
        """The same subnet written one way: what only skipped layers use (a stage's width or kernel size, a skipped
        layer's format) set to full width and int8. With the residual block skipped its inner width, kernels and
        formats change nothing (not the model, its latency or its error), so finalists that differ only there are
        one model, measured once."""
        stages = [(l.out_stage, l.in_stage, l.kernel_stage, l.depth_stage) for l in self.layers]
        used = {st for l, ss in zip(self.layers, stages) if l.present(c.widths) for st in ss if st is not None}
        named = {st for ss in stages for st in ss if st is not None}
        depth = {l.depth_stage for l in self.layers if l.depth_stage is not None}
        widths = tuple(w if i in used or i in depth or i not in named else self.full[i] for i, w in enumerate(c.widths))
        q = self.formats.index("int8")
        fmts = tuple(f if l.present(c.widths) else q for l, f in zip(self.layers, c.formats))
        return Candidate(fmts, widths)

    def point(self, widths: tuple[int, ...], fmt: str) -> Candidate:
        """Every layer in `fmt` at these widths (a uniform point)."""
        return Candidate(tuple(self.formats.index(fmt) for _ in self.genes), tuple(int(w) for w in widths))

    def anchors(self) -> dict[str, Candidate]:
        """The smallest point (int8, narrowest) and the fastest (each layer's faster format in turn, narrowest)."""
        narrow = tuple(m[0] for m in self.menus)
        small = self.point(narrow, "int8")
        fmts = list(small.formats)
        for g in range(len(self.genes)):
            fmts[g] = min(range(len(self.formats)), key=lambda i: (self._latency(
                narrow, tuple(self.formats[j if k != g else i] for k, j in enumerate(fmts))), i))
        return {"smallest": small, "fastest": Candidate(tuple(fmts), narrow)}

    def uniform_slim(self, fmt: str = "int8") -> list[Candidate]:
        """The uniformly slimmed points: every channel stage at the same menu position (the k-th narrowest), full
        depth and kernels, one format."""
        return [self.point(w, fmt) for w in uniform_widths(self.menus, self.full, self.channel_stages)]


@dataclass
class CnnSearchResult:
    best: Candidate
    finalists: list[Candidate]
    measured: dict[Candidate, float]          # real error (cross-entropy) on the validation images
    record: dict[str, Any]


Pick = Callable[[dict[Candidate, float], Callable[[list[Candidate]], np.ndarray]], tuple[Candidate, dict[str, Any]]]


def search_cnn(space: CnnSpace, budgets: Budgets, cheap_error: Callable[[tuple[int, ...]], float],
               measure: Callable[[list[Candidate]], list[float]] | None, s: SearchSettings,
               progress: Callable | None = None, levels: tuple[float, ...] = (1.0,), pick: Pick | None = None) \
        -> CnnSearchResult:
    """The best point within `budgets`: `cheap_error(widths)` labels the pre-training, `measure(points)` the real
    errors (expensive labels, finalists).

    `levels`: the evolution runs once per level, under the latency limit times it, and each run's best
    `s.finalists` points are finalists; a level above 1 admits points the table predicts over the limit, so it is
    for a `pick` that times the points for real. `pick(measured, score)` chooses among every measured point
    (expensive labels and finalists, with their real errors; `score` is the accuracy predictor) and returns its
    record; without it, the best measured point
    within the budgets wins (ties to the faster), which is deterministic."""
    anchor = space.feasible_anchor(budgets)             # one clear error when nothing meets the budget
    rng = np.random.default_rng(s.seed)
    pts = [space.random(rng) for _ in range(s.cheap_labels)]
    widths = _unique_widths(pts)
    it = widths if progress is None else progress(widths, desc="search: cheap labels (float, width only)",
                                                  unit="config")
    cheap = {w: cheap_error(w) for w in it}

    def cheap_of(w: tuple[int, ...]) -> float:
        if w not in cheap:
            cheap[w] = cheap_error(w)
        return cheap[w]

    x_cheap = np.array([space.features(c) for c in pts])
    y_cheap = np.array([cheap[c.widths] for c in pts])
    measured: dict[Candidate, float] = {}
    if measure is not None and s.expensive_labels:
        todo = _unique([space.canonical(space.sample(rng, anchor, budgets)) for _ in range(s.expensive_labels)])
        measured.update(zip(todo, measure(todo)))
    x_exp = np.array([space.features(c) for c in measured]) if measured else None
    y_exp = np.array(list(measured.values())) if measured else None
    predictor = AccuracyPredictor("transfer", seed=s.seed).fit(x_cheap, y_cheap, x_exp, y_exp)

    def score(cs: list[Candidate]) -> np.ndarray:
        return predictor.predict(np.array([space.features(c) for c in cs]))

    uniform = [c for f in space.formats for c in space.uniform_slim(f)]
    finalists: list[Candidate] = []
    level_of: dict[Candidate, float] = {}
    for level in levels:
        b = replace(budgets, latency_ms=budgets.latency_ms * level) if budgets.latency_ms is not None else budgets
        try:
            a = anchor if space.measures(anchor).meets(b) else space.feasible_anchor(b)
        except EdgeqError:
            continue                                    # a level below what the space reaches: nothing to add
        seeds = _unique([a] + [c for c in uniform + list(measured) if space.measures(c).meets(b)])
        ranked = _unique([space.canonical(c) for c in evolve(space, score, b, seeds, a, rng, s, progress)])
        for c in [c for c in ranked if c not in level_of][:max(1, s.finalists)]:
            level_of[c] = level
            finalists.append(c)
    pick_record: dict[str, Any] = {}
    if measure is not None and s.finalists:
        todo = [c for c in finalists if c not in measured]
        measured.update(zip(todo, measure(todo)))
        if pick is not None:
            best, pick_record = pick(measured, score)
        else:
            within = [c for c in measured if space.measures(c).meets(budgets)]
            best = min(within, key=lambda c: (measured[c], space.measures(c).latency_ms, list(measured).index(c)))
    else:
        best = finalists[0]

    def point(c: Candidate) -> dict[str, Any]:
        m = space.measures(c)
        d = {"widths": list(c.widths), "formats": list(space.format_names(c)),
             "predicted_latency_ms": round(m.latency_ms, 5), "weight_bytes": m.bytes,
             "cheap_error": round(cheap_of(c.widths), 6),
             "predicted_log_error": round(float(score([c])[0]), 6)}
        if c in level_of:
            d["level"] = level_of[c]
        if c in measured:
            d["val_loss"] = round(measured[c], 6)
        return d

    n_cheap = len(cheap)
    record = {"settings": asdict(s), "budget_latency_ms": budgets.latency_ms, "cheap_labels": len(pts),
              "cheap_widths": n_cheap, "measured_configurations": len(measured),
              "finalists": [point(c) for c in finalists], "chosen": point(best),
              "expensive_labels": [point(c) for c in measured]}
    if list(levels) != [1.0]:
        record["levels"] = list(levels)
    if pick_record:
        record["timed"] = pick_record
    return CnnSearchResult(best, finalists, measured, record)


def _unique_widths(pts: list[Candidate]) -> list[tuple[int, ...]]:
    return list(dict.fromkeys(c.widths for c in pts))
