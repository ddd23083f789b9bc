"""SHiRA sparse adapters (PEFT's `peft_type: SHIRA`): a few of the base weights themselves changed.

A SHiRA folder is PEFT's: adapter_config.json and adapter_model.safetensors holding, per targeted module,
`<module>.shira_indices` (2, nnz) integer (row, column) pairs and `<module>.shira_weight` (nnz,) values; the
delta is the sparse (out, in) matrix with those entries (repeated pairs add, as torch.sparse_coo_tensor does),
times PEFT's scaling (1 unless set at inference) and the adapter's weight. Every count is bounded by the
weight's size and every index by its shape before anything is allocated or applied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.importers.safetensors_io import FLOAT_DTYPES, SafetensorsFile, STensor

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>shira_indices|shira_weight)(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?$")


def is_sparse(config: dict[str, Any]) -> bool:
    return str(config.get("peft_type", "")).upper() == "SHIRA"


@dataclass
class SparseModule:
    """One module's sparse delta: PEFT's names, the canonical weight it changes, where its entries are."""

    module: str
    target: str
    indices: STensor
    values: STensor
    shape: tuple[int, int]       # the weight's (out, in)
    embedding: bool = False
    r: int = 0

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, values) as int64, int64, float32; indices checked against the weight's shape."""
        idx = self.indices.load_ints()
        vals = self.values.load()
        rows, cols = idx[0], idx[1]
        if rows.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= self.shape[0]
                          or cols.max() >= self.shape[1]):
            raise EdgeqError(self.indices.path, f"{self.module}: SHiRA indices outside the weight's shape "
                                                f"{self.shape}")
        return rows, cols, vals.astype(np.float32)

    def add_rows(self, block: np.ndarray, r0: int, r1: int, scale: float) -> None:
        """Add scale·delta to `block`, rows r0..r1 of the weight."""
        rows, cols, vals = self.entries()
        keep = (rows >= r0) & (rows < r1)
        np.add.at(block, (rows[keep] - r0, cols[keep]), vals[keep] * np.float32(scale))


def sparse_modules(folder: Path, config: dict[str, Any], graph: Graph, modules: dict[str, tuple[str, bool]],
                   targeted: list[str], base_hint: str) -> tuple[list[SparseModule], dict[str, STensor]]:
    """The folder's sparse deltas, each checked against the base weight it changes, and the full base weights
    PEFT saved beside them (it does when the head is targeted), by the weight they stand for."""
    wpath = folder / "adapter_model.safetensors"
    st = SafetensorsFile(wpath)
    parts: dict[str, dict[str, STensor]] = {}
    base_layers: dict[str, STensor] = {}
    for key, t in st.tensors.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        if name.endswith(".base_layer.weight") and name[:-len(".base_layer.weight")] in modules:
            target = modules[name[:-len(".base_layer.weight")]][0]
            if t.shape != graph.weights[target].shape or t.dtype not in FLOAT_DTYPES:
                raise EdgeqError(wpath, f"{key} has shape {t.shape} {t.dtype}, the base weight {target} "
                                        f"{graph.weights[target].shape}{base_hint}")
            base_layers[target] = t
            continue
        m = _KEY.match(name)
        if m is None:
            raise EdgeqError(wpath, f"unexpected tensor {key} in a SHiRA adapter")
        module, kind = m.group("module"), m.group("kind")
        if module not in modules:
            raise EdgeqError(wpath, f"has SHiRA weights for {module}, which the base model does not have{base_hint}")
        if module not in targeted:
            raise EdgeqError(wpath, f"has SHiRA weights for {module}, which adapter_config.json's target_modules "
                                    "does not select")
        if kind in parts.setdefault(module, {}):
            raise EdgeqError(wpath, f"two {kind} tensors for {module} (several adapters in one file?)")
        parts[module][kind] = t
    out = []
    for module in targeted:
        got = parts.get(module) or {}
        if "shira_indices" not in got or "shira_weight" not in got:
            raise EdgeqError(wpath, f"has no shira_indices and shira_weight for {module}, which adapter_config.json "
                                    "targets")
        target, is_emb = modules[module]
        if is_emb:
            raise EdgeqError(wpath, f"a SHiRA delta on {module} (an embedding) is not supported")
        shape = graph.weights[target].shape
        idx, val = got["shira_indices"], got["shira_weight"]
        if val.dtype not in FLOAT_DTYPES or len(val.shape) != 1:
            raise EdgeqError(wpath, f"{module}.shira_weight must be a float vector, not {val.dtype} {val.shape}")
        if len(idx.shape) != 2 or idx.shape != (2, val.shape[0]):
            raise EdgeqError(wpath, f"{module}.shira_indices has shape {idx.shape}; expected (2, {val.shape[0]})")
        if val.shape[0] > shape[0] * shape[1]:
            raise EdgeqError(wpath, f"{module}: {val.shape[0]} SHiRA entries for a weight of {shape[0] * shape[1]}")
        out.append(SparseModule(module, target, idx, val, (int(shape[0]), int(shape[1])),
                                r=int(config.get("r") or 0)))
    return out, base_layers
