"""assign_preset: fill the plan from a named preset, with the backend's own meaning of it.

For GGUF a preset means exactly what llama.cpp's quantize means by it (same
per-tensor mix, same shape fallbacks), so edgeq's presets compare one to one
with llama.cpp's files.
"""

from __future__ import annotations

from edgeq.errors import EdgeqError
from edgeq.ir import Graph
from edgeq.passes.base import Context, Pass
from edgeq.plan import Plan, TensorPlan


class AssignPreset(Pass):
    name = "assign_preset"

    def __init__(self, preset: str, has_imatrix: bool = False):
        self.preset = preset.lower()
        self.has_imatrix = has_imatrix   # llama.cpp picks a few types differently with an importance matrix

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        if ctx.backend in ("onnx", "tvm"):
            return self._onnx(graph, plan, ctx)
        if ctx.backend != "gguf":
            raise EdgeqError(None, f"--quant presets for backend {ctx.backend!r} are not available yet")
        from edgeq.models import llama
        from edgeq.targets.gguf.presets import TensorInfo, preset_types

        cfg = graph.config
        infos = [TensorInfo(t.alias or llama.gguf_name(n), tuple(reversed(t.shape))) for n, t in graph.weights.items()]
        choices = preset_types(self.preset, infos, cfg.n_heads, cfg.n_kv_heads, has_imatrix=self.has_imatrix)
        tensors = {}
        for (name, _), info in zip(graph.weights.items(), infos):
            c = choices[info.name]
            tensors[name] = TensorPlan(format=c.type, reason=c.reason, requested=c.requested)
        plan = Plan(tensors=tensors, preset=self.preset, backend=ctx.backend, rules=plan.rules, pruning=plan.pruning,
                    search=plan.search, calibration=plan.calibration)
        ctx.record(self.name, preset=self.preset, imatrix=self.has_imatrix, formats=plan.format_counts(),
                   fallbacks=sum(1 for t in tensors.values() if t.requested))
        return graph, plan

    def _onnx(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        """ONNX and TVM: each target's presets module says what a preset means there."""
        if ctx.backend == "tvm":
            from edgeq.targets.tvm.presets import preset_formats
        else:
            from edgeq.targets.onnx.presets import preset_formats

        plan = Plan(tensors=preset_formats(graph, self.preset), preset=self.preset, backend=ctx.backend, rules=plan.rules,
                    pruning=plan.pruning)
        ctx.record(self.name, preset=self.preset, formats=plan.format_counts(), fallbacks=0)
        return graph, plan


def preset_plan(graph: Graph, preset: str, user_plan: Plan | None, plan_path: str | None, ctx: Context) -> Plan:
    """A preset, then the user's rules, then legalize: the plan of an ONNX or TVM preset export (calibration,
    where a format needs one, follows in the caller)."""
    from edgeq.passes import run_passes
    from edgeq.passes.apply_rules import ApplyRules
    from edgeq.passes.legalize import Legalize

    passes: list[Pass] = [AssignPreset(preset)]
    if user_plan is not None:
        passes.append(ApplyRules(user_plan, plan_path))
    passes.append(Legalize())
    return run_passes(passes, graph, Plan(), ctx)[1]
