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

`edgeq profile --backend onnx --model-kind cnn` fits the same table on a latency profile (profile.py) whose
micro-models are the supernet's subnets exported through the pipeline and timed on the device by the runner
(`profile_table`); a CNN plan (its graph's layers, predictor/workload.CnnWorkload) is priced by matching its layers
to the supernet's by weight name (`workload_features`), so a CNN that is not a subnet of that supernet is refused.
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
from edgeq.predictor.workload import CnnWorkload

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
    return layer_features([l.macs(widths) if l.present(widths) else 0 for l in layers], formats,
                          [l.present(widths) for l in layers], n_quantized,
                          [bool(widths[d]) for d in depth_stages(layers)])


def layer_features(macs: list[int], formats: list[str] | tuple[str, ...], present: list[bool], n_quantized: int,
                   stages_run: list[bool]) -> np.ndarray:
    """`features` from each layer's MACs, format and presence and whether each depth stage runs: what a CNN's
    graph and plan say directly (predictor/workload.py's CnnWorkload), so a subnet exported through the pipeline is
    priced by the same table as the search's points."""
    out = [1.0]
    for m, f, on in zip(macs, formats, present):
        m = m / 1e6 if on else 0.0
        q = f == "int8"
        one = 1.0 if on else 0.0
        out += [m if q else 0.0, 0.0 if q else m, one if q else 0.0, 0.0 if q else one]
    any_int8 = any(f == "int8" and on for f, on in zip(formats, present))
    return np.array(out + [float(n_quantized), float(any_int8)] + [1.0 if r else 0.0 for r in stages_run])


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


def workload_features(layers: list[StageLayer], w: CnnWorkload, supernet: str = "the supernet", source=None) \
        -> np.ndarray:
    """`features` of a CNN plan whose layers are a subnet of `layers` (matched by weight name; a layer the plan
    lacks is skipped, and a depth stage runs when any of its layers does)."""
    by = {l.weight: l for l in w.layers}
    unknown = [n for n in by if n not in {l.weight for l in layers}]
    if unknown:
        raise EdgeqError(source, f"this CNN's layer {unknown[0]} is not a layer of {supernet} ("
                                 f"{', '.join(l.weight for l in layers)}): the latency profile's table prices that "
                                 f"supernet's subnets only")
    present = [l.weight in by for l in layers]
    runs = [any(p for l, p in zip(layers, present) if l.depth_stage == d) for d in depth_stages(layers)]
    return layer_features([by[l.weight].macs if p else 0 for l, p in zip(layers, present)],
                          [by[l.weight].format if p else "f32" for l, p in zip(layers, present)], present,
                          w.n_quantized, runs)


@dataclass
class ProfileTable:
    """A CNN latency profile, fitted: the table, the supernet's layers and a peak-memory base."""

    table: CnnLatencyTable
    layers: list[StageLayer]
    memory_base_bytes: int                  # the runner's peak less the model files, median over micro-models

    def predict_ms(self, w: CnnWorkload) -> float:
        return self.table.predict(workload_features(self.layers, w, f"supernet {self.table.supernet}"))

    def peak_bytes(self, w: CnnWorkload) -> int:
        return int(self.memory_base_bytes + w.file_bytes)


def supernet_record(sn) -> dict[str, Any]:
    """What a CNN profile keeps of its supernet: enough to rebuild `features` without it."""
    return {"name": sn.name, "full": [int(v) for v in sn.full], "layers": [asdict(l) for l in sn.layers]}


def profile_table(profile) -> ProfileTable:
    """Fit the per-layer table on a CNN latency profile's micro-models (one call of one image each: the median over
    rounds of each round's median), with its leave-one-out error (each micro-model predicted by the table fitted
    on the others)."""
    from scipy.optimize import nnls

    sup = profile.settings.get("supernet") if isinstance(profile.settings, dict) else None
    if not isinstance(sup, dict) or not isinstance(sup.get("layers"), list):
        raise EdgeqError(None, "the CNN latency profile does not name its supernet (settings.supernet)")
    try:
        layers = [StageLayer(**d) for d in sup["layers"]]
    except TypeError as exc:
        raise EdgeqError(None, f"the CNN latency profile's supernet layers are unreadable ({exc})") from None
    runs = [r for r in profile.models if r.prefill_ms.get("1")]
    if len(runs) < 3:
        raise EdgeqError(None, "the CNN latency profile holds fewer than 3 timed subnets")
    name = f"supernet {sup.get('name')}"
    x = np.array([workload_features(layers, r.workload, name) for r in runs])
    y = np.array([float(np.median(r.prefill_ms["1"])) for r in runs])
    device = {"cpu": profile.device.get("cpu"), "onnxruntime": profile.runtime_version, "threads": profile.threads,
              "clock": profile.clock}
    table = CnnLatencyTable.fitted(str(sup.get("name")), list(sup.get("full") or []), [l.weight for l in layers], x,
                                   y, device)
    loo = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        c, _ = nnls(x[keep], y[keep])
        loo.append(abs(float(x[i] @ c) / y[i] - 1))
    table.fit.update(leave_one_out_mean_abs_rel_error=round(float(np.mean(loo)), 4),
                     leave_one_out_share_within_10pct=round(float(np.mean(np.array(loo) <= 0.10)), 4))
    mem = [float(np.median(r.peak_rss_bytes)) - r.workload.file_bytes for r in runs
           if r.peak_rss_bytes and min(r.peak_rss_bytes) > 0]
    return ProfileTable(table, layers, int(np.median(mem)) if mem else 0)
