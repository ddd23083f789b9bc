"""`edgeq search --supernet digits`: stage widths x int8/float of a CNN once-for-all supernet on onnxruntime.

What it wires together (the search itself is passes/search_cnn.py, numpy only):
- the supernet (models/recipes/digits_supernet.py: trained here, seeded, CPU minutes);
- a subnet's model: the supernet's prefix weights with recalibrated batch norm, imported through torch.export
  (importers/torch_export.py) like any `export_module` CNN; its plan: the target's int8 preset, the layers the
  search keeps float set to f32, the activation ranges calibrated on training images and kept only where an int8
  layer reads or writes them (models/cnn.mixed_activations);
- the latency table (predictor/cnn_table.py): whole subnets lowered by the ONNX Target and timed in onnxruntime,
  interleaved, then fitted per layer; read from `--latency-profile FILE` when it exists, else measured and written
  there;
- the expensive labels: a configuration lowered by the ONNX Target and run in onnxruntime on the validation
  images (its real int8 error), through one executor interface (compile/search_labels.InProcess).

The result is a plan (formats, activation ranges, the search record) and the subnet as a `.pt2` beside it:
`edgeq export --model plan.pt2 --plan plan.json -o out/` writes the bundle through the normal pipeline.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.compile.decide import PERCENTILE
from edgeq.compile.search_labels import InProcess
from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan, TensorPlan
from edgeq.importers.torch_export import import_module
from edgeq.models.cnn import mixed_activations, weight_nodes
from edgeq.passes import Context, run_passes
from edgeq.passes.calibrate_ranges import CalibrateRanges
from edgeq.passes.search import SearchSettings
from edgeq.passes.search_cnn import CnnSearchResult, CnnSpace, cross_entropy, search_cnn, uniform_widths
from edgeq.passes.search_space import Budgets, Candidate
from edgeq.predictor.cnn_table import CnnLatencyTable, features
from edgeq.runtime.latency import device_facts, interleaved_times
from edgeq.targets.base import LowerRequest
from edgeq.targets.profiles import get_profile
from edgeq.targets.registry import get_target

SUPERNETS = ("digits",)
CALIB_IMAGES = 256            # training images the activation ranges are calibrated on


@dataclass
class TableSettings:
    """How the latency table is measured: `fit` random mixed points plus every uniform point, `held` more random
    points to judge it, `rounds` x `per_round` batch-1 runs of each, interleaved. Many short rounds: a run takes
    about 0.015 ms, so 7 rounds of 30 saw each model in 7 moments of a loaded machine and the same model's median
    moved by 4 % on average (31 % at most) between two tables; 60 rounds of 10 cost the same seconds."""

    fit: int = 32
    held: int = 12
    rounds: int = 60
    per_round: int = 10
    threads: int = 1


@dataclass
class FinalistTiming:
    """How a search under a share of the full int8 model's measured latency (`latency_ratio`) times for real: the
    full int8 model first (alone, for the record; the evolution searches under the ratio of its predicted latency,
    run_search says why), then every measured point (expensive
    labels and finalists) interleaved with the full int8 model again, `rounds` x `per_round` batch-1 runs each.
    The evolution runs once per level (the limit times it: the table errs by about 10 % either way, so finalists
    come from above and below the limit), and the chosen point is the most accurate on validation images whose
    measured ratio is within the limit less `margin` (a share of it): the report re-times the chosen model in
    another run, and the same model's ratio moved by up to 0.011 between runs on the loaded 2-core machine
    (0.693-0.704x), about 1.5 % of the limit, so a finalist at the limit itself passes one run and fails the next.
    Each point is timed in `passes` independent runs (fresh sessions) and its worst ratio counts: a mixed-format
    model measured 0.59x in the search's run and 0.76x (median; p10 0.56x) in the report's."""

    levels: tuple[float, ...] = (1.1, 1.0, 0.9, 0.8)
    margin: float = 0.03
    rounds: int = 100
    per_round: int = 10
    passes: int = 2             # independent timings (fresh sessions); a point's ratio is its worst


@dataclass
class CnnSearchOptions:
    latency_ms: float | None = None            # the table's predicted ms: deterministic
    latency_ratio: float | None = None         # or a share of the full int8 model's latency (timed pick)
    latency_profile: str | None = None         # the table: read when the file exists, else measured and written
    supernet: str = "digits"
    scale: int = 1
    full_epochs: int = 8
    sandwich_epochs: int = 60                  # 12 left the shallow subnets (block skipped) 10 points behind on val
    depth_epochs: int = 40                     # the elastic-depth phase (digits_supernet.py: why)
    settings: SearchSettings = field(default_factory=lambda: SearchSettings(population=24, generations=12,
                                                                              cheap_labels=400, expensive_labels=8,
                                                                              finalists=3))
    formats: tuple[str, ...] = ("f32", "int8")  # the format menu: ("int8",) searches all-int8 subnets
    table: TableSettings = field(default_factory=TableSettings)
    timing: FinalistTiming = field(default_factory=FinalistTiming)


class SubnetModels:
    """The supernet's subnets as IR graphs, plans and ONNX models through the ONNX Target (memoised by widths)."""

    def __init__(self, supernet, threads: int = 1):
        self.sn = supernet
        self.threads = threads
        self.target = get_target("onnx")
        self.profile = get_profile("cpu")
        self._graphs: dict[tuple[int, ...], Graph] = {}
        self._ranges: dict[tuple[int, ...], dict[str, list[float]]] = {}
        self._work = Path(tempfile.mkdtemp(prefix="edgeq-search-cnn-"))
        self._count = 0

    def graph(self, widths: tuple[int, ...]) -> Graph:
        w = self.sn.point(widths)
        if w not in self._graphs:
            self._graphs[w] = import_module(self.sn.subnet(w), self.sn.example, name=f"{self.sn.name}-supernet")
        return self._graphs[w]

    def ranges(self, widths: tuple[int, ...]) -> dict[str, list[float]]:
        """Every default activation's calibrated range at these widths (the int8 preset's calibration)."""
        w = self.sn.point(widths)
        if w not in self._ranges:
            g = self.graph(w)
            plan = Plan(tensors=self.target.preset_formats(g, "int8"), preset="int8")
            _, plan = run_passes([CalibrateRanges([self.sn.data.x_train[:CALIB_IMAGES]], "supernet training images",
                                                  PERCENTILE)], g, plan, Context(backend="onnx"))
            self._ranges[w] = dict(plan.activations)
        return self._ranges[w]

    def plan(self, widths: tuple[int, ...], formats: tuple[str, ...]) -> Plan:
        """The int8 preset with the search's float layers set to f32 and ranges where an int8 layer needs them."""
        g = self.graph(widths)
        tensors = self.target.preset_formats(g, "int8")
        by_layer = dict(zip([l.weight for l in self.sn.layers], formats))
        for name in weight_nodes(g):
            if by_layer.get(name) == "f32":
                tensors[name] = TensorPlan(format="f32", reason="search: kept float")
            elif name in by_layer:
                tensors[name] = replace(tensors[name], reason="search: int8, per-channel, static activation ranges")
        int8 = {n for n, f in by_layer.items() if f == "int8"}
        ranges = self.ranges(widths)
        acts = {a: ranges[a] for a in mixed_activations(g, int8) if a in ranges}
        return Plan(tensors=tensors, preset="int8", backend="onnx", activations=acts)

    def onnx(self, widths: tuple[int, ...], formats: tuple[str, ...]) -> Path:
        """The model file the ONNX Target writes for this point."""
        self._count += 1
        folder = self._work / f"m{self._count}"
        folder.mkdir()
        lowered = self.target.lower(LowerRequest(self.graph(widths), self.plan(widths, formats), folder, self.profile))
        return lowered.artifacts[0].path

    def session(self, path: Path):
        import onnxruntime as ort

        from edgeq.runtime.onnx_backend import session_options

        return ort.InferenceSession(str(path), session_options(self.threads), providers=["CPUExecutionProvider"])

    def n_quantized(self, widths: tuple[int, ...], formats: tuple[str, ...]) -> int:
        """Quantized activations of a format assignment (the same at every channel width; the elastic depth and
        kernels of `widths` taken)."""
        cs = self.sn.channel_stages
        g = self.graph(tuple(self.sn.full[:cs]) + tuple(self.sn.point(widths)[cs:]))
        return len(mixed_activations(g, {l.weight for l, f in zip(self.sn.layers, formats) if f == "int8"}))

    def error(self, points: list[tuple[tuple[int, ...], tuple[str, ...]]], split: str = "val") -> list[float]:
        """Real error of each point in onnxruntime on the validation (or test) images: the cross-entropy of their
        labels (passes/search_cnn.cross_entropy)."""
        d = self.sn.data
        x, y = (d.x_val, d.y_val) if split == "val" else (d.x_test, d.y_test)
        out = []
        for w, f in points:
            s = self.session(self.onnx(w, f))
            logits = s.run(["logits"], {"images": x})[0]
            out.append(cross_entropy(logits, y))
        return out

    def time(self, points: list[tuple[tuple[int, ...], tuple[str, ...]]], rounds: int, per_round: int,
             progress: Callable | None = None) -> list[dict[str, float]]:
        """Batch-1 latency of each point, all interleaved: median, p10, p90 in ms."""
        feed = {"images": self.sn.example.astype(np.float32)}
        it = points if progress is None else progress(points, desc="latency table: build", unit="model")
        sessions = [self.session(self.onnx(w, f)) for w, f in it]
        runs = {str(i): (lambda s=s: s.run(["logits"], feed)) for i, s in enumerate(sessions)}
        t = interleaved_times(runs, rounds, per_round, warmup=10)
        return [{"median": statistics.median(t[str(i)]) * 1e3, "p10": float(np.percentile(t[str(i)], 10) * 1e3),
                 "p90": float(np.percentile(t[str(i)], 90) * 1e3)} for i in range(len(points))]

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)


def _check_supernet(o: CnnSearchOptions) -> None:
    if o.supernet not in SUPERNETS:
        raise EdgeqError(None, f"unknown --supernet {o.supernet!r} ({', '.join(SUPERNETS)})")
    if o.scale < 1:
        raise EdgeqError(None, "--supernet-scale must be at least 1")


def build_supernet(o: CnnSearchOptions, progress: Callable | None = None):
    """The trained supernet (seeded: the same options give the same weights)."""
    _check_supernet(o)
    from edgeq.models.recipes.digits_supernet import train_digits_supernet

    return train_digits_supernet(o.settings.seed, o.scale, o.full_epochs, o.sandwich_epochs, progress=progress,
                                 depth_epochs=o.depth_epochs)


def supernet_structure(o: CnnSearchOptions):
    """The supernet untrained: its subnets time like the trained ones', so the table and the budget's feasibility
    are settled before minutes of training."""
    _check_supernet(o)
    from edgeq.models.recipes.digits_supernet import untrained_digits_supernet

    return untrained_digits_supernet(o.settings.seed, o.scale)


def table_points(sn, n: int, seed: int) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """`n` random points (widths from the menus, each layer int8 or float), seeded."""
    rng = np.random.default_rng([seed, 7])
    return [(tuple(int(rng.choice(m)) for m in sn.menus), tuple(str(rng.choice(["f32", "int8"])) for _ in sn.layers))
            for _ in range(n)]


def measure_table(models: SubnetModels, ts: TableSettings, seed: int, progress: Callable | None = None) \
        -> CnnLatencyTable:
    """Time uniform and random subnets for real and fit the per-layer table (held-out points judge it)."""
    sn = models.sn
    uniform = [(w, (f,) * len(sn.layers)) for w in uniform_widths(sn.menus, sn.full, sn.channel_stages)
               for f in ("int8", "f32")]
    fit_pts = uniform + table_points(sn, ts.fit, seed)
    held_pts = table_points(sn, ts.fit + ts.held, seed)[ts.fit:]
    timed = models.time(fit_pts + held_pts, ts.rounds, ts.per_round, progress)
    x = np.array([features(sn.layers, w, f, models.n_quantized(w, f)) for w, f in fit_pts + held_pts])
    y = np.array([t["median"] for t in timed])
    device = {**this_device(), "threads": models.threads}
    table = CnnLatencyTable.fitted(sn.name, sn.full, [l.weight for l in sn.layers], x[:len(fit_pts)],
                                   y[:len(fit_pts)], device, x[len(fit_pts):], y[len(fit_pts):])
    table.fit["points"] = [{"widths": list(w), "formats": list(f), **{k: round(v, 5) for k, v in t.items()}}
                           for (w, f), t in zip(fit_pts + held_pts, timed)]
    return table


ISA = ("avx", "fma", "f16c", "vnni", "amx", "sve", "asimd", "i8mm", "neon")


def this_device() -> dict[str, Any]:
    """What the table's timings depend on: the CPU, its kernel-relevant ISA flags, onnxruntime's version."""
    facts = device_facts(("onnxruntime",))
    return {"cpu": facts["cpu"], "flags": [f for f in facts["flags"] if any(k in f for k in ISA)],
            "onnxruntime": facts["runtime_versions"].get("onnxruntime")}


def open_table(o: CnnSearchOptions, models: SubnetModels, progress: Callable | None = None,
               log: Callable[[str], None] | None = None) -> CnnLatencyTable:
    sn = models.sn
    path = Path(o.latency_profile) if o.latency_profile else None
    if path is not None and path.exists():
        table = CnnLatencyTable.load(path)
        table.check_for(sn.name, sn.full, [l.weight for l in sn.layers], path)
        if table.device.get("threads") != models.threads:
            raise EdgeqError(path, f"was measured with {table.device.get('threads')} thread(s), not {models.threads}")
        here = this_device()
        for k in ("cpu", "flags", "onnxruntime"):
            if table.device.get(k) != here[k]:
                theirs, ours = table.device.get(k), here[k]
                if k == "flags":
                    theirs, ours = sorted(set(theirs or []) - set(ours)), sorted(set(ours) - set(theirs or []))
                raise EdgeqError(path, f"was measured with another {k} (there: {theirs}; here: {ours}); measure "
                                       "the table on this machine (name a new file)")
        return table
    table = measure_table(models, o.table, o.settings.seed, progress)
    if log is not None:
        log(f"latency table: {table.fit['samples']} subnets fitted, held-out mean error "
            f"{100 * table.fit.get('held_out_mean_abs_rel_error', float('nan')):.1f} %")
    if path is not None:
        table.save(path)
    return table


@dataclass
class CnnSearch:
    """A finished search: the supernet, its models, the table, the space and the result."""

    supernet: Any
    models: SubnetModels
    table: CnnLatencyTable
    space: CnnSpace
    result: CnnSearchResult
    budget_ms: float                           # the evolution's limit, in the table's (predicted) ms
    full_int8_ms: float | None = None          # measured alone, when the limit is a share of the full int8 model

    def plan(self, c: Candidate) -> Plan:
        fm = self.space.format_names(c)
        p = self.models.plan(c.widths, fm)
        m = self.space.measures(c)
        p.search = {"method": "search", "supernet": self.supernet.name, "stages": list(self.supernet.stages),
                    "widths": list(c.widths), "full_widths": list(self.supernet.full),
                    "predicted_latency_ms": round(m.latency_ms, 5), "budget_latency_ms": round(self.budget_ms, 5),
                    **({"measured_full_int8_ms": round(self.full_int8_ms, 5)} if self.full_int8_ms else {}),
                    "latency_table": {"device": self.table.device, "fit": {k: v for k, v in self.table.fit.items()
                                                                           if k != "points"}},
                    **self.result.record}
        p.calibration = {"activations": f"per-tensor [min, max] of each quantized activation, {PERCENTILE} "
                                        "percentile of |x|", "source": "supernet training images",
                         "images": CALIB_IMAGES}
        return p


def space_of(sn, table: CnnLatencyTable, models: SubnetModels, formats: tuple[str, ...] = ("f32", "int8")) \
        -> CnnSpace:
    nq: dict[tuple, int] = {}
    cs = sn.channel_stages

    def latency(widths: tuple[int, ...], formats: tuple[str, ...]) -> float:
        key = (tuple(widths[cs:]), formats)
        if key not in nq:
            nq[key] = models.n_quantized(widths, formats)
        return table.predict(features(sn.layers, widths, formats, nq[key]))

    return CnnSpace(sn.layers, sn.full, sn.menus, latency, channel_stages=cs, formats=formats)


def run_search(o: CnnSearchOptions, progress: Callable | None = None, log: Callable[[str], None] | None = None,
               supernet=None) -> CnnSearch:
    """Open or measure the latency table, set the limit (`latency_ms`, or `latency_ratio` x the full int8 model's
    predicted latency), check it is reachable (one clear error if not), train (or take) the supernet, and search
    under it. With `latency_ratio` the full int8 model is also timed alone (the record), the finalists are timed
    for real and the choice rests on those timings (timed_pick), so the plan records timings and varies run to
    run; with `latency_ms` it rests on the table alone and is deterministic. Why the evolution's limit is a share of
    the table's own prediction, not of the lone timing: the table's models are timed 58 at a time, interleaved, and
    its absolute scale differs from a model timed alone by more than the table's error (s34, load 8: full int8
    0.0275 ms predicted, 0.0195 ms alone; 0.7 x the lone timing was below every all-int8 point's prediction, while
    the table's own ratios put block-skipped all-int8 subnets at 0.52-0.6x); the pick then rests on measured ratios."""
    o.settings.check()
    if (o.latency_ms is None) == (o.latency_ratio is None):
        raise EdgeqError(None, "a CNN search needs one latency limit: --latency-ms (or, from Python, latency_ratio)")
    if o.latency_ms is not None and not o.latency_ms > 0:
        raise EdgeqError(None, f"--latency-ms must be positive, not {o.latency_ms:g}")
    if o.latency_ratio is not None and not 0 < o.latency_ratio <= 1:
        raise EdgeqError(None, f"the latency ratio must be within (0, 1], not {o.latency_ratio:g}")
    timed = o.latency_ratio is not None
    structure = SubnetModels(supernet if supernet is not None else supernet_structure(o), o.table.threads)
    full_ms = None
    try:
        table = open_table(o, structure, progress, log)
        space = space_of(structure.sn, table, structure, o.formats)
        full = tuple(structure.sn.full)
        if timed:
            full_ms = structure.time([(full, ("int8",) * len(structure.sn.layers))], o.timing.rounds,
                                     o.timing.per_round)[0]["median"]
            full_pred = space.measures(space.point(full, "int8")).latency_ms
            if log is not None:
                log(f"full int8 model: {full_ms:.4f} ms measured, {full_pred:.4f} predicted; the evolution's limit "
                    f"{o.latency_ratio} x predicted = {o.latency_ratio * full_pred:.4f} ms (the pick: measured ratios)")
        budget = o.latency_ms if o.latency_ms is not None else o.latency_ratio * full_pred
        budgets = Budgets(None, float(budget))
        space.feasible_anchor(budgets)                  # nothing meets the limit: say so before training
    finally:
        structure.close()
    sn = supernet if supernet is not None else build_supernet(o, progress)
    models = SubnetModels(sn, o.table.threads)
    try:
        space = space_of(sn, table, models, o.formats)
        executor = InProcess(lambda c: models.error([(c.widths, space.format_names(c))])[0])

        def measure(points: list[Candidate]) -> list[float]:
            return executor.map(points, progress, "search: real int8 error (onnxruntime)")

        extra = {"levels": o.timing.levels, "pick": timed_pick(models, space, o.latency_ratio, o.timing)} \
            if timed else {}
        result = search_cnn(space, budgets, sn.loss,
                            measure, o.settings, progress, **extra)
        return CnnSearch(sn, models, table, space, result, float(budget), full_ms)
    except BaseException:
        models.close()
        raise


def timed_pick(models: SubnetModels, space: CnnSpace, ratio: float, t: FinalistTiming):
    """APQ's "re-measure the finalists for real", for latency too: every measured point is timed interleaved with
    the full int8 model, and the most accurate (validation cross-entropy) whose measured ratio is within
    `ratio` x (1 - margin) is chosen, ties to the accuracy predictor's estimate, then
    to the faster. If none is, the fastest is, and the record
    says so. Why: the table's error
    (about 10 % mean on held-out subnets) is what an evolution under a predicted limit finds and exploits."""

    def pick(measured: dict[Candidate, float], score: Callable[[list[Candidate]], np.ndarray]) \
            -> tuple[Candidate, dict[str, Any]]:
        pool = list(measured)
        predicted = dict(zip(pool, score(pool)))
        full = tuple(models.sn.full)
        runs = [models.time([(full, ("int8",) * len(models.sn.layers))]
                            + [(c.widths, space.format_names(c)) for c in pool], t.rounds, t.per_round)
                for _ in range(t.passes)]
        ref = runs[0][0]["median"]
        ratios = {c: max(r[i + 1]["median"] / r[0]["median"] for r in runs) for i, c in enumerate(pool)}
        times = runs[0]
        limit = ratio * (1 - t.margin)
        within = [c for c in pool if ratios[c] <= limit]
        best = min(within, key=lambda c: (measured[c], predicted[c], ratios[c], pool.index(c))) if within else \
            min(pool, key=lambda c: (ratios[c], measured[c], pool.index(c)))
        record = {"full_int8_ms": round(ref, 5), "ratio": ratio, "margin": t.margin, "limit_ratio": round(limit, 4),
                  "within_limit": bool(within), "rounds": t.rounds, "per_round": t.per_round, "passes": t.passes,
                  "points": [{"widths": list(c.widths), "formats": list(space.format_names(c)),
                              "val_loss": round(measured[c], 6), "measured_ms": round(tm["median"], 5),
                              "predicted_ms": round(space.measures(c).latency_ms, 5),
                              "ratio": round(ratios[c], 4)} for c, tm in zip(pool, times[1:])]}
        return best, record

    return pick


def save_search(s: CnnSearch, out: str | Path) -> tuple[Path, Path]:
    """The plan JSON at `out` and the subnet's ExportedProgram beside it (`out` with suffix .pt2)."""
    import io

    import torch

    from edgeq.core.fs import atomic_write_bytes

    out = Path(out)
    plan = s.plan(s.result.best)
    model_path = out.with_suffix(".pt2")
    sub = s.supernet.subnet(s.result.best.widths)
    ep = torch.export.export(sub, (torch.from_numpy(s.supernet.example),))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    atomic_write_bytes(model_path, buf.getvalue())
    plan.save(out)
    return out, model_path
