"""What every pass shares: a name, declared options, and a record of what it did.

The context collects each pass's record so the report can explain every
choice; passes never print (a warning goes to `Context.warn`, which the caller
may show).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from edgeq.core.ir import Graph
from edgeq.core.plan import Plan


@dataclass
class Context:
    backend: str
    profile: Any = None
    progress: Callable | None = None             # tqdm-like wrapper, or None when quiet
    records: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)   # what analysis passes computed (calibration, costs)
    log: Callable[[str], None] | None = None     # where warnings are shown (the CLI: stderr), or None
    warnings: list[str] = field(default_factory=list)

    def record(self, pass_name: str, **what: Any) -> None:
        self.records.append({"pass": pass_name, **what})

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            if self.log is not None:
                self.log(f"edgeq: {message}")


class Pass:
    """Subclasses set `name` and implement `run`; options are constructor arguments with defaults."""

    name: str = "pass"

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        raise NotImplementedError


def run_passes(passes: list[Pass], graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
    for p in passes:
        t0 = time.perf_counter()
        graph, plan = p.run(graph, plan, ctx)
        ctx.timings[f"pass.{p.name}"] = round(time.perf_counter() - t0, 3)
    return graph, plan
