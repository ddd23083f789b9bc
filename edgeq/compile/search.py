"""`edgeq search`: the plan of the evolutionary search over MLP widths x formats (passes/search.py), with its
expensive labels measured for real where the user says (search_labels.py: this process, or a Ray cluster)."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

from edgeq.compile import pipeline
from edgeq.compile.decide import gptq_on
from edgeq.compile.options import ExportOptions
from edgeq.compile.search_labels import InProcess, RayCluster, kld_evaluator, label_options
from edgeq.core.errors import EdgeqError
from edgeq.core.plan import Plan

def search(opts: ExportOptions, progress: Callable | None = None, log: Callable[[str], None] | None = None,
           ray: str | None = None) -> Plan:
    """The searched plan for `opts` (a latency and/or byte budget, method "search"); `ray`: measure the expensive
    labels as tasks on the Ray cluster at that address ("local": a new local instance)."""
    if not opts.budgeted:
        raise EdgeqError(None, "edgeq search needs a budget: --latency-ms (with --latency-profile) and/or --budget-mb")
    opts = replace(opts, method="search")
    c = pipeline.prepare(opts, progress, None, several_allowed=False, log=log)
    # decided once here, so the labels are written as the searched plan will be (compensated or not)
    opts = replace(opts, gptq=gptq_on(c.graph, c.inputs[c.targets[0].name], opts))
    measuring = opts.search.expensive_labels or opts.search.finalists
    with tempfile.TemporaryDirectory(prefix="edgeq-search-") as tmp:
        executor = None
        if measuring:
            executor = RayCluster(ray, label_options(opts)) if ray else InProcess(kld_evaluator(c, opts, Path(tmp)))
            c.inputs[c.targets[0].name].measure = executor.map
        try:
            return pipeline.decide_all(c, opts, branches=False)[c.targets[0].name].plan
        finally:
            if executor is not None:
                executor.close()
