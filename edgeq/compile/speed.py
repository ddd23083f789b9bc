"""A budgeted plan's speed beside the preset of the same bytes, measured in the backend's runtime.

A plan bought with bytes can cost speed (mixed formats per layer, formats whose kernels are slower or that a
runtime does not repack). Until the latency predictor plans for it, an export measures it: the preset whose
weights take the bytes closest to the plan's is written with the same importance matrix into a scratch
folder and both are timed side by side.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.targets.base import LowerRequest, Target

FLOAT_PRESETS = ("f32", "f16", "bf16")


def weight_bytes(graph: Graph, plan: Plan) -> int:
    return sum(get_format(plan.tensors[n].format).nbytes(t.shape) for n, t in graph.weights.items())


def nearest_preset(graph: Graph, target: Target, plan: Plan, calibrated: bool) -> tuple[str, Plan] | None:
    """The quantized preset whose weights take the bytes closest to the plan's, with its plan."""
    want = weight_bytes(graph, plan)
    best = None
    for preset in target.presets:
        if preset in FLOAT_PRESETS:
            continue
        tensors = target.preset_formats(graph, preset, calibrated)
        if not calibrated and any(get_format(t.format).requires_imatrix for t in tensors.values()):
            continue
        p = Plan(tensors=tensors, preset=preset, backend=target.name)
        gap = abs(weight_bytes(graph, p) - want)
        if best is None or gap < best[0]:
            best = (gap, preset, p)
    return None if best is None else (best[1], best[2])


def speed_beside_preset(graph: Graph, target: Target, plan: Plan, model_file: Path, profile, calibration, spec,
                        threads: int = 1) -> dict[str, Any] | None:
    """{threads, plan: {...}, preset: {name, ...}} in tokens/s, or None where the target does not measure."""
    if not target.measures_speed:
        return None
    near = nearest_preset(graph, target, plan, calibration is not None)
    if near is None:
        return None
    name, preset_plan = near
    with tempfile.TemporaryDirectory(prefix="edgeq-speed-") as d:
        lowered = target.lower(LowerRequest(graph, preset_plan, Path(d), profile, spec=spec,
                                            imatrix=calibration.imatrix() if calibration is not None else None))
        preset_file = next(a.path for a in lowered.artifacts if a.role == "model")
        timed = target.compare_speed({"plan": model_file, name: preset_file}, threads)
        preset_bytes = preset_file.stat().st_size
    return {"threads": threads, "runtime": target.name, "plan": {**timed["plan"], "bytes": model_file.stat().st_size},
            "preset": {"name": name, **timed[name], "bytes": preset_bytes},
            "decode_ratio": round(timed["plan"]["decode_tps"] / timed[name]["decode_tps"], 3),
            "prefill_ratio": round(timed["plan"]["prefill_tps"] / timed[name]["prefill_tps"], 3)}
