"""gptq: error compensation across a weight's format blocks (GPTQ/OBS), for any block format of the registry.

A block format quantizes each block of a row on its own; the error one block leaves can be paid back by the
columns not yet quantized, through the input covariance H = E[xxᵀ]: quantizing the blocks of the columns in
order, after block S the remaining columns R move by

    W_R ← W_R − (W_S − Q_S) · U_SS⁻¹ U_SR,        H⁻¹ = UᵀU (U upper: the Cholesky factor of H's inverse)

(the optimal-brain-surgeon update for removing the set S, with every sub-Hessian's inverse read off one
Cholesky factor, as GPTQ does column by column). The format's own quantizer quantizes each block jointly (its
scales and codes come from ggml's code, bit-exact), so the result is a float matrix W' whose plain quantization
by that format is the compensated one: the file is still what llama.cpp reads. H is damped (λ·mean diag)
because a few thousand calibration tokens leave H's small directions noisy.

Each layer's H comes from one streamed run of the calibration windows (one input's H held at a time, never every
input's covariance; what is kept for the writer is the quantized bytes, the file's size). By default the run is
sequential, as GPTQ's own code does it: every weight already decided is replaced by what the file will hold, so each
layer's H comes from the inputs that reach it there; without, the run is the float model's (H = the calibration's
E[xxᵀ]). The two measured within 1% of each other on the default model at 5.0 bpw (README).

Aimed at the float model (`asymmetric`, GPTAQ's objective): sequential GPTQ fits each layer's quantized output
to what the same layer computes from the quantized model's inputs, so every layer's error is charged once and left
to grow downstream. Aiming at the float model's output instead, Σ‖W x_f − Q x_q‖² over the calibration tokens
(x_f the input the float model gives that layer, x_q the quantized model's), splits exactly into
‖W x_f − W̃ x_q‖² + ‖(W̃ − Q) x_q‖² with W̃ = W E[x_f x_qᵀ] H⁻¹ = W + W E[(x_f − x_q) x_qᵀ] H⁻¹, the least-squares
weights on the quantized inputs: the first term does not depend on Q, so GPTQ on W̃ (same H) minimises it. H⁻¹
is the damped one, so with equal inputs W̃ = W exactly. Both models run in step (`Executor.run_paired`).

Act-order (GPTQ's `desc_act`) for block formats: a block's scale is shared by its columns, so the order that can
change is the blocks' — the blocks of the most active inputs (largest Σ diag H) are quantized first, while the
most columns are left to absorb their error, and the bytes stay in the file's column order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from threadpoolctl import ThreadpoolController

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.formats import Format, get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.importers.calibration_text import CalibrationText
from edgeq.passes.base import Context, Pass
from edgeq.passes.calibrate import DEFAULT_CTX, DEFAULT_WINDOWS, calibration_tokens, calibration_windows
from edgeq.passes.fisher import token_weights

DEFAULT_DAMP = 0.01


def damped(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """H + λ·mean(diag H)·I in float64; dead inputs (zero variance) get the mean on the diagonal."""
    h = np.array(h, dtype=np.float64)
    d = np.diag(h).copy()
    dead = d <= 0
    mean = float(d[~dead].mean()) if (~dead).any() else 1.0
    h[dead, dead] = mean
    h[np.diag_indices_from(h)] += damp * mean
    return h


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """U upper with h⁻¹ = UᵀU (h already damped)."""
    hinv = cho_solve(cho_factor(h, lower=True), np.eye(h.shape[0]))
    return np.linalg.cholesky(hinv).T           # lower L with H⁻¹ = LLᵀ, so U = Lᵀ


@dataclass
class Hessian:
    """One input's damped H and the factors the formats' block sizes need (one per block size with act-order,
    whose block order depends on it; one in all without).

    `conditional`: the quantizer's per-column weights (its importance matrix) for block S are the diagonal of
    the Schur complement H_SS − H_SR H_RR⁻¹ H_RS (R: the columns quantized after S), not E[x²] = diag H: the
    error a block leaves is paid back through R, and what cannot be paid back is the part of x_S that R does
    not predict, so the block's OBS loss is ΔSᵀ (U_SSᵀU_SS)⁻¹ ΔS (its diagonal: the row norms² of U_SS⁻¹).
    The last block, with nothing after it, gets diag H_SS, the plain imatrix."""

    h: np.ndarray
    act_order: bool = False
    conditional: bool = False
    _factors: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, cov: np.ndarray, damp: float = DEFAULT_DAMP, act_order: bool = False,
           conditional: bool = False) -> "Hessian":
        return cls(damped(cov, damp), act_order, conditional)

    def factor(self, step: int) -> tuple[np.ndarray | None, list[np.ndarray], np.ndarray | None]:
        """(column order or None, for each block S of `step` columns in that order U_SS⁻¹ U_SR, the conditional
        importance in the file's column order or None): every format of that block size (the planner prices
        many) reuses them."""
        if step not in self._factors:
            perm = None
            if self.act_order and self.h.shape[0] > step:
                energy = np.diag(self.h).reshape(-1, step).sum(1)
                blocks = np.argsort(-energy, kind="stable")
                perm = (blocks[:, None] * step + np.arange(step)).reshape(-1)
            u = inverse_cholesky(self.h if perm is None else self.h[np.ix_(perm, perm)])
            cols = u.shape[0]
            # (float32: each update sums `step` products into float32 weights; float64 doubled the planner's time)
            updates = [solve_triangular(u[s0:s0 + step, s0:s0 + step], u[s0:s0 + step, s0 + step:],
                                        lower=False).astype(np.float32) for s0 in range(0, cols - step, step)]
            imp = None
            if self.conditional:
                imp = np.empty(cols, dtype=np.float64)
                eye = np.eye(step)
                for s0 in range(0, cols, step):
                    inv = solve_triangular(u[s0:s0 + step, s0:s0 + step], eye, lower=False)
                    imp[s0:s0 + step] = (inv * inv).sum(1)
                if perm is not None:
                    imp = imp[np.argsort(perm)]
                imp = imp.astype(np.float32)
            self._factors[step] = (perm, updates, imp)
        return self._factors[step]

    def importance(self, fmt: Format, imatrix: np.ndarray | None) -> np.ndarray | None:
        """The per-column weights `fmt`'s quantizer gets for this input's weights (None where it takes none): the
        conditional ones, else the calibration's imatrix."""
        if not fmt.takes_imatrix:
            return None
        if self.conditional and fmt.block[1] < self.h.shape[0]:
            return self.factor(fmt.block[1])[2]
        return imatrix


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def compensate(w: np.ndarray, fmt: Format, hess: Hessian, importance: np.ndarray | None = None) -> np.ndarray:
    """W' (float32, w's shape): the weights whose quantization by `fmt` block by block is GPTQ's — quantized with
    `hess.importance(fmt, importance)` (what `written` returns).

    BLAS runs on one thread here: each update is a product with only `step` (32 or 256) terms per output, one per
    block, too small for a second thread to pay. On the shared 2-core machine (load 12) one thread compensated a
    SmolLM2 down projection (576x1536, q4_0) in 0.63 s instead of 3.70 s wall (0.11 instead of 0.78 CPU-s; q4_k 0.55
    vs 0.83 s, the gate projection 0.49 vs 0.74 s), and W' came out bit-identical."""
    with _blas().limit(limits=1, user_api="blas"):
        return _compensate(w, fmt, hess, importance)[0]


def _compensate(w: np.ndarray, fmt: Format, hess: Hessian, importance: np.ndarray | None,
                keep: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(W', with `keep` the round trip of each block as the loop quantized it, in W's column order, else None)."""
    step = fmt.block[1]
    cols = w.shape[1]
    perm, updates, _ = hess.factor(step)
    out = np.array(w, dtype=np.float32)
    imp = hess.importance(fmt, importance)
    if perm is not None:
        out = out[:, perm]
        imp = None if imp is None else imp[perm]
    kept = np.empty_like(out) if keep else None
    for s0 in range(0, cols, step):
        s1 = s0 + step
        blk = out[:, s0:s1]
        rt = fmt.roundtrip(blk, None if imp is None else imp[s0:s1])
        if kept is not None:
            kept[:, s0:s1] = rt
        err = blk - rt
        del rt
        if s1 < cols:
            out[:, s1:] -= err @ updates[s0 // step]
    if perm is not None:
        back = np.argsort(perm)
        out = out[:, back]
        kept = None if kept is None else kept[:, back]
    return np.ascontiguousarray(out), kept


def written(w: np.ndarray, fmt: Format, hess: Hessian, importance: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """(W', the importance to quantize it with): `fmt.quantize(*written(...))` is the file's GPTQ bytes and
    `fmt.roundtrip(*written(...))` their values (`written_values` computes the latter)."""
    return compensate(w, fmt, hess, importance), hess.importance(fmt, importance)


def written_values(w: np.ndarray, fmt: Format, hess: Hessian, importance: np.ndarray | None = None) -> np.ndarray:
    """`fmt.roundtrip(*written(w, fmt, hess, importance))`, what the planner prices. Each block of W' is final once
    the loop has quantized it, so for a `blockwise` format the loop's round trips are W''s, bit for bit, and the
    tensor is quantized once instead of twice (the i-quants' search is most of a budgeted plan's time: on a
    1.1B-shaped model's output head pricing every candidate took 17 of its first 19 minutes)."""
    with _blas().limit(limits=1, user_api="blas"):
        wp, kept = _compensate(w, fmt, hess, importance, keep=fmt.blockwise)
    if kept is not None:
        return kept
    return fmt.roundtrip(wp, hess.importance(fmt, importance))


def input_hessian(envs: list[dict], key: str, damp: float = DEFAULT_DAMP, act_order: bool = False,
                  conditional: bool = False, token_weights: np.ndarray | None = None) -> Hessian:
    """H of the input `key` over every sequence's tokens (float64); with `token_weights` (one per token, in
    order), Σ_t a_t x_t x_tᵀ / Σ_t a_t."""
    x = np.concatenate([np.asarray(env[key], dtype=np.float64).reshape(-1, env[key].shape[-1]) for env in envs])
    if token_weights is None:
        return Hessian.of(x.T @ x / len(x), damp, act_order, conditional)
    if len(token_weights) != len(x):
        raise EdgeqError(None, f"internal: {len(token_weights)} token weights for {len(x)} tokens of {key}")
    a = np.asarray(token_weights, dtype=np.float64)
    return Hessian.of((x * a[:, None]).T @ x / max(float(a.sum()), 1e-300), damp, act_order, conditional)


def partly_weighted_hessian(envs: list[dict], key: str, weighted: list[int], token_weights: np.ndarray,
                            damp: float = DEFAULT_DAMP, act_order: bool = False, conditional: bool = False) -> Hessian:
    """Σ_t a_t x_t x_tᵀ / Σ_t a_t over every sequence's tokens where only the sequences `weighted` have token weights
    (`token_weights`, their tokens in order); each other token gets the mean weight of the weighted tokens at the
    same kind of position: the first of its sequence, or any later one.

    The Fisher weights want a backward per sequence; the writer's forward covers every sequence anyway. Measured on
    SmolLM2 the weights of v_proj and k_proj are dominated by position 0, the attention sink every later token
    reads (its a_t 50-500x the mean; effective sample size 1-30 of 512), whose input is the same in every sequence:
    its share of H is set by its mean weight, which a few sequences estimate well. Later positions' weights vary
    with the content; without a backward those tokens count alike. Every sequence weighted: the plain
    Fisher-weighted H; flat weights: the uniform H. (Adding the weighting's change C_F − C on the weighted sequences
    to the uniform H of all, a control variate, measured far worse: with so few effective tokens C_F does not
    cancel C's sampling noise, 0.0415 against 0.0312 at 5.0 bpw.)"""
    def rows(env) -> np.ndarray:
        return np.asarray(env[key], dtype=np.float64).reshape(-1, env[key].shape[-1])

    lengths = [len(rows(envs[i])) for i in weighted]
    if len(token_weights) != sum(lengths):
        raise EdgeqError(None, f"internal: {len(token_weights)} token weights for {sum(lengths)} tokens of {key}")
    a = np.asarray(token_weights, dtype=np.float64)
    first = np.zeros(len(a), dtype=bool)
    first[np.cumsum([0] + lengths[:-1])] = True
    mean_first = float(a[first].mean())
    mean_later = float(a[~first].mean()) if (~first).any() else mean_first
    known = dict(zip(weighted, np.split(a, np.cumsum(lengths)[:-1])))
    h, total = 0.0, 0.0
    for i, env in enumerate(envs):             # one sequence at a time: no second copy of every input
        x = rows(env)
        w = known.get(i)
        if w is None:
            w = np.full(len(x), mean_later)
            w[0] = mean_first
        h = h + (x * w[:, None]).T @ x
        total += float(w.sum())
    return Hessian.of(h / max(total, 1e-300), damp, act_order, conditional)


def partial_token_windows(fisher_weighted: bool, token_windows: int | None, n_windows: int) -> int | None:
    """The backward's window count when it covers only some of the writer's `n_windows` (what the plan records),
    else None: uniform tokens, or a count that reaches every window."""
    return token_windows if fisher_weighted and token_windows and token_windows < n_windows else None


def weighted_windows(n_windows: int, token_windows: int | None) -> list[int]:
    """Which of the writer's windows get a backward for their token weights: `token_windows` of them spread
    evenly (every one when None or at least `n_windows`)."""
    if token_windows is None or token_windows >= n_windows:
        return list(range(n_windows))
    return [i * n_windows // token_windows for i in range(token_windows)]


def input_drift(envs: list[dict], reference_envs: list[dict], key: str) -> np.ndarray:
    """E[(x_f − x_q) x_qᵀ] of the input `key` (float64): how far the quantized model's inputs (`envs`) have moved
    from the float model's (`reference_envs`), as the least-squares refit onto them sees it."""
    total, n = 0.0, 0
    for env, ref in zip(envs, reference_envs):        # one sequence at a time: no second copy of every input
        x = np.asarray(env[key], dtype=np.float64).reshape(-1, env[key].shape[-1])
        total = total + (np.asarray(ref[key], dtype=np.float64).reshape(x.shape) - x).T @ x
        n += len(x)
    return total / n


def aimed_at_reference(w: np.ndarray, hess: Hessian, drift: np.ndarray) -> np.ndarray:
    """W̃ = W + W·drift·H⁻¹ (H damped; float32): the weights whose output on the quantized model's inputs is closest
    to the float model's output, which GPTQ then quantizes (see the module's docstring)."""
    wd = np.asarray(w, dtype=np.float64) @ drift
    return (w + cho_solve(cho_factor(hess.h, lower=True), wd.T).T).astype(np.float32)


def compensable(graph: Graph, plan: Plan) -> dict[str, Format]:
    """The weights GPTQ rewrites: 2-D, planned in a quantizing format, no low-rank branch, not the token embedding
    (whose rows are also looked up one by one, where no input covariance applies)."""
    skip = {n for node in graph.nodes if node.op == "embedding" for n in node.inputs[1:2]}
    out = {}
    for name, t in graph.weights.items():
        tp = plan.tensors.get(name)
        if tp is None or name in skip or len(t.shape) != 2 or tp.rank:
            continue
        fmt = get_format(tp.format)
        if fmt.quantize_fn is not None and fmt.bits_per_weight < 16:
            out[name] = fmt
    return out


class _Sequential:
    """The compensated bytes of every weight, computed on first use in one streamed run over the calibration
    windows (so `edgeq plan`, which writes nothing, pays nothing)."""

    def __init__(self, graph: Graph, plan: Plan, targets: dict[str, Format], imatrix: dict, windows: Callable,
                 damp: float, act_order: bool, progress: Callable | None, sequential: bool = True,
                 conditional: bool = False, asymmetric: bool = False, fisher_weighted: bool = False,
                 token_windows: int | None = None):
        self.graph, self.plan, self.targets, self.imatrix = graph, plan, targets, imatrix
        self.sequential, self.conditional, self.asymmetric = sequential, conditional, asymmetric
        self.fisher_weighted, self.token_windows = fisher_weighted, token_windows
        self.windows, self.damp, self.act_order, self.progress = windows, damp, act_order, progress
        self.bytes: dict[str, np.ndarray] | None = None

    def result(self, name: str) -> np.ndarray:
        if self.bytes is None:
            self.bytes = self._run()
        return self.bytes[name]

    def _run(self) -> dict[str, np.ndarray]:
        graph, out = self.graph, {}
        fresh: dict[str, np.ndarray] = {}        # what the executor multiplies by: the file's values, used once
        hess: dict[str, Hessian] = {}            # the current input's (q/k/v share one): one held at a time
        drift: dict[str, np.ndarray] = {}        # the same input's drift from the float model's (asymmetric)
        windows = self.windows()
        # Fisher-weighted: each weight's own H (its output's gradient weights the tokens), from the float model
        # (on `token_windows` of the windows only: the rest get the weighted tokens' mean weights)
        weighted = weighted_windows(len(windows), self.token_windows)
        partial = self.fisher_weighted and len(weighted) < len(windows)
        weights_of = token_weights(graph, [windows[i] for i in weighted], progress=self.progress) \
            if self.fisher_weighted else {}

        def quantize(node, envs, reference_envs=None) -> None:
            name, key = node.inputs[1], node.inputs[0]
            fmt = self.targets.get(name)
            if fmt is None:
                return
            hkey = name if self.fisher_weighted else key
            if hkey not in hess:
                hess.clear()
                drift.clear()
                if partial:
                    hess[hkey] = partly_weighted_hessian(envs, key, weighted, weights_of.pop(name), self.damp,
                                                         self.act_order, self.conditional)
                else:
                    hess[hkey] = input_hessian(envs, key, self.damp, self.act_order, self.conditional,
                                               weights_of.pop(name, None))
                if reference_envs is not None:
                    drift[hkey] = input_drift(envs, reference_envs, key)
            w = graph.weights[name].numpy()
            if hkey in drift:
                w = aimed_at_reference(w, hess[hkey], drift[hkey])
            imp = self.imatrix.get(name) if fmt.takes_imatrix else None
            data = fmt.quantize(*written(w, fmt, hess[hkey], imp))
            out[name] = data
            fresh[name] = fmt.dequantize(data, tuple(w.shape))

        weights = dict(graph.weights)
        for name, t in graph.weights.items():
            tp = self.plan.tensors.get(name)
            if name in self.targets:
                weights[name] = replace(t, load=lambda n=name: fresh.pop(n))
            elif tp is not None and len(t.shape) == 2 and get_format(tp.format).quantize_fn is not None:
                fmt = get_format(tp.format)
                imp = self.imatrix.get(name) if fmt.takes_imatrix else None
                weights[name] = replace(t, load=lambda t=t, f=fmt, i=imp: f.roundtrip(t.numpy(), i))
        quantized = replace(graph, weights=weights)
        # The output head (vocab-wide logits) only needs its input: stop before it, as calibration does.
        outputs = {v.name for v in graph.outputs}
        heads = [n for n in graph.nodes if n.op == "linear" and n.outputs[0] in outputs]
        head_inputs = tuple(dict.fromkeys(n.inputs[0] for n in heads))
        ex = Executor(quantized if self.sequential else graph, cache_weights=False, before={"linear": quantize})
        for _ in ([0] if self.progress is None else self.progress([0], desc=f"gptq ({len(windows)} windows)",
                                                                  unit="pass")):
            if self.asymmetric:
                envs, reference_envs = ex.run_paired(Executor(graph, cache_weights=False), windows, head_inputs)
            else:
                envs, reference_envs = ex.run_many(windows, outputs=head_inputs), None
        for n in heads:
            quantize(n, envs, reference_envs)
        return out


class GptqCompensate(Pass):
    """Analysis pass: ctx.analysis['written'] = the graph whose weights the target writes: each weight GPTQ
    rewrites (see `compensable`) carries its compensated bytes (`source_bytes` in the file's row order, which
    `file_rows` gives; `load` their float values for targets that quantize again). The model itself is
    unchanged: W' is not a better float model, only a better thing to quantize, so the reference outputs and the
    presets measured beside a plan still come from the source weights."""

    name = "gptq"

    def __init__(self, damp: float = DEFAULT_DAMP, act_order: bool = False, sequential: bool = True,
                 n_windows: int = DEFAULT_WINDOWS, conditional: bool = False, asymmetric: bool = False,
                 ctx_len: int = DEFAULT_CTX, source: CalibrationText | None = None, subset: tuple[int, int] = (0, 1),
                 file_rows: Callable[[str, np.ndarray], np.ndarray] | None = None, fisher_weighted: bool = False,
                 token_windows: int | None = None):
        self.damp, self.act_order, self.sequential, self.conditional = damp, act_order, sequential, conditional
        self.fisher_weighted = fisher_weighted
        self.token_windows = partial_token_windows(fisher_weighted, token_windows, n_windows)
        self.asymmetric = asymmetric and sequential    # without the sequential run both models' inputs are equal
        self.n_windows, self.ctx_len, self.source, self.subset = n_windows, ctx_len, source, subset
        self.file_rows = file_rows or (lambda name, rows: rows)

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        cal = ctx.analysis.get("calibration")
        if cal is None:
            raise EdgeqError(None, "GPTQ compensates through the calibration's inputs: drop --no-calibration "
                                   "(or give --no-gptq)")
        targets = compensable(graph, plan)

        def windows() -> list[list[int]]:
            tokens, bos, add_bos = calibration_tokens(graph, self.source)
            return calibration_windows(tokens, self.ctx_len, self.n_windows, bos, add_bos, self.source, self.subset)

        seq = _Sequential(graph, plan, targets, cal.imatrix(), windows, self.damp, self.act_order, ctx.progress,
                          self.sequential, self.conditional, self.asymmetric, self.fisher_weighted,
                          self.token_windows)
        weights = dict(graph.weights)
        for name, fmt in targets.items():
            t = graph.weights[name]
            weights[name] = replace(
                t, source_format=fmt.name,
                load=lambda n=name, f=fmt, s=t.shape: f.dequantize(seq.result(n), tuple(s)),
                source_bytes=lambda n=name: self.file_rows(n, seq.result(n)))
        ctx.record(self.name, damp=self.damp, act_order=self.act_order, sequential=self.sequential,
                   compensated=len(targets), **({"importance": "conditional"} if self.conditional else {}),
                   **({"aim": "float"} if self.asymmetric else {}),
                   **({"tokens": "fisher"} if self.fisher_weighted else {}),
                   **({"token_windows": self.token_windows} if self.token_windows else {}),
                   windows=self.n_windows)
        ctx.analysis["written"] = replace(graph, weights=weights)
        return graph, plan
