"""The edgeq IR: a small typed graph plus lazily loaded weights.

Passes and targets share this one representation, so that a decision made
by a pass (a format, a width, a permutation) is expressed once, against
canonical tensor names, and every backend lowers the same thing.
Weights are loaded on demand (memory-mapped files behind a closure) so a
model larger than half the RAM can stream through export one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import EdgeqError


@dataclass
class Tensor:
    """A constant: canonical (Hugging Face) name, logical shape in numpy order, lazy float data."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray] = field(repr=False)
    alias: str | None = None          # the GGUF name, when the tensor has one
    source_format: str = "f32"        # the format it was stored in by the source model
    # the stored bytes, in the target file's layout, when a GGUF source holds the tensor in `source_format`: a
    # plan that keeps that format writes them unchanged instead of a dequantize/quantize round trip. None once
    # anything changes the weights (a merged adapter).
    source_bytes: Callable[[], np.ndarray] | None = field(default=None, repr=False)

    def numpy(self) -> np.ndarray:
        """Float32 data in canonical layout; loaded afresh on each call (callers cache if they need to)."""
        arr = np.asarray(self.load(), dtype=np.float32)
        if tuple(arr.shape) != self.shape:
            raise ValueError(f"tensor {self.name}: loader gave shape {arr.shape}, expected {self.shape}")
        return arr

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class Value:
    """A runtime value flowing between nodes; dims may be symbolic (strings such as 'seq')."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "f32"


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """A model: its family, its config, the node list in execution order and its weights.

    `weights` preserves insertion order, which importers make canonical (embedding,
    layers in order, final norm, head) so that everything derived from a graph is
    deterministic.
    """

    arch: str
    kind: str                      # "decoder" | "encoder" | "cnn"
    config: Any
    inputs: list[Value]
    outputs: list[Value]
    nodes: list[Node]
    weights: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.weights.values())

    def weight(self, name: str) -> Tensor:
        return self.weights[name]


def checked_weights(expected: dict[str, tuple[int, ...]], weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights a family's config implies, in the family's canonical order, each with the implied shape."""
    for name, shape in expected.items():
        if name not in weights:
            raise EdgeqError(None, f"model is missing tensor {name}")
        if tuple(weights[name].shape) != shape:
            raise EdgeqError(None, f"tensor {name} has shape {weights[name].shape}, config implies {shape}")
    return {n: weights[n] for n in expected}
