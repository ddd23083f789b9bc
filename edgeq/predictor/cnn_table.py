"""A per-layer latency table of a CNN supernet, fitted on real onnxruntime timings of whole subnets.

Why a table and not a timing per candidate: the search must be deterministic (same seed and inputs, same plan)
and a shared machine's timings are not, and an evolution visits hundreds of points. So whole subnets (uniform
widths in both formats, and random mixed points) are built through the compile pipeline's ONNX lowering and timed
for real in onnxruntime (batch 1, the thread count asked, spinning off, all models interleaved round by round,
medians), once; the table is fitted to those medians and saved; the search reads only the table, and its finalists
and the bench are timed for real again.

The table is additive per layer, APQ's lookup table made continuous over widths: latency = a constant + for each
conv/linear, (its format's cost per million multiply-adds x its MACs at these widths + its format's fixed cost per
kernel) + a cost per quantized activation (a Q/DQ pair: onnxruntime fuses most, not all) + a cost for running
int8 at all + a cost per elastic
depth stage that runs (what its skip removes beyond its convs: the residual add). Non-negative least squares (a
cost is never negative). The table's `full` names the supernet's stages (channels, depth, kernels), so a table of
another search space is refused. Its error on timed subnets it was not fitted on is recorded with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.models.cnn import StageLayer

TABLE_VERSION = 4                 # 2: elastic depth (a feature per depth stage); 3: int8's entry cost;
#                                   4: timed on the lowering that flattens int8 convs in NHWC (one kernel fewer)


def depth_stages(layers: list[StageLayer]) -> list[int]:
    """The stages that skip layers (elastic depth), in order."""
    return sorted({l.depth_stage for l in layers if l.depth_stage is not None})


def features(layers: list[StageLayer], widths: tuple[int, ...], formats: tuple[str, ...], n_quantized: int) \
        -> np.ndarray:
    """[1, per layer: int8 MMACs, float MMACs, int8 kernel, float kernel .., quantized activations, 1 if any int8
    layer runs, per depth stage: 1 if its layers run]. A skipped layer's terms are 0 (its MACs and its kernel);
    what a skipped stage takes beyond its convs (the residual add, its requantization) is its depth term. MACs
    follow the elastic kernel size (StageLayer.macs). The any-int8 term is what a model pays once for running int8
    at all (the input's quantization, onnxruntime's NHWC layout transposes): without it the constant carried it
    and the all-float points were over-predicted by 3-7 % on the fitted subnets (leave-one-out error 0.105 ->
    0.094, 0.115 -> 0.107 on two tables of the digits supernet; 0.106 -> 0.112 on a third)."""
    out = [1.0]
    for l, f in zip(layers, formats):
        m = l.macs(widths) / 1e6
        q = f == "int8"
        on = 1.0 if l.present(widths) else 0.0
        out += [m if q else 0.0, 0.0 if q else m, on if q else 0.0, 0.0 if q else on]
    any_int8 = any(f == "int8" and l.present(widths) for l, f in zip(layers, formats))
    return np.array(out + [float(n_quantized), float(any_int8)]
                    + [1.0 if widths[d] else 0.0 for d in depth_stages(layers)])


@dataclass
class CnnLatencyTable:
    """Coefficients (ms) of `features`, what they were measured on, and how well they predict."""

    supernet: str
    full: list[int]
    layers: list[str]
    coef: list[float]
    device: dict[str, Any]                  # CPU flags, onnxruntime version, threads
    fit: dict[str, Any] = field(default_factory=dict)
    version: int = TABLE_VERSION

    def predict(self, x: np.ndarray) -> float:
        return float(np.asarray(x) @ np.asarray(self.coef))

    @classmethod
    def fitted(cls, supernet: str, full: list[int], layers: list[str], x: np.ndarray, y: np.ndarray,
               device: dict[str, Any], held_x: np.ndarray | None = None, held_y: np.ndarray | None = None) \
            -> "CnnLatencyTable":
        from scipy.optimize import nnls

        coef, _ = nnls(np.asarray(x, np.float64), np.asarray(y, np.float64))
        fit = {"samples": int(len(y)), "train_mean_abs_rel_error": _rel(x @ coef, y)}
        if held_x is not None and len(held_y):
            fit.update(held_out=int(len(held_y)), held_out_mean_abs_rel_error=_rel(held_x @ coef, held_y),
                       held_out_max_abs_rel_error=float(np.max(np.abs(held_x @ coef - held_y) / held_y)))
        return cls(supernet, list(full), list(layers), [round(float(c), 9) for c in coef], device, fit)

    def check_for(self, supernet: str, full: list[int], layers: list[str], path) -> None:
        if self.supernet != supernet or list(self.full) != list(full) or list(self.layers) != list(layers):
            raise EdgeqError(path, f"is a latency table of supernet {self.supernet} {self.full}, not of "
                                   f"{supernet} {list(full)}")

    def save(self, path: str | os.PathLike) -> None:
        from edgeq.core.fs import atomic_write_text

        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CnnLatencyTable":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EdgeqError(p, f"cannot read a CNN latency table ({exc})") from None
        if not isinstance(d, dict) or d.get("version") != TABLE_VERSION or not isinstance(d.get("coef"), list):
            raise EdgeqError(p, "is not a CNN latency table (edgeq search --supernet writes one)")
        try:
            t = cls(**{k: d[k] for k in ("supernet", "full", "layers", "coef", "device", "fit", "version")})
        except (KeyError, TypeError):
            raise EdgeqError(p, "is not a CNN latency table (a field is missing)") from None
        if len(t.coef) < 3 + 4 * len(t.layers) or not all(isinstance(c, (int, float)) for c in t.coef):
            raise EdgeqError(p, "CNN latency table: 'coef' does not match its layers")
        return t


def _rel(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y) / y))
