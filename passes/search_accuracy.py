"""The search's accuracy predictor, trained by APQ's transfer: many cheap labels first, then a few expensive ones.

Features: each gene's bits per weight and each layer's kept share of MLP channels (search_space.features). Model: a
small MLP (scikit-learn's MLPRegressor, two hidden layers). Labels are log-costs standardised per label set, since
only their order matters to the search:

- `cheap`: trained on the cheap labels only (summed Fisher costs plus pruning costs: thousands per second);
- `expensive`: trained from scratch on the expensive labels only (real KLD of the exported model in its runtime);
- `transfer` (APQ): trained on the cheap labels, then fine-tuned on the expensive ones, starting from those
  weights with a smaller step, so a handful of real measurements corrects the cheap proxy's bias (what it misses:
  interactions between layers, the runtime's real kernels) without having to learn the space from scratch.

bench/search.py measures each against held-out configurations (Spearman ρ) at several label budgets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from edgeq.core.errors import EdgeqError

MODES = ("cheap", "expensive", "transfer")
HIDDEN = (64, 32)
PRETRAIN_ITERS = 400
FINETUNE_ITERS = 150
FINETUNE_LR = 3e-4


def _log_labels(y: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(y, dtype=np.float64), 1e-12))


@dataclass
class _Standard:
    mean: np.ndarray | float
    std: np.ndarray | float

    @classmethod
    def of(cls, x: np.ndarray, axis: int | None = 0) -> "_Standard":
        s = x.std(axis=axis)
        return cls(x.mean(axis=axis), np.where(s > 1e-12, s, 1.0) if axis is not None else (s if s > 1e-12 else 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


@dataclass
class AccuracyPredictor:
    """Predicts a configuration's log-error (lower is better) from its features."""

    mode: str = "transfer"
    seed: int = 0
    fitted: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EdgeqError(None, f"unknown predictor mode {self.mode!r} ({', '.join(MODES)})")

    def _net(self, iters: int, lr: float = 1e-3):
        from sklearn.neural_network import MLPRegressor

        return MLPRegressor(hidden_layer_sizes=HIDDEN, alpha=1e-4, learning_rate_init=lr, max_iter=iters,
                            random_state=self.seed, warm_start=True, tol=0.0, n_iter_no_change=iters + 1,
                            batch_size=64)

    def fit(self, x_cheap: np.ndarray | None, y_cheap: np.ndarray | None, x_exp: np.ndarray | None,
            y_exp: np.ndarray | None) -> "AccuracyPredictor":
        """Train per the mode; `transfer` and `cheap` need cheap labels, `expensive` and `transfer` expensive ones
        (`transfer` without any expensive label is `cheap`)."""
        use_cheap = self.mode in ("cheap", "transfer")
        use_exp = self.mode in ("expensive", "transfer") and x_exp is not None and len(x_exp) > 0
        if use_cheap and (x_cheap is None or len(x_cheap) == 0):
            raise EdgeqError(None, f"the {self.mode} accuracy predictor needs cheap labels")
        if self.mode == "expensive" and not use_exp:
            raise EdgeqError(None, "the expensive-only accuracy predictor needs expensive labels")
        base = x_cheap if use_cheap else x_exp
        self.fitted["x"] = _Standard.of(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # ConvergenceWarning: the iteration counts are the schedule
            if use_cheap:
                yc = _log_labels(y_cheap)
                self.fitted["y"] = _Standard.of(yc, axis=None)
                net = self._net(PRETRAIN_ITERS)
                net.fit(self.fitted["x"](x_cheap), self.fitted["y"](yc))
                if use_exp:
                    ye = _log_labels(y_exp)
                    self.fitted["y"] = _Standard.of(ye, axis=None)
                    net.set_params(max_iter=FINETUNE_ITERS, n_iter_no_change=FINETUNE_ITERS + 1,
                                   learning_rate_init=FINETUNE_LR)
                    net.fit(self.fitted["x"](x_exp), self.fitted["y"](ye))
            else:
                ye = _log_labels(y_exp)
                self.fitted["y"] = _Standard.of(ye, axis=None)
                net = self._net(PRETRAIN_ITERS)
                net.fit(self.fitted["x"](x_exp), self.fitted["y"](ye))
        self.fitted["net"] = net
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted log-error, in the units of the last labels trained on."""
        if "net" not in self.fitted:
            raise EdgeqError(None, "the accuracy predictor is not trained")
        z = self.fitted["net"].predict(self.fitted["x"](np.atleast_2d(x)))
        y = self.fitted["y"]
        return z * y.std + y.mean


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0
