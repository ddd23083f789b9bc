"""Compiler passes: one module per pass, each `run(graph, plan, ctx) -> (graph, plan)`."""

from edgeq.passes.base import Context, Pass, run_passes

__all__ = ["Context", "Pass", "run_passes"]
