"""The search's accuracy predictor, trained by APQ's transfer: many cheap labels first, then a few expensive ones.

Features: each gene's bits per weight and each layer's kept share of MLP channels (search_space.features). Model: a
small MLP (scikit-learn's MLPRegressor, two hidden layers). Labels are log-costs standardised per label set, since
only their order matters to the search:

- `cheap`: trained on the cheap labels only (summed Fisher costs plus pruning costs: thousands per second);
- `expensive`: trained from scratch on the expensive labels only (real KLD of the exported model in its runtime);
- `transfer` (APQ): trained on the cheap labels, then fine-tuned on the expensive ones: the output layer re-fitted
  with a pull towards the pre-trained one whose strength leave-one-out picks (`_fine_tune`), so a handful of real
  measurements corrects the cheap proxy's bias (what it misses: interactions between layers, the runtime's real
  kernels) without having to learn the space from scratch, and cannot wreck the ranking it started from.

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
        try:
            from sklearn.neural_network import MLPRegressor
        except ImportError:
            raise EdgeqError(None, "edgeq search needs scikit-learn: pip install 'edgeq[search]'") from None

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
        x_train, y_train = (x_cheap, y_cheap) if use_cheap else (x_exp, y_exp)
        self.fitted["x"] = _Standard.of(x_train)
        y = _log_labels(y_train)
        self.fitted["y"] = _Standard.of(y, axis=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # ConvergenceWarning: the iteration count is the schedule
            net = self._net(PRETRAIN_ITERS)
            net.fit(self.fitted["x"](x_train), self.fitted["y"](y))
        self.fitted["net"] = net
        self.fitted["head"] = None
        if use_cheap and use_exp:
            self._fine_tune(x_exp, _log_labels(y_exp))
        return self

    def _hidden(self, x: np.ndarray) -> np.ndarray:
        """The last hidden layer's activations (ReLU), with a constant column: what the output layer reads."""
        net = self.fitted["net"]
        h = self.fitted["x"](np.atleast_2d(x))
        for w, b in zip(net.coefs_[:-1], net.intercepts_[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return np.hstack([h, np.ones((len(h), 1))])

    def _fine_tune(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fine-tune the output layer on the expensive labels, pulled towards the pre-trained one.

        The pre-trained prediction p is first mapped onto the expensive labels' scale (y ≈ a·p + b, least squares:
        the two label kinds are different units of the same error), then the output layer's correction d solves
        min ‖H d − (y − a·p − b)‖² + λ‖d‖² with λ picked by closed-form leave-one-out error over a grid that
        includes no correction at all. With a handful of labels LOO keeps the pre-trained ranking; with more it lets
        the real measurements reshape it. The hidden layers stay as pre-trained (few labels cannot train them)."""
        h = self._hidden(x)
        net = self.fitted["net"]
        w0 = np.append(net.coefs_[-1][:, 0], net.intercepts_[-1][0])
        p = h @ w0
        ys = _Standard.of(y, axis=None)
        z = ys(y)
        a_b = np.linalg.lstsq(np.column_stack([p, np.ones_like(p)]), z, rcond=None)[0] if len(z) > 1 \
            else np.array([1.0, z[0] - p[0]])
        if a_b[0] <= 0:             # the labels disagree with the proxy's order: keep its order, match the scale
            a_b = np.array([float(np.std(z) / (np.std(p) or 1.0)) if len(z) > 1 else 1.0, 0.0])
            a_b[1] = float(np.mean(z - a_b[0] * p))
        r = z - (a_b[0] * p + a_b[1])
        scale = float(np.trace(h.T @ h)) / h.shape[1] or 1.0
        best = (float(np.mean(r ** 2)), np.zeros(h.shape[1]))          # λ = ∞: no correction
        for lam in scale * np.logspace(-3, 3, 13):
            hat_inv = np.linalg.inv(h.T @ h + lam * np.eye(h.shape[1]))
            d = hat_inv @ h.T @ r
            lev = np.einsum("ij,jk,ik->i", h, hat_inv, h)
            loo = float(np.mean(((r - h @ d) / np.maximum(1 - lev, 1e-6)) ** 2))
            if loo < best[0] - 1e-12:
                best = (loo, d)
        # the correction as far as the labels reach: a ReLU net's hidden activations grow without bound away from
        # its training data, and an unbounded correction there hands the evolution points that only look good
        # (measured: finalists predicted e^-18 that measured 0.2 KLD, 60x the ILP's plan)
        reach = h @ best[1]
        self.fitted["head"] = (w0, a_b, best[1], (float(reach.min()), float(reach.max())))
        self.fitted["y"] = ys

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted log-error, in the units of the last labels trained on."""
        if "net" not in self.fitted:
            raise EdgeqError(None, "the accuracy predictor is not trained")
        head = self.fitted["head"]
        if head is None:
            z = self.fitted["net"].predict(self.fitted["x"](np.atleast_2d(x)))
        else:
            w0, (a, b), d, (lo, hi) = head
            h = self._hidden(x)
            z = a * (h @ w0) + b + np.clip(h @ d, lo, hi)
        y = self.fitted["y"]
        return z * y.std + y.mean


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0
