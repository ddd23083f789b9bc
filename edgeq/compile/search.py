"""`edgeq search`: the plan of the evolutionary search over MLP widths x formats (passes/search.py), with its
expensive labels measured for real.

An expensive label is a whole configuration built and run: its plan exported as a GGUF bundle (the same pipeline
`edgeq export --plan` runs), loaded in llama.cpp and scored against the float source (KLD over the vocabulary, the
`edgeq eval` convention) on the second half of the calibration text — never the evaluation text, which stays held
out for judging the result. The float reference's logits are computed once per window and reused by every label.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

from edgeq.compile import pipeline
from edgeq.compile.options import ExportOptions
from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.plan import Plan
from edgeq.evaluate.bundle import evaluate_bundle

EVAL_CTX = 256            # tokens per scored window of an expensive label
EVAL_CHUNKS = 2           # windows per expensive label


def kld_evaluator(c: pipeline.Compilation, opts: ExportOptions, work: Path, ctx_tokens: int = EVAL_CTX,
                  chunks: int = EVAL_CHUNKS) -> Callable[[Plan], float]:
    """Plan -> the KLD of its exported model against the float source, in the backend's runtime."""
    text = c.inputs[c.targets[0].name].text.text()
    text_file = work / "labels.txt"
    text_file.write_text(text[len(text) // 2:], encoding="utf-8")
    reference = Executor(c.graph, cache_weights=c.graph.n_params * 4 <= 2 * 2**30)
    memo: dict[tuple[int, ...], object] = {}

    def reference_logits(tokens):
        key = tuple(int(t) for t in tokens)
        if key not in memo:
            memo[key] = reference.logits(tokens)
        return memo[key]

    count = iter(range(1 << 30))

    def evaluate(plan: Plan) -> float:
        i = next(count)
        plan_file, out = work / f"label-{i}.json", work / f"label-{i}"
        plan.save(plan_file)
        label_opts = replace(opts, plan=str(plan_file), out=str(out), force=True, budget_mb=None, bpw=None,
                             latency_ms=None, method="ilp", check=False, reference=False, native=False,
                             latency_profile=None)
        try:
            pipeline.export(label_opts)
            res = evaluate_bundle(out, text_file=str(text_file), ctx=ctx_tokens, chunks=chunks, record=False,
                                  pareto=False, reference_logits=reference_logits, threads=1)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            plan_file.unlink(missing_ok=True)
        return float(res["kld_mean"])

    return evaluate


def search(opts: ExportOptions, progress: Callable | None = None,
           log: Callable[[str], None] | None = None) -> Plan:
    """The searched plan for `opts` (a latency and/or byte budget, method "search")."""
    if not opts.budgeted:
        raise EdgeqError(None, "edgeq search needs a budget: --latency-ms (with --latency-profile) and/or --budget-mb")
    opts = replace(opts, method="search")
    c = pipeline.prepare(opts, progress, None, several_allowed=False, log=log)
    with tempfile.TemporaryDirectory(prefix="edgeq-search-") as tmp:
        if opts.search.expensive_labels or opts.search.finalists:
            c.inputs[c.targets[0].name].evaluate = kld_evaluator(c, opts, Path(tmp))
        return pipeline.decide_all(c, opts, branches=False)[c.targets[0].name].plan
