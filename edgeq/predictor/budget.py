"""A latency budget as the ILP sees it: each (tensor, option)'s predicted milliseconds, and the rest.

The predicted wall time of a call is linear in each weight's kernel time (model.py: the correction's linear
part, slope a), so a plan's prediction is  Σ_t a·kernel_t(option_t) + fixed, and `Σ_t coef(t, option) ≤
X − fixed` is an exact ILP row, up to the learned residual factor. The allocator checks each solution with
the full prediction (`exact`) and, if it is over X, solves again under a bound lowered by the excess.
A low-rank branch y += B·(A·x) costs two more f16 products (rank x cols, rows x rank).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.models import names
from edgeq.predictor.model import Predictor
from edgeq.predictor.workload import decoder_workload

BRANCH_FORMAT = "f16"


@dataclass
class LatencyBudget:
    """What the ILP needs to bound one call's predicted latency (a decode step at a context, or a prefill)."""

    fitted: Predictor
    graph: Graph
    n_ctx: int
    kv_dtype: str
    kind: str                  # "decode" | "prefill"
    key: int                   # context tokens (decode) or prompt tokens (prefill)
    limit_ms: float

    def __post_init__(self) -> None:
        if self.graph.kind != "decoder":
            raise EdgeqError(None, "--latency-ms plans decoders for now")
        self.tokens = 1 if self.kind == "decode" else int(self.key)
        self.slope = self.fitted.marginal_ms(self.kind)
        self.head = names.head(self.graph.config.tied_embeddings)

    @property
    def what(self) -> str:
        return (f"decode step at {self.key} tokens of context" if self.kind == "decode"
                else f"prefill of {self.key} tokens")

    def _workload(self, formats: dict[str, str], mlp_widths: list[int] | None = None):
        full = {n: formats.get(n, "f32") for n, t in self.graph.weights.items() if len(t.shape) == 2}
        return decoder_workload(self.graph.config, full, self.n_ctx, self.kv_dtype, mlp_widths=mlp_widths)

    def pruned_ms(self, formats: dict[str, str], mlp_widths: list[int] | None) -> float:
        """The full prediction (ms) of a plan writing `formats` whose MLPs keep `mlp_widths` channels per layer
        (the search's latency: widths change the shapes, not only the formats)."""
        return self.fitted.call_ms(self._workload(formats, mlp_widths), self.kind, self.key)

    def _branch_us(self, shape: tuple[int, ...], rank: int) -> float:
        rows, cols = shape
        return (self.fitted.kernel_us(BRANCH_FORMAT, rank, cols, self.tokens)
                + self.fitted.kernel_us(BRANCH_FORMAT, rows, rank, self.tokens))

    def coef(self, tensor: str, fmt: str, rank: int = 0) -> float:
        """Milliseconds the option adds to the call's predicted wall time (linear part)."""
        t = self.graph.weights[tensor]
        if len(t.shape) != 2 or (tensor == names.EMBED and self.head != names.EMBED):
            return 0.0                  # not multiplied with (an untied token table is only looked up)
        us = self.fitted.kernel_us(fmt, t.shape[0], t.shape[1], self.tokens)
        if rank:
            us += self._branch_us(t.shape, rank)
        return self.slope * us / 1e3

    def exact(self, choice: dict[str, tuple[str, int]]) -> float:
        """The full prediction (ms) of a plan choosing (format, rank) per tensor."""
        w = self._workload({n: f for n, (f, _) in choice.items()})
        branches = sum(self._branch_us(self.graph.weights[n].shape, r) for n, (_, r) in choice.items() if r)
        return self.fitted.call_ms(w, self.kind, self.key) + self.slope * branches / 1e3

    def fixed_ms(self, choice: dict[str, tuple[str, int]]) -> float:
        """What the prediction of `choice` holds beyond the options' coefficients (the linear row's constant)."""
        return self.exact(choice) - sum(self.coef(n, f, r) for n, (f, r) in choice.items())

    def too_fast_error(self, fastest_ms: float, budget_note: str) -> EdgeqError:
        p = self.fitted.profile
        return EdgeqError(None, f"latency budget {self.limit_ms:g} ms is below the fastest feasible plan's predicted "
                                f"{self.what}: {fastest_ms:.3f} ms ({p.describe()}{budget_note})")
