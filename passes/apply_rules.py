"""apply_rules: a user's plan (glob rules, then explicit tensors) over whatever the plan holds."""

from __future__ import annotations

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan, TensorPlan
from edgeq.passes.base import Context, Pass


class ApplyRules(Pass):
    name = "apply_rules"

    def __init__(self, user: Plan, source: str | None = None):
        self.user = user
        self.source = source

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        tensors = dict(plan.tensors)
        by_alias = {t.alias: n for n, t in graph.weights.items() if t.alias}
        changed = 0
        for rule in self.user.rules:
            hit = 0
            for name, t in graph.weights.items():
                if len(t.shape) > 1 and rule.matches(name, t.alias):
                    tensors[name] = TensorPlan(format=rule.format, reason=f"plan rule {rule.match!r}")
                    hit += 1
            if hit == 0:
                raise EdgeqError(self.source, f"plan rule {rule.match!r} matches no 2-D tensor")
            changed += hit
        for name, decision in self.user.tensors.items():
            canonical = name if name in graph.weights else by_alias.get(name)
            if canonical is None:
                raise EdgeqError(self.source, f"plan names tensor {name!r}, which the model does not have")
            tensors[canonical] = decision
            changed += 1
        missing = [n for n in graph.weights if n not in tensors]
        if missing:
            raise EdgeqError(self.source, f"plan decides nothing for {missing[0]} (add a rule or a preset)")
        out = Plan(tensors=tensors, preset=plan.preset, backend=ctx.backend, rules=self.user.rules,
                   pruning=self.user.pruning or plan.pruning, search=self.user.search or plan.search,
                   calibration=plan.calibration or self.user.calibration,
                   activations=self.user.activations if self.user.activations is not None else plan.activations)
        ctx.record(self.name, rules=len(self.user.rules), explicit=len(self.user.tensors), changed=changed)
        return graph, out
