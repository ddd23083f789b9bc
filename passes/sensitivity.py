"""sensitivity: for every 2-D tensor and every candidate format, the output error and the exact bytes.

Cost of writing weight W (out x in) in format f:

    cost = tr(ΔW · C · ΔWᵀ),   ΔW = dequantize(quantize(W, imatrix)) − W,   C = E[xxᵀ] of W's input

i.e. the mean squared error the quantized layer adds to its output over the
calibration tokens. The round trip is the registry's reference quantizer,
bit-identical to what the backend writes (ggml's own code for GGUF), with
the importance matrix the writer will use. C is the full second-moment
matrix where calibration kept one, else its diagonal; without calibration,
the identity (plain weight MSE). The tied embedding, which is both the token
lookup and the output head, adds the lookup error Σ_t p(t)·‖ΔW_t‖² (p: token
frequencies of the calibration text) to the head's output error.

Bytes are what the tensor adds to the backend's model files (a FileLayout per
backend: GGUF 32-byte aligned data, targets/gguf/layout.py; ONNX initializers
and the nodes that read them, targets/onnx/layout.py; TVM stored arrays and
their safetensors header entries, with the built library as fixed bytes,
targets/tvm/layout.py), so that a plan's predicted size is the size of the
files written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from edgeq.core.cache import cache_dir, read_json_entry, write_json_entry
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format, candidate_formats
from edgeq.core.ir import Graph
from edgeq.core.layout import FileLayout
from edgeq.core.plan import Plan
from edgeq.passes import lowrank_compensate as lr
from edgeq.passes.base import Context, Pass
from edgeq.passes.calibrate import source_digest
from edgeq.passes.gptq import DEFAULT_DAMP, Hessian, written_values

SENSITIVITY_VERSION = 1
LOWRANK_VERSION = 1
BRANCH_MAX_BPW = 7.0          # a low-rank branch is considered only on formats below this (not f16/q8_0)


@dataclass
class Option:
    """One way to write one tensor: a format (and low-rank branch rank), its exact bytes and its cost."""

    format: str
    bytes: int
    cost: float
    rank: int = 0
    branch_bytes: int = 0            # bytes of the low-rank branch (counted in `bytes` too)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CostTable:
    """The sensitivity pass's result: per decidable tensor, its options; plus the bytes nobody decides."""

    options: dict[str, list[Option]]
    fixed_bytes: int                         # file overhead and undecided tensors (1-D, f32)
    n_params: int                            # source parameters, the denominator of bits per weight
    info: dict[str, Any] = field(default_factory=dict)

    def min_bytes(self) -> int:
        return self.fixed_bytes + sum(min(o.bytes for o in opts) for opts in self.options.values())

    def option(self, tensor: str, fmt: str, rank: int = 0) -> Option:
        for o in self.options[tensor]:
            if o.format == fmt and o.rank == rank:
                return o
        raise KeyError(f"{tensor}: no option {fmt} rank {rank}")

    def to_json(self) -> dict[str, Any]:
        return {"fixed_bytes": self.fixed_bytes, "n_params": self.n_params, "info": self.info,
                "options": {k: [o.to_json() for o in v] for k, v in self.options.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CostTable":
        return cls({k: [Option(**o) for o in v] for k, v in d["options"].items()}, d["fixed_bytes"], d["n_params"],
                   d.get("info", {}))


def output_error(dw: np.ndarray, cov32: np.ndarray | None, diag: np.ndarray | None,
                 rows: np.ndarray | None = None) -> float:
    """tr(ΔW C ΔWᵀ) with C full (float32 matrix), diagonal, or the identity; Σ_o rows_o (ΔW C ΔWᵀ)_oo with `rows`
    (per-output-channel Fisher weights, see passes/fisher.py)."""
    if cov32 is not None:
        # float32 BLAS throughout (an einsum with dtype=float64 would copy both operands to float64)
        if rows is None:
            return float(np.dot((dw @ cov32).ravel(), dw.ravel()))
        return float(np.einsum("ij,ij->i", dw @ cov32, dw).astype(np.float64) @ rows)
    sq = np.square(dw, dtype=np.float32)
    if rows is not None:
        per_row = sq @ diag.astype(np.float32) if diag is not None else sq.sum(1)
        return float(per_row.astype(np.float64) @ rows)
    if diag is not None:
        return float(sq.astype(np.float64).sum(0) @ diag)
    return float(sq.sum(dtype=np.float64))


def lookup_error(dw: np.ndarray, p: np.ndarray, cols: np.ndarray | None = None) -> float:
    """Σ_t p(t) ‖ΔW_t‖²: the error the embedding lookup adds to the residual stream (Fisher-weighted per
    dimension with `cols`)."""
    sq = np.square(dw, dtype=np.float32)
    if cols is not None:
        return float((sq @ cols.astype(np.float32)).astype(np.float64) @ p)
    return float(sq.sum(1, dtype=np.float64) @ p)


def tensor_options(name: str, w: np.ndarray, fmts: list[Format], stats, importance: np.ndarray | None,
                   token_p: np.ndarray | None, layout: FileLayout, ranks: list[int] = (), scaling=None,
                   fisher_rows: np.ndarray | None = None, fisher_lookup: np.ndarray | None = None,
                   fisher_cov: np.ndarray | None = None, gptq: Hessian | None = None) -> list[Option]:
    """Every candidate format that can carry `w` natively, with its cost (see module docstring).

    With `ranks` (and the input's `scaling`, see lowrank_compensate), each format below BRANCH_MAX_BPW
    also gets options with a rank-r error branch: its cost is the output error left after the branch, its
    bytes include the branch's bytes (`layout`: what each adds to the backend's files). With Fisher
    weights (`fisher_rows`, and the token-weighted input covariance `fisher_cov` in place of C where given)
    every cost is Fisher-weighted, the branches' residuals too. With `gptq` (the input's damped H, passes/gptq.py)
    each quantizing format is priced by the error of its compensated weights, what GPTQ writes.
    """
    cov32 = diag = full = None
    if fisher_cov is not None:
        full = fisher_cov.astype(np.float64)
        cov32 = fisher_cov.astype(np.float32)
    elif stats is not None:
        full = stats.full()
        if full is not None:
            cov32 = full.astype(np.float32)
        else:
            diag = stats.diag()
    ranks = sorted(r for r in set(ranks) if r > 0)
    out = []
    for f in fmts:
        if not f.can_carry(w.shape) or (f.requires_imatrix and importance is None):
            continue        # (a format written from an importance matrix only, for a tensor that has none)
        imp = importance if f.takes_imatrix else None
        if gptq is not None and f.quantize_fn is not None and f.bits_per_weight < 16:
            dw = written_values(w, f, gptq, imp) - w
        else:
            dw = f.roundtrip(w, imp) - w
        cost = out_cost = output_error(dw, cov32, diag, fisher_rows)
        if token_p is not None:
            cost += lookup_error(dw, token_p, fisher_lookup)
        base_bytes = layout.tensor_bytes(name, w.shape, f)
        out.append(Option(f.name, base_bytes, cost))
        if ranks and token_p is None and f.bits_per_weight < BRANCH_MAX_BPW:
            a, b = lr.branch(-dw, scaling, max(ranks))
            costs = lr.branch_costs(-dw, a, b, ranks, full, diag, out_cost, fisher_rows)
            for r in ranks:
                if r > a.shape[0]:
                    continue
                extra = layout.branch_bytes(name, w.shape, r)
                out.append(Option(f.name, base_bytes + extra, costs[r], rank=r, branch_bytes=extra))
        del dw
    if not out:
        raise EdgeqError(None, f"no candidate format can carry {name} of shape {w.shape}")
    return out


def embedding_name(graph: Graph) -> str | None:
    for node in graph.nodes:
        if node.op == "embedding":
            return node.inputs[1]
    return None


def bytes_table(graph: Graph, layout: FileLayout, formats: list[str] | None) -> CostTable:
    """The options' bytes alone (costs 0): enough to check a budget's feasibility before calibrating."""
    fmts = candidate_formats(layout.backend, formats)
    options = {}
    for n, t in graph.weights.items():
        if len(t.shape) == 2:
            options[n] = [Option(f.name, layout.tensor_bytes(n, t.shape, f), 0.0) for f in fmts
                          if f.can_carry(t.shape)]
            if not options[n]:
                raise EdgeqError(None, f"no candidate format can carry {n} of shape {t.shape}")
    return CostTable(options, layout.overhead, graph.n_params, {"formats": [f.name for f in fmts]})


def compute_costs(graph: Graph, fmts: list[Format], calibration, layout: FileLayout,
                  progress: Callable | None = None, ranks: list[int] = (),
                  scaling_mode: str = "exact", fisher=None, gptq: bool = False,
                  act_order: bool = False, conditional: bool = False) -> CostTable:
    """The cost of every candidate for every 2-D weight. `fisher`: output_fisher's dict, or a FisherSource
    whose statistics are computed a segment at a time as the costs use them (so a plan never holds every
    weight's token-weighted covariance at once). `gptq`: price each quantizing format by its compensated
    weights' error: compensated through the calibration's E[xxᵀ] as the writer compensates (passes/gptq.py),
    measured by the cost (Fisher-weighted where the Fisher is on)."""
    decide = [n for n, t in graph.weights.items() if len(t.shape) == 2]
    embd = embedding_name(graph)
    imatrix = calibration.imatrix() if calibration is not None else {}
    base_p = None
    if calibration is not None and calibration.token_counts is not None:
        base_p = calibration.token_counts / max(calibration.token_counts.sum(), 1)
    options = {}
    scalings: dict[str, lr.Scaling] = {}        # one per distinct input (q/k/v share theirs)
    hessians: dict[str, Hessian] = {}           # gptq: the input's H, kept while its weights come
    priced = 0
    if fisher is None:
        parts: Iterator[dict[str, np.ndarray]] = iter([{}])
        token_weighted = False
    elif isinstance(fisher, dict):
        parts, token_weighted = iter([fisher]), any(k.startswith("cov:") for k in fisher)
    else:
        parts, token_weighted = fisher.stream(), fisher.token_weighted

    def each() -> Iterator[tuple[dict[str, np.ndarray], str]]:
        for part in parts:
            yield from ((part, n) for n in decide
                        if n not in options and (not streamed or n in part or f"lookup:{n}" in part))

    streamed = fisher is not None and not isinstance(fisher, dict)
    it = each() if progress is None else progress(each(), desc="fisher + sensitivity" if streamed else "sensitivity",
                                                  unit="tensor", total=len(decide))
    for part, name in it:
        w = graph.weights[name].numpy()
        stats = calibration.stats(name) if calibration is not None else None
        sc = None
        if any(r > 0 for r in ranks) and name != embd:
            key = calibration.weight_input.get(name, name) if calibration is not None else name
            if key not in scalings:
                scalings[key] = lr.scaling(scaling_mode, w.shape[1], *((stats.full(), stats.diag())
                                                                       if stats is not None else (None, None)))
            sc = scalings[key]
        u = None
        fcov = part.get(f"cov:{name}")
        if gptq and name != embd and calibration is not None and calibration.has_full(name):
            # The writer's H (the calibration's E[xxᵀ], passes/gptq.py), not the cost's C_F: the price is the
            # cost of what is written (compensating through C_F priced weights no file holds). One input's H at
            # a time (its weights come one after another: q/k/v, gate/up), computed when first needed where the
            # calibration defers full covariances, and dropped with the next input's.
            key = calibration.weight_input[name]
            if key not in hessians:
                hessians.clear()
                hessians[key] = Hessian.of(calibration.full(name), DEFAULT_DAMP, act_order, conditional)
            u = hessians[key]
            priced += 1
        token_p = None
        if name == embd and base_p is not None:
            token_p = base_p * part[f"lookup_tokens:{embd}"] if f"lookup_tokens:{embd}" in part else base_p
        options[name] = tensor_options(name, w, fmts, stats, imatrix.get(name), token_p, layout,
                                       ranks if sc is not None else (), sc, part.get(name),
                                       part.get(f"lookup:{name}"), fcov, u)
        del w, part
    hessians.clear()
    if calibration is not None and calibration.replay is not None:
        calibration.replay.drop()           # the plan's later passes need none of it
    missing = [n for n in decide if n not in options]
    if missing:
        raise EdgeqError(None, f"no Fisher statistics for {missing[0]} (a weight no linear or lookup reads)")
    options = {n: options[n] for n in decide}          # the graph's order, whatever order the statistics came in
    kind = "identity" if calibration is None else "input second moments (full where kept, else diagonal)"
    cost = "tr(dW C dW^T)"
    if fisher is not None and token_weighted:
        cost = "sum_o F_o (dW C_F dW^T)_oo (output Fisher, tokens weighted by gradient energy)"
        kind = "C_F = E[a_t x x^T] / E[a_t], a_t = the token's output-gradient energy"
    elif fisher is not None:
        cost = "sum_o F_o (dW C dW^T)_oo (output Fisher, HAWQ-style)"
    info = {"cost": cost, "C": kind, "formats": [f.name for f in fmts]}
    if any(r > 0 for r in ranks):
        info.update({"ranks": sorted(set(ranks)), "lowrank_scaling": scaling_mode})
    if gptq:
        info["gptq"] = {"damp": DEFAULT_DAMP, "act_order": act_order, "compensated_tensors": priced,
                        "H": "E[xx^T]", **({"importance": "conditional"} if conditional else {})}
    return CostTable(options, layout.overhead, graph.n_params, info)


class Sensitivity(Pass):
    """Analysis pass: ctx.analysis['costs'] = CostTable (the plan is unchanged)."""

    name = "sensitivity"

    def __init__(self, layout: FileLayout, formats: list[str] | None = None, use_cache: bool = True,
                 ranks: list[int] = (), scaling: str = "exact", gptq: bool = False, act_order: bool = False,
                 conditional: bool = False):
        self.layout = layout
        self.gptq, self.act_order, self.conditional = gptq, act_order, conditional
        self.formats = formats
        self.ranks = sorted(r for r in set(ranks) if r > 0)
        self.scaling = scaling
        self.use_cache = use_cache

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        if ctx.backend != self.layout.backend:
            raise EdgeqError(None, f"a {self.layout.backend} file layout cannot size a {ctx.backend} plan")
        fmts = candidate_formats(ctx.backend, self.formats)
        cal = ctx.analysis.get("calibration")
        self._fisher = ctx.analysis.get("fisher")
        path = self._cache_path(graph, cal, fmts)
        table = None
        cached = read_json_entry(path)      # None when absent, or torn (then removed): computed again
        if cached is not None:
            try:
                table = CostTable.from_json(cached)
                table.fixed_bytes = self.layout.overhead
            except (ValueError, KeyError, TypeError, AttributeError):
                table = None
        if table is None:
            table = compute_costs(graph, fmts, cal, self.layout, ctx.progress, self.ranks, self.scaling,
                                  ctx.analysis.get("fisher"), self.gptq, self.act_order, self.conditional)
            write_json_entry(path, table.to_json())
        ctx.analysis["costs"] = table
        ctx.record(self.name, tensors=len(table.options), formats=[f.name for f in fmts],
                   options=sum(len(v) for v in table.options.values()), min_bytes=table.min_bytes())
        return graph, plan

    def _cache_path(self, graph: Graph, cal, fmts: list[Format]):
        root = cache_dir() if self.use_cache else None
        if root is None:
            return None
        cal_id = None if cal is None else json.dumps(cal.info, sort_keys=True, default=str)
        parts = [SENSITIVITY_VERSION, source_digest(graph), cal_id, [f.name for f in fmts], self.layout.key]
        if self.ranks:      # (tables without branches keep their key)
            parts += [self.ranks, self.scaling, LOWRANK_VERSION]
        if self.gptq:
            parts += (["gptq", DEFAULT_DAMP, "H=E[xx^T]"] + (["act_order"] if self.act_order else [])
                      + (["conditional importance"] if self.conditional else []))
        fisher = getattr(self, "_fisher", None)
        if isinstance(fisher, dict):
            h = hashlib.sha256()
            for k in sorted(fisher):
                h.update(k.encode())
                h.update(np.ascontiguousarray(fisher[k]).tobytes())
            parts += ["fisher", h.hexdigest()]
        elif fisher is not None:
            parts += ["fisher", fisher.key()]
        key = hashlib.sha256(json.dumps(parts).encode())
        return root / "sensitivity" / f"{key.hexdigest()[:32]}.json"
