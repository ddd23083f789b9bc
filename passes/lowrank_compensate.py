"""lowrank_compensate (QERA / LQER / ZeroQuant-V2): a rank-k branch A·B that absorbs a tensor's quantization error.

With E = W − W_q (the error of the format really written) and C = E[xxᵀ] of
the layer's input, the output error of W_q + A·B is tr((E − AB) C (E − AB)ᵀ)
= ‖(E − AB) S‖²_F for any S with S·S = C. Its minimum over rank-k products is
the closed form

    E·S = U Σ Vᵀ (SVD),   B = U_k Σ_k^½,   A = Σ_k^½ V_kᵀ S⁻¹,   error = Σ_{i>k} σ_i²

with S = C^½ (exact, symmetric square root in float64), S = diag(√E[x²])
(cheap: the importance matrix) or S = I (plain SVD of the error, ZeroQuant-V2).
Only the exact S minimises the true output error; the others are scalings that
need less calibration. The branch is stored in F16 and its cost is computed
with the F16 values (what the runtime multiplies), under the same C the
sensitivity pass uses, so branch options and plain options are commensurate.

The top-k singular triplets come from a seeded randomized range finder (a few
power iterations) that never forms E·S: for the few components kept this is
as good as a full SVD at a fraction of the cost, and the cost recorded is the
true error of the branch actually written, not the SVD's estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.passes.base import Pass

SCALINGS = ("exact", "diag", "identity")
_EPS = 1e-8


@dataclass
class Scaling:
    """S and S⁻¹ for one input: full matrices (exact) or vectors (diagonal / identity)."""

    mode: str
    s: np.ndarray            # (n, n) or (n,)
    s_inv: np.ndarray

    def right(self, m: np.ndarray) -> np.ndarray:
        """m · S."""
        return m @ self.s if self.s.ndim == 2 else m * self.s

    def left(self, m: np.ndarray) -> np.ndarray:
        """S · m (S is symmetric)."""
        return self.s @ m if self.s.ndim == 2 else self.s[:, None] * m

    def inv_left(self, m: np.ndarray) -> np.ndarray:
        """S⁻¹ · m."""
        return self.s_inv @ m if self.s_inv.ndim == 2 else self.s_inv[:, None] * m


def scaling(mode: str, width: int, full: np.ndarray | None = None, diag: np.ndarray | None = None) -> Scaling:
    """The S of `mode` from the input's second moments (full E[xxᵀ] and/or its diagonal)."""
    if mode not in SCALINGS:
        raise EdgeqError(None, f"unknown low-rank scaling {mode!r} ({', '.join(SCALINGS)})")
    if mode == "identity" or (full is None and diag is None):
        one = np.ones(width)
        return Scaling("identity", one, one)
    if mode == "diag" or full is None:
        d = np.asarray(diag if diag is not None else np.diag(full), dtype=np.float64)
        floor = _EPS * max(float(d.mean()), _EPS)
        s = np.sqrt(np.maximum(d, floor))
        return Scaling("diag", s, 1.0 / s)
    # exact: symmetric square root; eigenvalues below a relative floor are lifted (C is rank-deficient when
    # calibration saw fewer tokens than the input width, the method's known pitfall)
    lam, v = np.linalg.eigh(np.asarray(full, dtype=np.float64))
    floor = _EPS * max(float(lam.max()), _EPS)
    r = np.sqrt(np.maximum(lam, floor))
    return Scaling("exact", (v * r) @ v.T, (v / r) @ v.T)


def top_svd(e: np.ndarray, sc: Scaling, k: int, seed: int = 0, power: int = 4):
    """Top-k singular triplets of E·S without forming it (deterministic: seeded)."""
    out_dim, in_dim = e.shape
    k = min(k, out_dim, in_dim)
    if min(out_dim, in_dim) <= 4 * k + 16:
        u, s, vt = np.linalg.svd(sc.right(e), full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    rng = np.random.default_rng(seed)
    p = min(k + 10, in_dim)
    y = e @ sc.left(rng.standard_normal((in_dim, p)))            # (E S) Ω
    for _ in range(power):
        q, _ = np.linalg.qr(y)
        z = sc.left(e.T @ q)                                        # (E S)ᵀ Q
        q2, _ = np.linalg.qr(z)
        y = e @ sc.left(q2)
    q, _ = np.linalg.qr(y)
    small = sc.right(q.T @ e)                                       # Qᵀ E S, (p, in)
    u, s, vt = np.linalg.svd(small, full_matrices=False)
    return (q @ u)[:, :k], s[:k], vt[:k]


def branch(e: np.ndarray, sc: Scaling, rank: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) in float16: A is (rank, in), B is (out, rank); W_q + B·A approximates W."""
    u, s, vt = top_svd(np.asarray(e, dtype=np.float64), sc, rank, seed)
    root = np.sqrt(s)
    b = u * root
    a = root[:, None] * sc.inv_left(vt.T).T
    return a.astype(np.float16), b.astype(np.float16)


def branch_costs(e: np.ndarray, a: np.ndarray, b: np.ndarray, ranks: list[int], cov: np.ndarray | None,
                 diag: np.ndarray | None, base: float | None = None,
                 rows: np.ndarray | None = None) -> dict[int, float]:
    """tr((E − B_r A_r) C (E − B_r A_r)ᵀ) for every r in `ranks` (nested prefixes of one branch); with `rows`
    (per-output-row Fisher weights F) Σ_o F_o ((E − B_r A_r) C (E − B_r A_r)ᵀ)_oo, and then `base` must be
    weighted the same way.

    Expanded as tr(ECEᵀ) − 2 tr(B_r A_r C Eᵀ) + tr(B_r A_r C A_rᵀ B_rᵀ) so that only k×n products are formed.
    C is full, diagonal, or the identity, like the sensitivity pass's cost; `base` = tr(ECEᵀ) when the caller
    has it already (the costliest term: an out×in×in product).
    """
    e = np.asarray(e, dtype=np.float64)
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    w = np.ones(e.shape[0]) if rows is None else np.asarray(rows, dtype=np.float64)
    if cov is not None:
        ac = a @ cov
        if base is None:
            base = float(np.einsum("ij,ij->i", e @ cov, e) @ w)
    elif diag is not None:
        ac = a * diag
        if base is None:
            base = float((np.square(e) @ diag) @ w)
    else:
        ac = a
        if base is None:
            base = float(np.square(e).sum(1) @ w)
    bw = b * w[:, None]
    p = ac @ e.T                                    # (k, out): row i is A_i C Eᵀ
    h = ac @ a.T                                    # (k, k)
    kk = bw.T @ b                                   # (k, k): Bᵀ diag(F) B
    cross = np.einsum("oi,io->i", bw, p)            # B_i · diag(F) P_i
    out = {}
    for r in ranks:
        r = min(r, a.shape[0])
        out[r] = max(base - 2 * float(cross[:r].sum()) + float((h[:r, :r] * kk[:r, :r]).sum()), 0.0)
    return out


def compute_branches(graph, plan, calibration, mode: str = "exact", k_max: int | None = None,
                     progress=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The branch of every tensor the plan gives a rank, against the error of the format the plan writes.

    `k_max` is the largest rank the sensitivity pass decomposed for: branches are prefixes of that
    decomposition, so the branch written is the one whose cost the allocator saw.
    """
    todo = [n for n, t in plan.tensors.items() if t.rank and n in graph.weights]
    if not todo:
        return {}
    imatrix = calibration.imatrix() if calibration is not None else {}
    scalings: dict[str, Scaling] = {}
    out = {}
    for name in (todo if progress is None else progress(todo, desc="low-rank branches", unit="tensor")):
        tp = plan.tensors[name]
        w = graph.weights[name].numpy()
        if w.ndim != 2:
            raise EdgeqError(None, f"plan gives 1-D tensor {name} a low-rank branch")
        fmt = get_format(tp.format)
        stats = calibration.stats(name) if calibration is not None else None
        key = calibration.weight_input.get(name, name) if calibration is not None else name
        if key not in scalings:
            scalings[key] = scaling(mode, w.shape[1], *((stats.full(), stats.diag()) if stats is not None
                                                         else (None, None)))
        e = w - fmt.roundtrip(w, imatrix.get(name) if fmt.takes_imatrix else None)
        a, b = branch(e, scalings[key], max(tp.rank, k_max or 0))
        out[name] = (a[:tp.rank], b[:, :tp.rank])
    return out


class LowrankCompensate(Pass):
    """Pass: ctx.analysis['branches'] = {weight: (A, B)} for the plan's tensors with a rank (plan unchanged)."""

    name = "lowrank_compensate"

    def __init__(self, mode: str | None = None):
        self.mode = mode

    def run(self, graph, plan, ctx):
        search = plan.search or {}
        mode = self.mode or search.get("lowrank_scaling") or "exact"
        k_max = max(search.get("ranks") or [0])
        branches = compute_branches(graph, plan, ctx.analysis.get("calibration"), mode, k_max, ctx.progress)
        ctx.analysis["branches"] = branches
        ctx.record(self.name, scaling=mode, tensors=len(branches),
                   ranks=dict(sorted({str(a.shape[0]): sum(1 for x in branches.values() if x[0].shape[0] == a.shape[0])
                                      for a, _ in branches.values()}.items())))
        return graph, plan
