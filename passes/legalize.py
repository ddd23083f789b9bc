"""legalize: make every decision writable by the backend, the way its runtime would.

A format a tensor's shape cannot carry falls back along the registry's chain
(llama.cpp's own fallback table for GGUF types), and the plan records both
the requested and the written format with the reason, so a plan never
silently lies about what shipped. A format with no fallback is an error.
"""

from __future__ import annotations

from dataclasses import replace

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format, shape_fallback
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.passes.base import Context, Pass


class Legalize(Pass):
    name = "legalize"

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        tensors = {}
        fallbacks = 0
        for name, t in graph.weights.items():
            d = plan.tensors[name]
            fmt = get_format(d.format)
            if ctx.backend not in fmt.backends:
                raise EdgeqError(None, f"format {fmt.name} (for {name}) is not carried by backend {ctx.backend}")
            if len(t.shape) == 1:
                if fmt.name != "f32":
                    d = replace(d, format="f32", requested=d.format, reason=f"1-D tensors stay f32 (asked {fmt.name})")
                tensors[name] = d
                continue
            if not fmt.can_carry(t.shape):
                if fmt.fallback is None:
                    raise EdgeqError(None, f"format {fmt.name} cannot carry {name} of shape {t.shape}")
                written, why = shape_fallback(fmt.name, t.shape[-1])      # as the runtime demotes it
                fallbacks += 1
                d = replace(d, format=written, requested=d.requested or fmt.name,
                            reason=f"{d.reason}; {why}" if d.reason else why)
            tensors[name] = d
        ctx.record(self.name, fallbacks=fallbacks)
        return graph, replace(plan, tensors=tensors)
