"""The search's additive cost corrected by its real labels, so the ILP can be solved again with what they taught.

The ILP's plan is optimal for the cost it minimises: a sum of per-tensor costs (Fisher-weighted output errors).
The search can only beat it where that sum is wrong, and the commonest way for it to be wrong is by role: the
Fisher cost may under-price the value projections against the MLP, or the head against everything, by a factor
the same in every layer. A dozen real labels (measured KLDs) cannot train a model of the whole space, but they can
fit one multiplier per tensor role (q, k, v, o, gate, up, down, embedding, head; pruning as one more):

    KLD_i ≈ Σ_g m_g · C_g(i)          (C_g(i): point i's summed cost over the tensors of role g)

by non-negative least squares on relative errors, pulled towards the global scale (m_g = 1 after scaling) with a
ridge of strength λ: a role the labels do not vary stays at 1, one they do moves only as far as they show. Each λ
of a small grid gives a corrected cost table; the ILP solved on it is a plan the search measures beside its own
(search.py). Leave-one-out on the labels picks the λ whose corrected cheap label predicts a left-out label best
(it also guides the evolution's score).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from edgeq.passes.search_space import Candidate, SearchSpace
from edgeq.passes.sensitivity import CostTable

PRUNING = "pruning"
LAMBDAS = (3.0, 0.3, 0.03)        # strong to weak pull towards the uncorrected cost


def role_of(tensor: str) -> str:
    """A tensor's role: its name with the layer index taken out (`model.layers.*.mlp.down_proj.weight`)."""
    return re.sub(r"\.\d+\.", ".*.", tensor)


@dataclass(frozen=True)
class CostCorrection:
    """One multiplier per role (and for pruning) relative to the labels' global scale, that scale (KLD per unit
    of cost), and the ridge strength that gave them."""

    lam: float
    multipliers: dict[str, float]
    global_scale: float = 1.0

    def scale(self, role: str) -> float:
        return self.multipliers.get(role, 1.0)

    def table(self, table: CostTable) -> CostTable:
        """`table` with every option's cost multiplied by its tensor's role multiplier."""
        return CostTable({n: [replace(o, cost=o.cost * self.scale(role_of(n))) for o in opts]
                          for n, opts in table.options.items()}, table.fixed_bytes, table.n_params, table.info)

    def label(self, space: SearchSpace, c: Candidate) -> float:
        """The point's corrected cheap label, in the labels' units (KLD)."""
        groups = role_costs(space, c)
        return self.global_scale * float(sum(v * self.scale(g) for g, v in groups.items()))

    def to_json(self) -> dict:
        return {"lambda": self.lam, "global_scale": float(f"{self.global_scale:.6g}"),
                "multipliers": {k: round(v, 6) for k, v in sorted(self.multipliers.items())}}


def role_costs(space: SearchSpace, c: Candidate) -> dict[str, float]:
    """The point's cheap label split by role (the same sum as `space.cheap_label`)."""
    out: dict[str, float] = {}
    for t, cost in space.tensor_costs(c).items():
        out[role_of(t)] = out.get(role_of(t), 0.0) + cost
    out[PRUNING] = space.pruning_cost(c)
    return out


def _design(space: SearchSpace, points: list[Candidate]) -> tuple[list[str], np.ndarray]:
    """The roles, and each point's cost per role (rows): computed once, shared by every fit and leave-one-out."""
    parts = [role_costs(space, c) for c in points]
    roles = sorted({g for p in parts for g in p})
    return roles, np.array([[p.get(g, 0.0) for g in roles] for p in parts], dtype=np.float64)


def _fit_rows(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """(multipliers, global scale) for cost rows `x` and labels `y` (see the module's docstring); relative errors,
    since labels span decades."""
    from scipy.optimize import lsq_linear

    y = np.maximum(y, 1e-12)
    total = x.sum(axis=1)
    ok = total > 0
    # the global scale s: min Σ ((s·C_i − y_i)/y_i)² over the points with any cost
    r = total[ok] / y[ok]
    s = float(r.sum() / (r @ r)) if ok.any() and r @ r > 0 else 1.0
    n, k = x.shape
    a = np.vstack([s * x / y[:, None], np.sqrt(lam * n) * np.eye(k)])
    b = np.concatenate([np.ones(n), np.sqrt(lam * n) * np.ones(k)])
    return lsq_linear(a, b, bounds=(0.0, np.inf), method="bvls").x, s


def fit(space: SearchSpace, measured: dict[Candidate, float], lam: float) -> CostCorrection:
    """The correction for `lam` fitted on every label."""
    points = list(measured)
    roles, x = _design(space, points)
    m, s = _fit_rows(x, np.array([measured[c] for c in points], dtype=np.float64), lam)
    return CostCorrection(lam, {g: float(v) for g, v in zip(roles, m)}, s)


def corrections(space: SearchSpace, measured: dict[Candidate, float],
                lams: tuple[float, ...] = LAMBDAS) -> tuple[list[CostCorrection], CostCorrection | None]:
    """One correction per λ (fitted on every label), and the one whose λ predicts the left-out label best in
    leave-one-out (squared log error; None with fewer than four labels: too few to fit anything)."""
    if len(measured) < 4:
        return [], None
    points = list(measured)
    roles, x = _design(space, points)
    y = np.array([measured[c] for c in points], dtype=np.float64)
    fitted, best, best_err = [], None, np.inf
    for lam in lams:
        m, s = _fit_rows(x, y, lam)
        full = CostCorrection(lam, {g: float(v) for g, v in zip(roles, m)}, s)
        fitted.append(full)
        err = 0.0
        for i in range(len(points)):
            rest = np.arange(len(points)) != i
            m_i, s_i = _fit_rows(x[rest], y[rest], lam)
            err += (np.log(max(s_i * float(x[i] @ m_i), 1e-12)) - np.log(max(y[i], 1e-12))) ** 2
        if err < best_err:
            best, best_err = full, err
    return fitted, best
