"""legalize: make every decision writable by the backend, the way its runtime would.

A type a tensor's shape cannot carry falls back (llama.cpp's own fallback
table for GGUF), and the plan records both the requested and the written
format with the reason, so a plan never silently lies about what shipped.
"""

from __future__ import annotations

from dataclasses import replace

from edgeq.errors import EdgeqError
from edgeq.formats import get_format
from edgeq.ir import Graph
from edgeq.passes.base import Context, Pass
from edgeq.plan import Plan


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
            if ctx.backend == "gguf":
                from edgeq.targets.gguf.presets import fallback_type

                written, why = fallback_type(fmt.name, t.shape[-1])
                if written != fmt.name:
                    fallbacks += 1
                    d = replace(d, format=written, requested=d.requested or fmt.name,
                                reason=f"{d.reason}; {why}" if d.reason else why)
            elif not fmt.can_carry(t.shape):
                raise EdgeqError(None, f"format {fmt.name} cannot carry {name} of shape {t.shape}")
            tensors[name] = d
        ctx.record(self.name, fallbacks=fallbacks)
        return graph, replace(plan, tensors=tensors)
