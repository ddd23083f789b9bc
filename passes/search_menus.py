"""SpaceEvo's menus: which search space to search on this device, scored before searching it.

A menu is a width step (16, 32, 64 or 256 channels) and a format set (every candidate; the 32-weight block formats
and floats; the 256-weight K/i-quant block formats and floats). Which menu is best depends on the device: what a
format gains over float varies with the shapes and the kernels (the latency profile's), and a coarse width step
wastes budget while a fine one only helps where the formats' blocks allow it.

Q-T score (SpaceEvo's, with the accuracy predictor for accuracy): sample `samples` points of the menu's space
uniformly, T = the share that meets the budgets, Q = exp(−mean predicted log-error of the best quarter of those
that do); score = T·Q (0 when none does). A menu whose points mostly miss the budget, or whose feasible points are
all poor, scores low. `edgeq search --menu auto` scores every menu with the pre-trained (cheap) predictor, records
the table in the plan's `search.menus`, and searches the best one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from edgeq.core.formats import get_format
from edgeq.passes.search_space import Budgets, SearchSpace

WIDTH_STEPS = (16, 32, 64, 256)


def _floats(f: str) -> bool:
    return get_format(f).block == (1, 1)


FORMAT_SETS: dict[str, Callable[[str], bool]] = {
    "all": lambda f: True,
    "32-blocks": lambda f: _floats(f) or get_format(f).block[1] == 32,
    "256-blocks": lambda f: _floats(f) or get_format(f).block[1] == 256,
}


@dataclass
class MenuScore:
    name: str
    width_step: int
    formats: str
    feasible_share: float
    quality: float
    score: float


def qt_score(space: SearchSpace, predict: Callable[[np.ndarray], np.ndarray], budgets: Budgets,
             rng: np.random.Generator, samples: int) -> tuple[float, float]:
    """(T, Q) of a space: the share of uniform samples within the budgets, and exp(−mean predicted log-error of the
    best quarter of them)."""
    pts = [space.uniform(rng) for _ in range(samples)]
    ok = [p for p in pts if space.measures(p).meets(budgets)]
    if not ok:
        return 0.0, 0.0
    pred = np.sort(predict(np.array([space.features(p) for p in ok])))
    best = pred[:max(1, len(pred) // 4)]
    return len(ok) / len(pts), float(np.exp(-best.mean()))


def score_menus(base: SearchSpace, predict: Callable[[np.ndarray], np.ndarray], budgets: Budgets, seed: int,
                samples: int = 200) -> list[tuple[MenuScore, SearchSpace]]:
    """Every menu's space and Q-T score, best first (ties: the listed order)."""
    out = []
    for fname, keep in FORMAT_SETS.items():
        for step in WIDTH_STEPS:
            space = base.variant(step, keep)
            t, q = qt_score(space, predict, budgets, np.random.default_rng([seed, step, len(out)]), samples)
            out.append((MenuScore(f"step {step}, {fname}", step, fname, round(t, 4), round(q, 6), t * q), space))
    order = sorted(range(len(out)), key=lambda i: (-out[i][0].score, i))
    return [out[i] for i in order]


def menu_table(scored: list[tuple[MenuScore, SearchSpace]]) -> list[dict]:
    return [asdict(m) | {"score": round(m.score, 6)} for m, _ in scored]
