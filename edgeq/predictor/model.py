"""The latency and memory model fitted on a latency profile.

A prediction has three layers, each fitted on the profile's micro-models (profile.py):

1. **Kernels** (`KernelTable`): the time of the matrix product that reads each weight, by format, shape
   (rows x cols) and tokens n. A (format, shape, n) the profile timed is looked up (the median of every such
   kernel it timed); any other shape comes from a per-(format, n) fit over the timed shapes,
   t = a + b·rows·cols + c·rows + d·cols + e·rows·(cols mod 128) (non-negative least squares: per-call cost,
   streaming the weights, per-row dot products, converting the input, and the slower tail of an inner width that
   is not a multiple of 128: onnxruntime's MatMulNBits, design.py), and any other n is interpolated linearly
   between the timed
   token counts. Node-by-node timing costs a hand-over per node (measured on nodes that compute nothing);
   it is taken off each kernel.
2. **Everything else in the graph** (`OtherOps`): norms, RoPE, attention over the KV cache, softmax, SwiGLU,
   adds, the cache writes, per call; per op kind a non-negative linear model over what such ops cost in
   proportion to (per layer: n·d, n·ffn, n·heads·head_dim, heads·head_dim·n·kv, heads·n·kv; once: n·d, n·kv),
   an op kind whose nodes the profile counted once per layer on the per-layer features only, one counted once per
   call on the once-per-call ones only (`op_scaling`). kv is the cache length the runtime reads: llama.cpp pads
   it (the profile's node timings show by how much).
3. **The whole call** (`Correction`): the runtime's time for the call against (1) + (2), learned over the
   micro-models' real (not node-by-node) calls: a non-negative linear model (scikit-learn's LinearRegression,
   relative errors) of the call's time on the graph time, the logits the runtime copies (n·vocab), n, the layers (per-node scheduling)
   and the KV cache handed between calls, plus, where leave-one-model-out
   validation shows it helps, gradient-boosted trees (scikit-learn) on its remaining relative error from the
   workload's shape. The linear part keeps the prediction linear in each weight's kernel, which is what the
   ILP's latency row needs.

Peak memory is memory.py's `MemoryModel`: what the backend's runtime keeps, term by term, plus a base the
profile's micro-models measure.

Encoders go through the same three layers with their own features: a call is one forward pass over n tokens
(the profile's `prefill`; there is no decode step); a layer whose q, k and v run as one fused kernel with the
attention (`qattention:FORMAT`, workload.py) is one kernel of the table, and the other ops' features count what
the formats add around the kernels (bias adds of float layers, activation quantization of static int8, the
attention of the unfused layers over n², GELU with or without its bias). An encoder's whole-call model may also
carry a bounded term (±0.5 per ms) on a format's kernel time, for the formats whose node-by-node time is not their
time in a plain call (`format_terms`, chosen by leave-one-micro-model-out: onnxruntime's 8-bit MatMulNBits,
`int8_b32`, runs about a third slower under the profiler).

CNNs (a profile of `--model-kind cnn`) are not priced kernel by kernel: their profile times whole subnets of one
supernet and is fitted to that supernet's per-layer table (cnn_table.py, the table `edgeq search --supernet` uses);
a call is one image.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.predictor.memory import MemoryModel
from edgeq.predictor.profile import NODE_TIMES, LatencyProfile
from edgeq.predictor.workload import FUSED_QKV, CnnWorkload, Workload, layer_role
from edgeq.targets.registry import get_target

KV_PADDINGS = (1, 32, 64, 128, 256, 512)
MIN_KERNEL_US = 0.2


@dataclass
class Prediction:
    """What a plan costs on the profiled device."""

    backend: str
    threads: int
    prompt_tokens: int
    context_tokens: int
    prefill_ms: float
    decode_ms_per_token: float | None
    peak_memory_bytes: int
    parts: dict[str, Any] = field(default_factory=dict)
    kind: str = "decoder"

    def to_json(self) -> dict[str, Any]:
        """Decoders: the flat object of the issue; encoders: `latency_ms` (one call of batch 1 over
        `prompt_tokens` tokens, the same as `prefill_ms`) and a null decode step."""
        if self.kind != "decoder":
            digits = 5 if self.kind == "cnn" else 3         # a CNN's call of one image takes tens of µs
            return {"kind": self.kind, "latency_ms": round(self.prefill_ms, digits),
                    "prefill_ms": round(self.prefill_ms, digits),
                    "decode_ms_per_token": None, "prompt_tokens": self.prompt_tokens, "batch": 1,
                    "peak_memory_bytes": int(self.peak_memory_bytes), "backend": self.backend,
                    "threads": self.threads, **self.parts}
        return {"decode_ms_per_token": round(self.decode_ms_per_token, 4), "prefill_ms": round(self.prefill_ms, 3),
                "prompt_tokens": self.prompt_tokens, "context_tokens": self.context_tokens,
                "peak_memory_bytes": int(self.peak_memory_bytes), "backend": self.backend, "threads": self.threads,
                **self.parts}


def _positive_fit(x: np.ndarray, y: np.ndarray, relative: bool = False, intercept: bool = True) \
        -> tuple[np.ndarray, float]:
    """Non-negative least squares with a non-negative intercept (scipy's NNLS on [x, 1]; none without
    `intercept`); `relative`: minimise relative errors (each row weighted by 1/y), so that small kernels weigh as
    much as large ones."""
    from scipy.optimize import nnls

    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    a = np.hstack([x / scale, np.ones((len(x), 1 if intercept else 0))])
    b = y
    if relative:
        wgt = 1.0 / np.maximum(np.abs(y), 1e-9)
        a, b = a * wgt[:, None], y * wgt
    coef, _ = nnls(a, b)
    if not intercept:
        return coef / scale, 0.0
    return coef[:-1] / scale, float(coef[-1])


# --- 1. kernels -----------------------------------------------------------------------------------------------

K_TAIL = 128        # onnxruntime's MatMulNBits computes the inner width in steps of this; the rest more slowly


def kernel_features(rows: int, cols: int) -> list[int]:
    """What a kernel's time is fitted on across shapes (KernelTable): rows·cols, rows, cols, rows·(cols mod
    K_TAIL). The last is 0 at every shape of a profile whose widths are multiples of K_TAIL (its term then 0)."""
    return [rows * cols, rows, cols, rows * (cols % K_TAIL)]


class KernelTable:
    """Time (µs) of the matrix product with one weight, by (format, rows, cols, tokens)."""

    def __init__(self, samples: dict[tuple[str, int], list[tuple[int, int, float]]]):
        self.lookup: dict[tuple[str, int, int, int], float] = {}
        self.fits: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
        self.tokens: dict[str, list[int]] = defaultdict(list)
        for (fmt, n), rows in samples.items():
            by_shape: dict[tuple[int, int], list[float]] = defaultdict(list)
            for r, c, us in rows:
                by_shape[(r, c)].append(us)
            for (r, c), v in by_shape.items():
                self.lookup[(fmt, n, r, c)] = float(np.median(v))
            shapes = sorted(by_shape)
            x = np.array([kernel_features(r, c) for r, c in shapes], dtype=np.float64)
            y = np.array([self.lookup[(fmt, n, r, c)] for r, c in shapes])
            self.fits[(fmt, n)] = _positive_fit(x, y, relative=True)
            self.tokens[fmt].append(n)
        for fmt in self.tokens:
            self.tokens[fmt].sort()

    @property
    def formats(self) -> list[str]:
        return sorted(self.tokens)

    def _at(self, fmt: str, n: int, rows: int, cols: int) -> float:
        hit = self.lookup.get((fmt, n, rows, cols))
        if hit is not None:
            return hit
        coef, icpt = self.fits[(fmt, n)]
        return float(icpt + coef @ np.array(kernel_features(rows, cols), dtype=np.float64))

    def cost_us(self, fmt: str, rows: int, cols: int, n: int) -> float:
        ns = self.tokens.get(fmt)
        if not ns:
            raise EdgeqError(None, f"the latency profile has no timings for format {fmt}")
        if n in ns:
            return self._at(fmt, n, rows, cols)
        if n < ns[0]:
            lo, hi = ns[0], ns[1] if len(ns) > 1 else ns[0]
        elif n > ns[-1]:
            lo, hi = (ns[-2], ns[-1]) if len(ns) > 1 else (ns[-1], ns[-1])
        else:
            i = int(np.searchsorted(ns, n))
            lo, hi = ns[i - 1], ns[i]
        a, b = self._at(fmt, lo, rows, cols), self._at(fmt, hi, rows, cols)
        if hi == lo:
            return a * n / lo
        return max(MIN_KERNEL_US, a + (b - a) * (n - lo) / (hi - lo))


# --- 2. everything else in the graph ---------------------------------------------------------------------------

def encoder_features(w: Workload, n: int) -> np.ndarray:
    """An encoder's other ops for one call of n tokens: norms and residual adds (n·d per layer), GELU after a
    float layer (fused with its bias) or another (n·ffn each), attention of the layers not fused into QAttention
    (n²·d for its products, n²·heads for its softmax, n·d), embeddings and pooling (n·d), the bias adds of float
    layers (n·rows), the activation quantization of static int8 layers (n·cols per quantized input) and of fused
    dynamic-int8 layers (n·d)."""
    d, f = w.hidden, w.ffn
    fused = [m for m in w.matmuls if m.format.startswith(FUSED_QKV)]
    unfused = w.n_layers - len(fused)
    inter = [m for m in w.matmuls if m.weight.endswith("intermediate.dense.weight")]
    float_inter = sum(m.format in ("f32", "f16") for m in inter)
    float_rows = sum(m.rows for m in w.matmuls if m.format in ("f32", "f16"))
    static_in: dict[tuple[str, str], int] = {}          # one QuantizeLinear per (layer, input) read by static int8
    for m in w.matmuls:
        if m.format == "int8":
            layer, _, role = m.weight.partition(".attention.self.")
            static_in[(layer, "qkv") if role else (m.weight, "")] = m.cols
    dyn_fused = sum(m.format == FUSED_QKV + "int8_dyn" for m in fused)
    return np.array([w.n_layers, w.n_layers * n * d, n * f * float_inter, n * f * (len(inter) - float_inter),
                     unfused * n * n * d, unfused * n * n * w.n_heads, unfused * n * d, n * d, n * float_rows,
                     n * sum(static_in.values()),
                     n * d * dyn_fused], dtype=np.float64)


PER_LAYER_COLS = (0, 1, 2, 3, 4, 5)      # other_features' columns of a decoder's per-layer work
ONCE_COLS = (6, 7)                      # and of its once-per-call work (with the constant)


def other_features(w: Workload, n: int, kv: int) -> np.ndarray:
    """What the graph's other ops cost in proportion to, for one call of n tokens reading kv cached tokens:
    per layer (PER_LAYER_COLS) nodes, n·d, n·ffn, n·(heads + kv heads)·head_dim, heads·head_dim·n·kv, heads·n·kv;
    once per call (ONCE_COLS) n·d (embedding, final norm) and n·kv (the attention mask)."""
    if w.kind == "encoder":
        return encoder_features(w, n)
    L, d, f, h, hd = w.n_layers, w.hidden, w.ffn, w.n_heads, w.head_dim
    return np.array([L, L * n * d, L * n * f, L * n * (h + w.n_kv_heads) * hd, L * h * hd * n * kv, L * h * n * kv,
                     n * d, n * kv], dtype=np.float64)


def op_scaling(nodes: list[tuple[int, int]]) -> str:
    """How an op kind's nodes scale with the depth, from (layers, nodes of the kind) of every timed call:
    `layer` (nodes = a·layers + b, a ≥ 1: its time is priced per layer only), `once` (the same count at every
    depth: priced per call only), or `any` (the count depends on more than the depth, e.g. on the formats, or one
    depth was timed: every feature). Why: the micro-models are 5-14 layers deep and a per-op-kind fit over every
    feature traded per-layer work for its once-per-call correlate (n·d); measured (onnxruntime 1.32, 1 thread,
    CPU clock) SmolLM2's 30 layers then got an attention MatMul, SiLU and norms priced 12 % low in prefill."""
    layers = np.array([x[0] for x in nodes], dtype=np.float64)
    count = np.array([x[1] for x in nodes], dtype=np.float64)
    if len(set(layers)) < 2:
        return "any"
    a, b = np.polyfit(layers, count, 1)
    if np.max(np.abs(a * layers + b - count)) > 0.25:
        return "any"
    return "layer" if a >= 0.5 else "once"


class OtherOps:
    """One non-negative linear model per op kind (its own mix of the features: a softmax scales with
    heads·n·kv, a norm with n·d), summed: per-kind fits extrapolate to deeper and wider models better than one
    fit of the total. `scaling` (decoders, op_scaling): an op kind whose nodes are per layer is fitted on the
    per-layer features without a constant, one whose nodes are once per call on the once-per-call ones."""

    def __init__(self, rows: list[tuple[np.ndarray, dict[str, float]]], scaling: dict[str, str] | None = None):
        x = np.array([r[0] for r in rows])
        kinds = sorted({k for _, per in rows for k in per})
        self.scaling = {k: (scaling or {}).get(k, "any") for k in kinds}
        self.fits = {}
        for k in kinds:
            cols = {"layer": PER_LAYER_COLS, "once": ONCE_COLS}.get(self.scaling[k], tuple(range(x.shape[1])))
            coef, icpt = _positive_fit(x[:, cols], np.array([per.get(k, 0.0) for _, per in rows]),
                                       intercept=self.scaling[k] != "layer")
            full = np.zeros(x.shape[1])
            full[list(cols)] = coef
            self.fits[k] = (full, icpt)

    def cost_us(self, w: Workload, n: int, kv: int) -> float:
        f = other_features(w, n, kv)
        return float(sum(icpt + coef @ f for coef, icpt in self.fits.values()))


def kv_padding(pairs: list[tuple[int, int, int]]) -> int:
    """The padding P with which the runtime's attention read kv = min(n_ctx, ceil(tokens / P)·P) in every timed
    call ((tokens, kv, n_ctx) pairs); 1 when no call says."""
    pairs = [p for p in pairs if p[1] > 0]
    for p in KV_PADDINGS:
        if all(kv == min(n_ctx, math.ceil(t / p) * p) for t, kv, n_ctx in pairs):
            return p
    return 1


# --- 3. the whole call ----------------------------------------------------------------------------------------

N_OVERHEADS = 4              # call_features after the graph: logits, tokens, layers, cache
FORMAT_TERM_BOUND = 0.5      # |how much a format's node-timed kernels misstate the plain call| per ms, at most
MAX_FORMAT_TERMS = 2


def call_features(w: Workload, n: int, kv: int, graph_ms: float, per_format_ms: np.ndarray | None = None) \
        -> np.ndarray:
    """What a call costs beyond its graph: the graph itself (slope near 1), the logits the runtime copies out
    (n·vocab), per-token and per-layer work outside the kernels (scheduling nodes), and the cache the runtime
    passes between calls (layers·kv heads·head_dim·kv). An encoder returns one vector per call and keeps no
    cache: those two are 0; its features end with the ms of its kernels per format (`per_format_ms`), whose
    terms the whole-call fit may make negative (see `_linear`)."""
    if w.kind == "encoder":
        base = np.array([graph_ms, 0.0, n * 1e-3, w.n_layers, 0.0], dtype=np.float64)
        return base if per_format_ms is None else np.concatenate([base, per_format_ms])
    return np.array([graph_ms, n * w.vocab * 1e-6, n * 1e-3, w.n_layers,
                     w.n_layers * w.n_kv_heads * w.head_dim * kv * 1e-6], dtype=np.float64)


def shape_features(w: Workload, n: int, kv: int, graph_ms: float) -> np.ndarray:
    """What the learned residual sees: the call's size and the model's shape, never its name."""
    return np.array([math.log(max(graph_ms, 1e-3)), math.log(n), math.log(max(kv, 1)), w.n_layers,
                     math.log(w.hidden), w.ffn / w.hidden, math.log(w.vocab), math.log(max(w.weight_bytes, 1))],
                    dtype=np.float64)


@dataclass
class Correction:
    """Time (ms) of one call from its graph time: linear, then optionally x (1 + trees)."""

    coef: np.ndarray
    icpt: float
    trees: Any = None
    report: dict[str, Any] = field(default_factory=dict)

    def linear(self, x: np.ndarray) -> float:
        return float(self.icpt + self.coef @ x)

    def __call__(self, w: Workload, n: int, kv: int, graph_ms: float, per_format_ms: np.ndarray | None = None) \
            -> float:
        y = self.linear(call_features(w, n, kv, graph_ms, per_format_ms))
        if self.trees is not None:
            y *= 1.0 + float(self.trees.predict(shape_features(w, n, kv, graph_ms)[None])[0])
        return y


def _linear(x: np.ndarray, y: np.ndarray, free: tuple[int, ...] = ()) -> tuple[np.ndarray, float]:
    """The call's time as its graph time (x[:, 0], slope 1: the node-by-node timings already are the kernels'
    times) plus non-negative overheads on the other features, in relative error (scikit-learn's positive
    LinearRegression, or scipy's bounded least squares with format terms; each row weighted by 1/y: a 5 ms decode
    step weighs as much as a 1 s prefill). Fixing the slope keeps a
    profile of few micro-models from trading the graph for its correlates.

    Columns after the overheads (an encoder's kernel ms per format) are used only where `free` names them, each
    with a term within ±FORMAT_TERM_BOUND: a format whose node-by-node time is not its time in a plain call."""
    from scipy.optimize import lsq_linear
    from sklearn.linear_model import LinearRegression

    cols = list(range(1, 1 + N_OVERHEADS)) + [1 + N_OVERHEADS + j for j in free]
    rest = np.hstack([x[:, cols], np.ones((len(x), 1))])        # the constant is an overhead too: non-negative
    scale = np.maximum(np.abs(rest).max(axis=0), 1e-12)
    wgt = 1.0 / np.maximum(y, 1e-9)
    if free:        # bounded least squares (scikit-learn's positive fit has no other bounds)
        lo, hi = np.zeros(rest.shape[1]), np.full(rest.shape[1], np.inf)
        fmt = slice(N_OVERHEADS, rest.shape[1] - 1)
        lo[fmt], hi[fmt] = -FORMAT_TERM_BOUND * scale[fmt], FORMAT_TERM_BOUND * scale[fmt]
        sol = lsq_linear(rest / scale * wgt[:, None], (y - x[:, 0]) * wgt, bounds=(lo, hi), method="bvls").x / scale
    else:           # a few micro-models leave the overheads' optimum not unique: this solver's pick, as before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sol = LinearRegression(positive=True, fit_intercept=False).fit(
                rest / scale, y - x[:, 0], sample_weight=wgt ** 2).coef_ / scale
    coef = np.zeros(x.shape[1])
    coef[0] = 1.0
    coef[cols] = sol[:-1]
    return coef, float(sol[-1])


def _lomo_errors(x: np.ndarray, y: np.ndarray, groups: np.ndarray, free: tuple[int, ...] = ()) -> list[float]:
    """Leave-one-micro-model-out relative errors of the linear whole-call fit."""
    out: list[float] = []
    for g in sorted(set(groups)):
        tr, te = groups != g, groups == g
        if tr.sum() < 8:
            continue
        c, i = _linear(x[tr], y[tr], free)
        out += list(np.abs((i + x[te] @ c) / y[te] - 1))
    return out


def format_terms(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[int, ...]:
    """The formats (columns after the overheads) that get a whole-call term: chosen one at a time, each only
    where it lowers the leave-one-micro-model-out error by a tenth, at most MAX_FORMAT_TERMS (a term per
    format would fit the profile's noise: tried, every term ran to its bound). Measured (onnxruntime 1.32,
    1 thread, CPU clock, load 13): in encoders three quarters `int8_b32` the profiled session's nodes summed 22.0
    and 56.2 ms where the plain calls took 16.7 and 45.0 (8-bit MatMulNBits dequantizes the whole weight per
    call, which costs more under the profiler); with non-negative overheads only those calls set every overhead
    to 0 and MiniLM plans were priced 11 % low."""
    n_fmt = x.shape[1] - 1 - N_OVERHEADS
    used = [j for j in range(n_fmt) if np.any(x[:, 1 + N_OVERHEADS + j])]
    free: tuple[int, ...] = ()
    errs = _lomo_errors(x, y, groups)
    if not errs:
        return free
    best = float(np.mean(errs))
    for _ in range(MAX_FORMAT_TERMS):
        tried = [(float(np.mean(_lomo_errors(x, y, groups, free + (j,)))), j) for j in used if j not in free]
        if not tried:
            break
        e, j = min(tried)
        if e >= 0.9 * best:
            break
        free, best = free + (j,), e
    return free


def fit_correction(rows: list[dict[str, Any]], trees_allowed: bool = True) -> Correction:
    """rows: {group, x (call features), s (shape features), y (measured ms)}; format terms (encoders) and trees
    only where leave-one-group-out says they lower the error (and `trees_allowed`)."""
    from sklearn.ensemble import GradientBoostingRegressor

    x = np.array([r["x"] for r in rows])
    y = np.array([r["y"] for r in rows])
    s = np.array([r["s"] for r in rows])
    groups = np.array([r["group"] for r in rows])
    free = format_terms(x, y, groups) if x.shape[1] > 1 + N_OVERHEADS else ()
    coef, icpt = _linear(x, y, free)

    def trees_on(xx, yy, ss):
        c, i = _linear(xx, yy, free)
        lin = i + xx @ c
        t = GradientBoostingRegressor(n_estimators=60, max_depth=2, learning_rate=0.1, subsample=1.0,
                                      random_state=0).fit(ss, yy / lin - 1.0)
        return c, i, t

    errs_lin, errs_tree = [], []
    for g in sorted(set(groups)):
        tr, te = groups != g, groups == g
        if tr.sum() < 8:
            continue
        c, i = _linear(x[tr], y[tr], free)
        lin = i + x[te] @ c
        errs_lin += list(np.abs(lin / y[te] - 1))
        c2, i2, t = trees_on(x[tr], y[tr], s[tr])
        errs_tree += list(np.abs((i2 + x[te] @ c2) * (1 + t.predict(s[te])) / y[te] - 1))
    report = {"samples": int(len(y)), "groups": int(len(set(groups))),
              "lomo_mape_linear": round(float(np.mean(errs_lin)), 4) if errs_lin else None,
              "lomo_mape_trees": round(float(np.mean(errs_tree)), 4) if errs_tree else None}
    trees = None
    if trees_allowed and errs_tree and np.median(errs_tree) < 0.9 * np.median(errs_lin):
        trees = trees_on(x, y, s)[2]
    report["trees"] = trees is not None
    return Correction(coef, icpt, trees, report)


# --- the predictor ------------------------------------------------------------------------------------------------

class Predictor:
    """A latency profile, fitted; `predict` any decoder plan (Workload) on its device."""

    def __init__(self, profile: LatencyProfile):
        self.profile = profile
        self.backend = profile.backend
        self.threads = profile.threads
        if not profile.models:
            raise EdgeqError(None, "the latency profile holds no measurements")
        self.cnn = None
        if profile.kind == "cnn":
            from edgeq.predictor.cnn_table import profile_table

            self.cnn = profile_table(profile)
            return
        self._fit()

    # -- fitting ------------------------------------------------------------------------------------------------

    def _fit(self) -> None:
        prof = self.profile
        if (get_target(prof.backend).decoder_node_times_checked and prof.kind == "decoder" and prof.clock == "cpu"
                and int(prof.settings.get("node_times") or 1) < NODE_TIMES):
            raise EdgeqError(None, f"this {prof.backend} decoder latency profile's node-by-node CPU times were taken "
                                   f"the old way (short nodes priced about a third low under load): profile again "
                                   f"with `edgeq profile --backend {prof.backend} --clock cpu`")
        samples: dict[tuple[str, int], list[tuple[int, int, float]]] = defaultdict(list)
        other: dict[str, list[tuple[np.ndarray, dict[str, float]]]] = {"decode": [], "prefill": []}
        nodes: dict[str, list[tuple[int, int]]] = defaultdict(list)     # op kind -> (layers, nodes) per call
        pads = []
        # the weights (by layer role) whose product the runtime computes for the asked-for rows only in a prefill
        self.output_rows_only: set[str] = set()
        for run in self.profile.models:
            w = run.workload
            canon = {m.weight: m for m in w.matmuls}
            for kind in ("prefill", "decode"):
                for key, s in (run.ops.get(kind) or {}).items():
                    n = int(key) if kind == "prefill" else 1
                    tokens = int(key) if kind == "prefill" else int(key) + 2
                    hand = float(s.get("handover_us", 0.0))
                    rows = s.get("weights_rows") or {}
                    for rt_name, us in s["weights_us"].items():
                        m = canon.get(w.aliases.get(rt_name, rt_name))
                        if m is None:
                            continue
                        if int(rows.get(rt_name, n)) < n:
                            # priced as a decode step's product: one row inside a prefill's graph is timed
                            # with the prefill's per-node overheads, which the whole-call fit carries
                            self.output_rows_only.add(layer_role(m.weight, w.n_layers))
                            continue
                        samples[(m.format, n)].append((m.rows, m.cols, max(MIN_KERNEL_US, us - hand)))
                    per_op = {op: max(0.0, t - c * hand) for op, (c, t) in s["ops_us"].items()}
                    for op, (c, _) in s["ops_us"].items():
                        nodes[op].append((w.n_layers, int(c)))
                    kv = int(s.get("kv_len") or 0)
                    pads.append((tokens, kv, w.n_ctx))
                    other[kind].append((other_features(w, n, kv or tokens), per_op))
        if not samples:
            raise EdgeqError(None, "the latency profile has no per-kernel timings")
        self.kernels = KernelTable(samples)
        # every format its micro-models ran must have been timed node by node: else the whole-call fit (and any
        # plan using it) would price a kernel the profile never saw
        ran = {m.format for run in self.profile.models for m in run.workload.matmuls}
        missing = sorted(ran - set(self.kernels.tokens))
        if missing:
            raise EdgeqError(None, f"the latency profile's micro-models run {', '.join(missing)} but it holds no "
                                   f"per-kernel timings of {'it' if len(missing) == 1 else 'them'} (a partial or "
                                   f"damaged profile): measure it again with `edgeq profile`")
        self.kv_pad = kv_padding(pads)
        scaling = None if self.profile.kind == "encoder" else {op: op_scaling(v) for op, v in nodes.items()}
        self.other = {k: OtherOps(v, scaling) for k, v in other.items() if v}
        # the whole call, against the real runs
        # wall times: those taken alternately with the node-by-node runs (the same load), else the rounds'
        rows: dict[str, list[dict[str, Any]]] = {"decode": [], "prefill": []}
        for run in self.profile.models:
            w = run.workload
            for kind, table in (("prefill", run.prefill_ms), ("decode", run.decode_ms)):
                for key, vals in table.items():
                    paired = (run.ops.get(kind) or {}).get(key, {}).get("call_us")
                    if not vals and paired is None:
                        continue
                    n, kv = self._call(w, kind, int(key))
                    g = self.graph_ms(w, n, kv, kind)
                    rows[kind].append({"group": run.name, "x": call_features(w, n, kv, g, self.per_format_ms(w, n)),
                                       "s": shape_features(w, n, kv, g),
                                       "y": paired / 1e3 if paired is not None else float(np.median(vals))})
        # (the target says whether trees may correct its decoders: onnxruntime's may not)
        trees = self.profile.kind != "decoder" or get_target(self.backend).decoder_latency_trees
        self.correction = {k: fit_correction(v, trees) for k, v in rows.items() if v}
        for c in self.correction.values():
            if len(c.coef) > 1 + N_OVERHEADS:
                c.report["format_terms"] = {f: round(float(t), 4) for f, t in
                                            zip(self.kernels.formats, c.coef[1 + N_OVERHEADS:]) if t}
        mem = [(r.workload, r.max_tokens, float(np.median(r.peak_rss_bytes)))
               for r in self.profile.models if r.peak_rss_bytes and min(r.peak_rss_bytes) > 0]
        self.memory = (MemoryModel.fit(get_target(self.backend), frozenset(self.profile.device.get("flags") or ()), mem)
                       if mem else None)

    # -- predicting ---------------------------------------------------------------------------------------------

    def kv_len(self, tokens: int, n_ctx: int) -> int:
        return min(n_ctx, math.ceil(max(tokens, 1) / self.kv_pad) * self.kv_pad)

    def _call(self, w: Workload, kind: str, key: int) -> tuple[int, int]:
        """(tokens in the call, cache length it reads) of a prefill of `key` tokens or a decode step at context
        `key`."""
        if kind == "prefill":
            return key, self.kv_len(key, w.n_ctx)
        return 1, self.kv_len(key + 1, w.n_ctx)

    def kernel_us(self, fmt: str, rows: int, cols: int, n: int) -> float:
        return self.kernels.cost_us(fmt, rows, cols, n)

    def per_format_ms(self, w: Workload, n: int) -> np.ndarray | None:
        """An encoder's kernel time per format of the table (the whole-call fit's per-format terms); None for a
        decoder."""
        if w.kind != "encoder":
            return None
        fmts = self.kernels.formats
        out = np.zeros(len(fmts))
        for m in w.matmuls:
            out[fmts.index(m.format)] += self.kernel_us(m.format, m.rows, m.cols, n) / 1e3
        return out

    def graph_ms(self, w: Workload, n: int, kv: int, kind: str) -> float:
        k = sum(self.kernel_us(m.format, m.rows, m.cols,
                               1 if kind == "prefill" and layer_role(m.weight, w.n_layers) in self.output_rows_only
                               else n)
                for m in w.matmuls)
        return (k + self.other[kind].cost_us(w, n, kv)) / 1e3

    def call_ms(self, w: Workload, kind: str, key: int) -> float:
        n, kv = self._call(w, kind, key)
        return self.correction[kind](w, n, kv, self.graph_ms(w, n, kv, kind), self.per_format_ms(w, n))

    def marginal_ms(self, kind: str) -> float:
        """How much one ms of kernel time adds to the call's wall time (the linear correction's slope)."""
        return float(self.correction[kind].coef[0])

    def peak_memory(self, w: Workload, tokens: int) -> int:
        """Peak resident bytes of a session that held `tokens` tokens (fed as one prompt)."""
        return 0 if self.memory is None else self.memory.peak_bytes(w, tokens)

    def predict(self, w: Workload | CnnWorkload, prompt_tokens: int = 128, context_tokens: int = 64) -> Prediction:
        if w.kind != self.profile.kind:
            self.profile.check_use(self.backend, None, kind=w.kind)
        for m in [] if self.cnn is not None else w.matmuls:
            if m.format not in self.kernels.tokens:
                raise EdgeqError(None, f"the latency profile has no timings for format {m.format} ({m.weight}); "
                                       f"it timed {', '.join(self.kernels.formats)}")
        if self.cnn is not None:          # one image, batch 1
            return Prediction(self.backend, self.threads, 1, 0, prefill_ms=self.cnn.predict_ms(w),
                              decode_ms_per_token=None, peak_memory_bytes=self.cnn.peak_bytes(w), kind="cnn")
        if prompt_tokens < 1 or context_tokens < 0:
            raise EdgeqError(None, "--prompt-tokens must be at least 1 and --context-tokens at least 0")
        if w.kind == "encoder":
            if prompt_tokens > w.n_ctx:
                raise EdgeqError(None, f"{prompt_tokens} tokens do not fit the encoder's {w.n_ctx} positions")
            return Prediction(self.backend, self.threads, int(prompt_tokens), 0,
                              prefill_ms=self.call_ms(w, "prefill", prompt_tokens), decode_ms_per_token=None,
                              peak_memory_bytes=self.peak_memory(w, prompt_tokens), kind=w.kind)
        if max(prompt_tokens, context_tokens + 1) > w.n_ctx:
            raise EdgeqError(None, f"{max(prompt_tokens, context_tokens + 1)} tokens do not fit the bundle's context "
                                   f"of {w.n_ctx}")
        held = max(prompt_tokens, context_tokens + 1)
        terms = {} if self.memory is None else self.memory.terms(w, held)
        return Prediction(self.backend, self.threads, int(prompt_tokens), int(context_tokens),
                          prefill_ms=self.call_ms(w, "prefill", prompt_tokens),
                          decode_ms_per_token=self.call_ms(w, "decode", context_tokens),
                          peak_memory_bytes=self.peak_memory(w, held),
                          parts={f"peak_memory_{k}_bytes": int(v) for k, v in terms.items() if k != "features"})

    def fit_report(self) -> dict[str, Any]:
        if self.cnn is not None:
            return {"supernet": self.cnn.table.supernet, "layers": self.cnn.table.layers, "table": self.cnn.table.fit,
                    "memory_base_bytes": self.cnn.memory_base_bytes}
        return {"kv_padding": self.kv_pad, "formats": self.kernels.formats,
                "prefill_output_rows_only": sorted(self.output_rows_only),
                "kernel_shapes": len(self.kernels.lookup),
                "memory": self.memory.report if self.memory is not None else None,
                "correction": {k: c.report for k, c in self.correction.items()}}

