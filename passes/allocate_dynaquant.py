"""allocate by DynaQuant-style learning: a softmax over each tensor's candidate formats, trained with a size penalty.

Per decidable tensor i a logit vector α_i over its candidate formats (the
registry's real types: GGUF's, or ONNX's MatMulNBits formats); p_i = softmax(α_i / τ) with τ annealed
geometrically towards one-hot. Each candidate j is simulated by a
differentiable proxy of its quantizer (its bit-width, block and symmetry)
with learnable per-output-channel step multipliers (LSQ+: log-parameterised,
gradient scaled by 1/√(N·Q_max)); rounding passes gradients through a
pluggable estimator (`ESTIMATORS`, straight-through by default: the paper's
distance-aware modulator is not public). The objective is layer-local
reconstruction on calibration statistics, affordable on 2 cores:

    Σ_i Σ_j p_ij · ‖(Q_j(W_i) − W_i) C_i^½‖² / Z  +  λ · ((E[bytes] − budget) / budget)²

with C_i = E[xxᵀ] of tensor i's input (a top-k eigen factor plus the
diagonal remainder), rows subsampled per step, Z the loss of the smallest
options at the start, E[bytes] = fixed + Σ_ij p_ij · bytes_ij (real bytes from
the cost table). Without the size term the selector drifts to the widest
format (the method's known pitfall).

Output: argmax per tensor, then a greedy repair on the learned per-candidate
losses until the real bytes fit the budget (downgrades with the least loss per
byte saved; then upgrades with the most gain per byte while they fit). Where
the backend sizes only whole plans exactly (ONNX), the plan is checked
against the exact size and repaired again under a budget smaller by any
excess (allocate.fit_exact_bytes, shared with the ILP). The
learned scales steer the selection only: ggml computes its own scales when
the file is written, so the plan holds ordinary formats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format, get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.passes.allocate import Allocation, budget_error, fit_exact_bytes, min_feasible_bytes, plan_from_choice
from edgeq.passes.base import Context, Pass
from edgeq.passes.sensitivity import CostTable, Option


def _torch():
    try:
        import torch
    except ImportError:
        raise EdgeqError(None, "--method dynaquant needs torch (pip install 'edgeq[search]')") from None
    return torch


def ste_round(x):
    """Straight-through: round forward, identity backward."""
    return (x.round() - x).detach() + x


ESTIMATORS: dict[str, Callable] = {"ste": ste_round}


def _proxy(fmt: Format) -> tuple[int, int, bool] | None:
    """(bits, block, asymmetric) the candidate is trained with: its grid in the registry (None: a float)."""
    if fmt.grid is None and fmt.bits_per_weight < 16:       # a format registered without a grid
        return (max(2, int(fmt.bits_per_weight) - 1), 32, True)
    return fmt.grid


def fake_quant(w, log_gamma, spec, rnd, torch):
    """Blockwise proxy quantizer of w (..., rows, cols) with per-row step multipliers exp(log_gamma) (..., rows)."""
    bits, block, asym = spec
    cols = w.shape[-1]
    if block <= 0:
        block = cols
    elif cols % block:
        block = 32 if cols % 32 == 0 else cols
    wb = w.reshape(*w.shape[:-1], cols // block, block)
    gamma = torch.exp(log_gamma)[..., None, None]
    if asym:
        lo = wb.amin(-1, keepdim=True)
        hi = wb.amax(-1, keepdim=True)
        qmax = 2 ** bits - 1
        step = ((hi - lo) / qmax).clamp_min(1e-12) * gamma
        out = torch.clamp(rnd((wb - lo) / step), 0, qmax) * step + lo
    else:
        qmax = 2 ** (bits - 1) - 1
        step = (wb.abs().amax(-1, keepdim=True) / max(qmax, 1)).clamp_min(1e-12) * gamma
        out = torch.clamp(rnd(wb / step), -qmax - 1, qmax) * step
    return out.reshape(w.shape)


def grad_scale(x, s: float):
    """LSQ's gradient scaling: value x, gradient × s."""
    return (x - x * s).detach() + x * s


@dataclass
class _Group:
    """Tensors of one shape (hence the same candidates), stacked so that a step costs a few batched ops."""

    names: list[str]
    opts: list[list[Option]]   # per tensor, in the same format order
    specs: list
    w: Any                     # (L, rows, cols)
    factor: Any                # (L, cols, k): C ≈ factor·factorᵀ + diag(rest)
    rest: Any                  # (L, cols)


def _factor(stats, cols: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigen factor of C and the diagonal it leaves; the identity without statistics."""
    if stats is None:
        return np.zeros((cols, k)), np.ones(cols)
    full = stats.full()
    if full is None:
        return np.zeros((cols, k)), stats.diag()
    lam, v = np.linalg.eigh(full)
    lam = np.maximum(lam, 0)
    top = np.argsort(lam)[::-1][:k]
    f = np.zeros((cols, k))
    f[:, :len(top)] = v[:, top] * np.sqrt(lam[top])
    rest = np.maximum(np.diag(full) - np.square(f).sum(1), 0)
    return f, rest


def _groups(graph: Graph, table: CostTable, calibration, k: int, torch) -> list[_Group]:
    by: dict[tuple, list[str]] = {}
    for name, opts in table.options.items():
        fm = tuple(sorted(o.format for o in opts if not o.rank))
        by.setdefault((tuple(graph.weights[name].shape), fm), []).append(name)
    groups = []
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}      # one per distinct input (q/k/v share theirs)
    for (shape, fm), names in by.items():
        ws, fs, rs, opts = [], [], [], []
        for n in names:
            ws.append(np.asarray(graph.weights[n].numpy(), dtype=np.float32))
            key = calibration.weight_input.get(n, n) if calibration is not None else n
            if key not in factors:
                factors[key] = _factor(calibration.stats(n) if calibration is not None else None, shape[1], k)
            f, r = factors[key]
            fs.append(f.astype(np.float32))
            rs.append(r.astype(np.float32))
            opts.append([next(o for o in table.options[n] if o.format == f_ and not o.rank) for f_ in fm])
        specs = [_proxy(get_format(f_)) for f_ in fm]
        groups.append(_Group(names, opts, specs, torch.from_numpy(np.stack(ws)), torch.from_numpy(np.stack(fs)),
                             torch.from_numpy(np.stack(rs)), ))
    return groups


@dataclass
class Selection:
    """What training learned: per tensor its options, the learned loss of each and the argmax; `fit` turns it
    into an allocation for any budget (the greedy repair, no retraining)."""

    names: list[str]
    opts: list[list[Option]]
    learned: list[np.ndarray]
    pick: list[int]
    fixed_bytes: int
    info: dict[str, Any]

    def fit(self, budget: int) -> Allocation:
        """The argmax repaired on real bytes until it fits `budget` (see _repair)."""
        choice = _repair(self.names, self.opts, self.learned, self.pick, budget - self.fixed_bytes)
        total = self.fixed_bytes + sum(o.bytes for o in choice.values())
        info = {**self.info, "changed_by_repair": sum(1 for n, o, j in zip(self.names, self.opts, self.pick)
                                                      if choice[n] is not o[j])}
        return Allocation(choice, total, sum(o.cost for o in choice.values()), info)


def learn_allocation(graph: Graph, table: CostTable, calibration, budget: int, **train: Any) -> Allocation:
    """Train the selector and scales (see module docstring); returns an allocation that fits `budget`."""
    return train_selection(graph, table, calibration, budget, **train).fit(budget)


def train_selection(graph: Graph, table: CostTable, calibration, budget: int, steps: int = 150,
                    lam: float = 50.0, tau: tuple[float, float] = (1.0, 0.02), rows_per_step: int = 32,
                    eigen_k: int = 32, lr: float = 0.05, estimator: str | Callable = "ste", seed: int = 0,
                    progress: Callable | None = None) -> Selection:
    """Train the selector and scales towards `budget` (see module docstring)."""
    torch = _torch()
    if budget < min_feasible_bytes(table):
        raise budget_error(table, budget, [])
    rnd = ESTIMATORS[estimator] if isinstance(estimator, str) else estimator
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    groups = _groups(graph, table, calibration, eigen_k, torch)
    logits = [torch.zeros(len(g.names), len(g.specs), requires_grad=True) for g in groups]
    gammas = [torch.zeros(len(g.specs), len(g.names), g.w.shape[1], requires_grad=True) for g in groups]
    sizes = [torch.tensor([[float(o.bytes) for o in opts] for opts in g.opts]) for g in groups]
    opt = torch.optim.Adam([{"params": logits, "lr": 4 * lr}, {"params": gammas, "lr": lr}])

    def losses(k: int, rows) -> Any:
        """(L, candidates) reconstruction errors of group k on `rows`, scaled to all rows."""
        g = groups[k]
        w = g.w[:, rows]
        out = []
        for j, spec in enumerate(g.specs):
            if spec is None:
                out.append(torch.zeros(len(g.names)))
                continue
            gs = grad_scale(gammas[k][j][:, rows], 1.0 / float(np.sqrt(w[0].numel() * (2 ** spec[0] - 1))))
            d = fake_quant(w, gs, spec, rnd, torch) - w
            err = (d @ g.factor).square().sum((1, 2)) + (d.square() * g.rest[:, None, :]).sum((1, 2))
            out.append(err * (g.w.shape[1] / len(rows)))
        return torch.stack(out, 1)

    with torch.no_grad():       # Z: the summed loss of every tensor's smallest option at the start (λ scale-free)
        z = 0.0
        for k, g in enumerate(groups):
            small = sizes[k].argmin(1)
            z += float(losses(k, torch.arange(g.w.shape[1])).gather(1, small[:, None]).sum())
    z = max(z, 1e-30)
    history = []
    it_steps = range(steps) if progress is None else progress(range(steps), desc="dynaquant", unit="step")
    for step in it_steps:
        t = tau[0] * (tau[1] / tau[0]) ** (step / max(steps - 1, 1))
        opt.zero_grad()
        loss = torch.zeros(())
        size = torch.tensor(float(table.fixed_bytes))
        for k, g in enumerate(groups):
            rows = torch.randperm(g.w.shape[1], generator=gen)[:rows_per_step]
            p = torch.softmax(logits[k] / t, 1)
            loss = loss + (p * losses(k, rows)).sum() / z
            size = size + (p * sizes[k]).sum()
        penalty = lam * ((size - budget) / budget) ** 2
        (loss + penalty).backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            history.append({"step": step, "tau": round(t, 4), "loss": float(loss.detach()),
                            "expected_mb": float(size.detach()) / 1e6})
    # per-candidate losses with the learned scales (all rows), argmax, then the budget repair on real bytes
    names, opts, learned, pick = [], [], [], []
    with torch.no_grad():
        for k, g in enumerate(groups):
            lk = (losses(k, torch.arange(g.w.shape[1])) / z).numpy()
            am = logits[k].argmax(1).tolist()
            names += g.names
            opts += g.opts
            learned += list(lk)
            pick += am
    order = {n: i for i, n in enumerate(table.options)}
    idx = sorted(range(len(names)), key=lambda i: order[names[i]])
    names, opts, learned, pick = ([x[i] for i in idx] for x in (names, opts, learned, pick))
    info = {"solver": "DynaQuant-style learned selection (softmax over formats, LSQ+ scales, "
                      f"{estimator if isinstance(estimator, str) else 'custom'} estimator)",
            "objective": "layer-local reconstruction tr(dW C dW^T) on calibration statistics + size penalty",
            "steps": steps, "lambda": lam, "tau": list(tau), "rows_per_step": rows_per_step, "eigen_k": eigen_k,
            "seconds": round(time.perf_counter() - t0, 2), "history": history,
            "argmax_mb": (table.fixed_bytes + sum(o[j].bytes for o, j in zip(opts, pick))) / 1e6}
    return Selection(names, opts, learned, pick, table.fixed_bytes, info)


def _repair(names: list[str], opts: list[list[Option]], learned: list[np.ndarray], pick: list[int],
            free: int) -> dict[str, Option]:
    """Fit the real bytes into `free` by greedy moves on the learned losses."""
    order = [sorted(range(len(o)), key=lambda j: o[j].bytes) for o in opts]
    pos = [order[k].index(j) for k, j in enumerate(pick)]
    size = sum(opts[k][order[k][p]].bytes for k, p in enumerate(pos))
    while size > free:
        best = None
        for k, p in enumerate(pos):
            if p == 0:
                continue
            a, b = order[k][p], order[k][p - 1]
            saved = opts[k][a].bytes - opts[k][b].bytes
            rate = (learned[k][b] - learned[k][a]) / max(saved, 1)
            if best is None or rate < best[0]:
                best = (rate, k, saved)
        if best is None:
            break
        pos[best[1]] -= 1
        size -= best[2]
    while True:
        best = None
        for k, p in enumerate(pos):
            if p + 1 >= len(order[k]):
                continue
            a, b = order[k][p], order[k][p + 1]
            added = opts[k][b].bytes - opts[k][a].bytes
            gain = (learned[k][a] - learned[k][b]) / max(added, 1)
            if size + added <= free and gain > 0 and (best is None or gain > best[0]):
                best = (gain, k, added)
        if best is None:
            break
        pos[best[1]] += 1
        size += best[2]
    return {n: opts[k][order[k][pos[k]]] for k, n in enumerate(names)}


class AllocateDynaQuant(Pass):
    """Replaces the plan with the learned selection for ctx.analysis['costs'] under the byte budget."""

    name = "allocate"

    def __init__(self, budget: int, ties: list[list[str]] = (), exact_bytes: Callable[[Plan], int] | None = None,
                 **train: Any):
        """`exact_bytes`: as Allocate's (FileLayout.exact_bytes, ONNX); training runs once on the cost table's
        additive bytes, and a plan over the budget is repaired again under a budget smaller by the excess."""
        self.budget = budget
        self.ties = [g for g in ties if len(g) > 1]
        self.exact_bytes = exact_bytes
        self.train = train

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        if self.ties:
            raise EdgeqError(None, "--method dynaquant does not take --ties (use --method ilp)")
        table: CostTable = ctx.analysis["costs"]
        sel = train_selection(graph, table, ctx.analysis.get("calibration"), self.budget, progress=ctx.progress,
                              **self.train)

        def fit_at(target: int) -> tuple[Allocation, Plan]:
            alloc = sel.fit(target)
            return alloc, plan_from_choice(graph, table, alloc.choice, "dynaquant", self.budget, [], ctx.backend,
                                           alloc.info)

        alloc, out = fit_exact_bytes(fit_at, self.budget, self.exact_bytes, table.n_params)
        out.calibration = plan.calibration
        ctx.record(self.name, method="dynaquant", budget_bytes=self.budget, predicted_bytes=alloc.total_bytes,
                   predicted_error=alloc.total_cost, formats=out.format_counts(),
                   **{k: v for k, v in alloc.info.items() if k != "history"})
        return graph, out
