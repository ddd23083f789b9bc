"""Choosing the next token: the sampling settings every backend takes, and edgeq's own sampler.

A backend whose runtime has a sampler of its own uses it (llama.cpp's chain: gguf_backend.LlamaCppSampler),
so a GGUF bundle samples as llama.cpp's tools do. The others use `NumpySampler`, which applies the same steps
in llama.cpp's order and with its rules, so a setting means the same on every backend:

    logit bias -> repetition penalties (last `repeat_last_n` tokens, the prompt's included) -> top-k -> top-p
    -> min-p -> temperature -> draw (or greedy at temperature 0)

top-p and min-p look at the distribution before the temperature, as llama.cpp's do. Both samplers see the
whole sequence: the prompt is `accept`ed before the first draw, each drawn token after it.

This module is the seam for the decode loop (runtime/generation.py): a sampler takes the backend's logits for
the last position and returns one token id. A sampler that reads them inside the runtime (llama.cpp's) says so
(`needs_logits` False), and the loop then never copies the vocabulary's logits out of the runtime.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np

from edgeq.core.errors import RequestError

MAX_SEED = 2**32 - 1                    # llama.cpp's seeds are uint32


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The neutral value of each setting turns its step off."""

    temperature: float = 0.0            # 0: greedy (the most likely token, after the penalties and the bias)
    top_k: int = 0                      # keep the k most likely tokens (0: all)
    top_p: float = 1.0                  # keep the smallest set whose probability reaches p (1: all)
    min_p: float = 0.0                  # keep tokens at least min_p times as likely as the most likely (0: all)
    repeat_penalty: float = 1.0         # divide positive logits (multiply negative ones) of recent tokens (1: off)
    repeat_last_n: int = 64             # how many recent tokens the penalties look at (llama.cpp's default)
    frequency_penalty: float = 0.0      # subtract this times each recent token's count
    presence_penalty: float = 0.0       # subtract this once from each recent token
    logit_bias: Mapping[int, float] = field(default_factory=dict)   # token id -> added to its logit
    seed: int = 0

    def check(self, n_vocab: int) -> "SamplingParams":
        """Refuse values that have no meaning (one line naming the setting), before any work is done."""
        def bad(name: str, why: str):
            raise RequestError(f"{name} {getattr(self, name)!r} {why}", param=name)

        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "is not a finite number")
        for name in ("top_k", "repeat_last_n", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "is not an integer")
        if self.temperature < 0:
            bad("temperature", "is negative")
        if not 0 < self.top_p <= 1:
            bad("top_p", "is not in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "is not in [0, 1]")
        if self.top_k < 0:
            bad("top_k", "is negative")
        if self.repeat_penalty <= 0:
            bad("repeat_penalty", "is not positive")
        if self.repeat_last_n < 0:
            bad("repeat_last_n", "is negative")
        if not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"is not in [0, {MAX_SEED}]")
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < n_vocab:
                raise RequestError(f"logit_bias names token {tok!r}, not an id below {n_vocab}", param="logit_bias")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
                raise RequestError(f"logit_bias of token {tok} is not a number", param="logit_bias")
        return self

    @property
    def penalised(self) -> bool:
        return self.repeat_last_n > 0 and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                           or self.presence_penalty != 0.0)


class Sampler(Protocol):
    """What the decode loop needs of a sampler (edgeq's, or a runtime's own)."""

    needs_logits: bool
    """Whether `sample` reads the logits it is given (False: it reads them inside the runtime, given None)."""

    def accept(self, token: int) -> None:
        """Record a token of the sequence (prompt or generated) for the penalties."""

    def sample(self, logits: np.ndarray | None) -> int:
        """The next token from the last position's logits; it is accepted too."""


class NumpySampler:
    """edgeq's sampler, for backends whose runtime has none (onnxruntime, TVM): llama.cpp's steps in numpy."""

    needs_logits = True

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(maxlen=max(params.repeat_last_n, 1))
        bias = sorted(params.logit_bias.items())
        self.bias_ids = np.array([t for t, _ in bias], dtype=np.int64)
        self.bias = np.array([b for _, b in bias], dtype=np.float64)

    def accept(self, token: int) -> None:
        self.recent.append(int(token))

    def sample(self, logits: np.ndarray) -> int:
        tok = self._choose(np.asarray(logits))
        self.accept(tok)
        return tok

    def _choose(self, logits: np.ndarray) -> int:
        p = self.params
        z = logits.astype(np.float64)          # a copy: the backend's array is left alone
        if self.bias_ids.size:
            z[self.bias_ids] += self.bias
        if p.penalised and self.recent:
            self._penalise(z)
        if p.temperature <= 0:
            return int(np.argmax(z))
        ids = np.arange(z.size)
        if 0 < p.top_k < z.size:               # exactly k, as llama.cpp keeps them
            keep = np.argpartition(-z, p.top_k - 1)[:p.top_k]
            ids, z = ids[keep], z[keep]
        order = np.argsort(-z, kind="stable")   # most likely first, as llama.cpp's softmax step sorts them
        ids, z = ids[order], z[order]
        if p.top_p < 1.0:
            probs = _softmax(z)
            n = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1    # the first prefix reaching p
            ids, z = ids[:n], z[:n]
        if p.min_p > 0.0:
            n = max(1, int(np.count_nonzero(z >= z[0] + math.log(p.min_p))))
            ids, z = ids[:n], z[:n]
        probs = _softmax(z / p.temperature)
        return int(ids[self.rng.choice(ids.size, p=probs)])

    def _penalise(self, z: np.ndarray) -> None:
        """llama.cpp's penalties: repeat divides a positive logit and multiplies a negative one; frequency and
        presence subtract."""
        p = self.params
        counts = Counter(self.recent)
        toks = np.fromiter(counts, dtype=np.int64)
        n = np.fromiter(counts.values(), dtype=np.float64)
        v = z[toks]
        v = np.where(v <= 0, v * p.repeat_penalty, v / p.repeat_penalty)
        z[toks] = v - n * p.frequency_penalty - p.presence_penalty


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()

