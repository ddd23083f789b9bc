"""Peak resident memory of a plan on a profiled device: what its runtime keeps, term by term, plus a base.

Where a backend's runtime has its terms measured (`Target.resident`, targets/base.py: llama.cpp's), a session
that prefills N tokens into a context of n_ctx peaks at

    base + file + KV cache + activations(N) + logits + tokenizer

each term computed from the plan and those facts (the file once; the KV cache of the padded context; one graph's
live activations per token of the largest batch; the logits the runtime keeps; the tokenizer's entries) and only
`base` taken from the profile: what the micro-models' measured peaks leave over their terms (the interpreter, the
runtime's libraries and code pages, llama.cpp's graph bookkeeping), their median. A profile whose workloads do not
record their tokenizers (older profiles) leaves that term in the base.

Elsewhere (ONNX, TVM: terms not measured yet) the older model: a base plus the files, the KV cache and the logits
of every token (an encoder: its widest activation), each once unless the micro-models say otherwise (ridge
regression on the deviations, relative errors: with few micro-models the prior stands).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeq.core.formats import get_format
from edgeq.models import names
from edgeq.predictor.workload import Workload
from edgeq.targets.base import ResidentFacts, Target

F32 = 4


def resident_terms(w: Workload, facts: ResidentFacts, tokens: int, repacked_head: bool = False) -> dict[str, float]:
    """The bytes a measured runtime keeps beyond its base for a decoder session that held `tokens` tokens, fed as
    one prompt (its largest batch: what the latency runs and `edgeq predict` describe). `repacked_head`: the tied
    embedding is copied into the runtime's own layout for the head while the lookups read its rows from the file,
    so up to its bytes again (counted whole: every row is looked up sooner or later, and the kernel faults a page
    window in around each row)."""
    batch = min(max(tokens, 1), w.n_ctx, facts.max_batch_tokens or tokens)
    per_hidden, per_ffn = facts.activation_floats
    head = next((m for m in w.matmuls if m.weight == names.EMBED), None) if repacked_head else None
    return {
        "file": float(w.file_bytes or w.weight_bytes),
        "embedding_lookups": float(get_format(head.format).nbytes((head.rows, head.cols)) if head else 0),
        "kv_cache": float(w.kv_bytes(facts.kv_cell_multiple)),
        "activations": float(batch * (F32 * (per_hidden * w.hidden + per_ffn * w.ffn) + facts.work_bytes_per_ffn * w.ffn)),
        # the runtime's buffer and the copy it hands out
        "logits": float(2 * F32 * w.vocab * (min(tokens, w.n_ctx) if facts.prompt_logits else 1)),
        "tokenizer": float(facts.tokenizer_bytes_per_entry * w.tokenizer_entries),
    }


def memory_features(w: Workload, tokens: int) -> np.ndarray:
    """The older model's features: the files a runtime maps, the KV cache it allocates, the logits of the tokens
    (an encoder: its widest activation, n·ffn)."""
    out = tokens * (w.ffn if w.kind == "encoder" else w.vocab) * float(F32)
    return np.array([w.file_bytes or w.weight_bytes, w.kv_bytes(), out], dtype=np.float64)


@dataclass
class MemoryModel:
    """Fitted on a profile's measured peaks (`fit`); `peak_bytes` of any workload of its backend."""

    target: Target
    cpu_flags: frozenset[str]                 # the profiled device's (which weights its runtime repacks)
    base: float
    coef: np.ndarray | None = None            # the older model's per-feature multipliers (unmeasured runtimes)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def facts(self) -> ResidentFacts:
        return self.target.resident

    def uses_terms(self, w: Workload) -> bool:
        return self.coef is None and w.kind == "decoder"

    def repacked_head(self, w: Workload) -> bool:
        return any(m.weight == names.EMBED and self.target.repacks(m.format, m.rows, self.cpu_flags)
                   for m in w.matmuls)

    def terms(self, w: Workload, tokens: int) -> dict[str, float]:
        """The prediction's parts (bytes), the base included, for a session that held `tokens` tokens."""
        if self.uses_terms(w):
            return {"base": self.base, **resident_terms(w, self.facts, tokens, self.repacked_head(w))}
        return {"base": self.base, "features": float(self.coef @ memory_features(w, tokens))}

    def peak_bytes(self, w: Workload, tokens: int) -> int:
        return int(sum(self.terms(w, tokens).values()))

    @classmethod
    def fit(cls, target: Target, cpu_flags: frozenset[str], runs: list[tuple[Workload, int, float]]) -> "MemoryModel":
        """`runs`: (workload, the most tokens one runner process held, its measured peak bytes) per micro-model."""
        if target.resident.measured and all(w.kind == "decoder" for w, *_ in runs):
            m = cls(target, cpu_flags, 0.0)
            left = np.array([y - sum(m.terms(w, n).values()) for w, n, y in runs])
            base = float(np.median(left))
            y = np.array([r[2] for r in runs])
            return cls(target, cpu_flags, base, report={"model": "terms", "base_mib": round(base / 2**20, 2),
                                            "micro_model_mape": round(float(np.mean(np.abs(left - base) / y)), 4)})
        x = np.array([memory_features(w, t) for w, t, _ in runs])
        y = np.array([r[2] for r in runs])
        coef, icpt = fit_features(x, y)
        return cls(target, cpu_flags, icpt, coef, report={"model": "features"})


def fit_features(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Peak memory = a fixed base + each feature once (the prior), adjusted where the micro-models say otherwise
    (scikit-learn's Ridge on the deviations, relative errors: with few micro-models the prior stands)."""
    from sklearn.linear_model import Ridge

    scale = np.maximum(np.abs(x).max(axis=0), 1.0)
    m = Ridge(alpha=2.0).fit(x / scale, y - x.sum(axis=1), sample_weight=(np.mean(y) / np.maximum(y, 1.0)) ** 2)
    return 1.0 + m.coef_ / scale, float(m.intercept_)
