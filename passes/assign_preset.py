"""assign_preset: fill the plan from a named preset, with the backend's own meaning of it.

What a preset means is the target's knowledge (for GGUF exactly what llama.cpp's quantize means: the same
per-tensor mix and shape fallbacks, so edgeq's presets compare one to one with llama.cpp's files). The
pass receives it as data: a function from (graph, preset, whether an importance matrix was computed) to a
decision per tensor.
"""

from __future__ import annotations

from typing import Callable

from edgeq.core.ir import Graph
from edgeq.core.plan import Plan, PresetTensors
from edgeq.passes.base import Context, Pass


class AssignPreset(Pass):
    name = "assign_preset"

    def __init__(self, preset: str, resolve: Callable[[Graph, str, bool], PresetTensors]):
        self.preset = preset.lower()
        self.resolve = resolve

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        # llama.cpp picks a few types differently when an importance matrix is given
        choice = self.resolve(graph, self.preset, "calibration" in ctx.analysis)
        plan = Plan(tensors=choice.tensors, preset=self.preset, backend=ctx.backend, rules=plan.rules,
                    pruning=plan.pruning, search=plan.search, calibration=plan.calibration)
        ctx.record(self.name, **choice.record)
        return graph, plan
