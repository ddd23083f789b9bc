"""What `bytes` means for a backend: the size model the planner and every backend's writer agree on.

A budget is in bytes of the files written, so the planner needs, per decision, what it adds to the files;
only the backend knows that (alignment, headers, protobuf framing, a built library). Each target builds a
`FileLayout` (targets/<backend>/layout.py) and hands it to the sensitivity and allocate passes as data:
the passes never import a target, and a target never imports a pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format
from edgeq.core.ir import Graph


def zero_weights(graph: Graph) -> Graph:
    """The graph with zero matrices, for size models that run the real lowering: sizes (and TVM's kernels) do
    not depend on values, and no source weight is read."""
    zeros = {n: replace(t, load=functools.partial(np.zeros, t.shape, np.float32)) if len(t.shape) == 2 else t
             for n, t in graph.weights.items()}
    return replace(graph, weights=zeros)


@dataclass
class FileLayout:
    """What `bytes` means for one backend: what each decision adds to the files it writes.

    One per backend (targets/<backend>/layout.py), so that candidates, costs and budgets follow one code path
    whatever the backend. `exact_bytes`, where a backend's sizes are not exactly additive (ONNX node names),
    gives the true size of a whole plan's files; the allocator then checks its plan against it.
    """

    backend: str
    overhead: int                                        # bytes no decision changes (headers, 1-D tensors, graph)
    tensor_bytes: Callable[[str, tuple, Format], int]    # (weight, shape, format) -> bytes in the files
    branch_bytes: Callable[[str, tuple, int], int]       # (weight, shape, rank) -> bytes of a rank-r branch
    branch_overhead: int = 0                             # spent once when any branch is chosen (GGUF: adapter file)
    key: str = ""                                        # identifies the size model in cache keys
    exact_bytes: Callable[[Any], int] | None = None      # plan -> bytes of all its model files

    @classmethod
    def from_tables(cls, backend: str, overhead: int, table: dict[tuple[str, str], int],
                    branch_table: dict[tuple[str, int], int], key: str,
                    exact_bytes: Callable[[Any], int] | None = None) -> "FileLayout":
        """A layout whose per-tensor bytes were sized ahead, per (weight, format) and (weight, rank), by running
        the backend's real lowering (ONNX, TVM): asking for anything else is a sizing bug, said as such."""

        def tensor_bytes(name: str, shape: tuple, fmt: Format) -> int:
            if (name, fmt.name) not in table:
                raise EdgeqError(None, f"format {fmt.name} was not sized for {name} {tuple(shape)}")
            return table[(name, fmt.name)]

        def branch_bytes(name: str, shape: tuple, rank: int) -> int:
            if (name, rank) not in branch_table:
                raise EdgeqError(None, f"no rank-{rank} branch was sized for {name}")
            return branch_table[(name, rank)]

        return cls(backend, overhead, tensor_bytes, branch_bytes, key=key, exact_bytes=exact_bytes)
