"""The search's expensive labels, and where they are measured: one interface, in this process by default, on a Ray
cluster with `edgeq search --ray ADDRESS` (Ray is the scheduler; edgeq writes none of its own).

An expensive label is a whole configuration built and run: its plan exported as a GGUF bundle (the same pipeline
`edgeq export --plan` runs), loaded in llama.cpp and scored against the float source (KLD over the vocabulary, the
`edgeq eval` convention) on the second half of the calibration text — never the evaluation text, which stays held
out for judging the result. The float reference's logits are computed once per window and reused by every label. On Ray each task gets
the export options and the plan as plain data; a worker process imports the model and builds its evaluator once,
then reuses it for every label it is given (the float reference's logits included). Results come back in the order
the plans were given, whatever order they finish in, so a search is as deterministic on a cluster as here.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edgeq.compile import pipeline
from edgeq.compile.options import ExportOptions
from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.plan import Plan, plan_from_json
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
        label_opts = replace(label_options(opts), plan=str(plan_file), out=str(out))
        try:
            pipeline.export(label_opts)
            res = evaluate_bundle(out, text_file=str(text_file), ctx=ctx_tokens, chunks=chunks, record=False,
                                  pareto=False, reference_logits=reference_logits, threads=1)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            plan_file.unlink(missing_ok=True)
        return float(res["kld_mean"])

    return evaluate


def label_options(opts: ExportOptions) -> ExportOptions:
    """The options an expensive label's export runs with (its plan file and folder are set per label). GPTQ writes a
    label from the calibration's windows, not the final export's larger default: a label ranks plans, and each of the
    search's labels would otherwise pay the writer's longer pass."""
    return replace(opts, force=True, budget_mb=None, bpw=None, latency_ms=None, method="ilp", check=False,
                   reference=False, native=False, latency_profile=None,
                   gptq_windows=opts.gptq_windows if opts.gptq_windows is not None else opts.windows())


class InProcess:
    """Labels measured one after another in this process."""

    name = "in-process"

    def __init__(self, evaluate: Callable[[Plan], float]):
        self.evaluate = evaluate

    def map(self, plans: list[Plan], progress: Callable | None = None, desc: str = "labels") -> list[float]:
        it = plans if progress is None else progress(plans, desc=desc, unit="config")
        return [self.evaluate(p) for p in it]

    def close(self) -> None:
        pass


_WORKER: dict[str, Any] = {}


def _worker_label(opts: ExportOptions, plan: dict[str, Any]) -> float:
    """A Ray task: this worker's evaluator for `opts` (built on first use), applied to one plan."""
    key = repr(opts)
    if _WORKER.get("key") != key:
        work = Path(tempfile.mkdtemp(prefix="edgeq-search-ray-"))
        c = pipeline.prepare(opts, None, None, several_allowed=False)
        _WORKER.update(key=key, evaluate=kld_evaluator(c, opts, work), work=work)
    return _WORKER["evaluate"](plan_from_json(plan))


class RayCluster:
    """Labels measured as Ray tasks (one CPU each) on the cluster at `address` ("local": a new local instance)."""

    name = "ray"

    def __init__(self, address: str, opts: ExportOptions):
        try:
            import ray
        except ImportError:
            raise EdgeqError(None, "--ray needs Ray: pip install 'edgeq[ray]'") from None
        self.ray = ray
        self.opts = opts
        try:
            ray.init(address=None if address == "local" else address, ignore_reinit_error=True,
                     log_to_driver=False, include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EdgeqError(None, f"--ray {address}: cannot connect ({str(exc).splitlines()[0]})") from None
        self.task = ray.remote(num_cpus=1)(_worker_label)

    def map(self, plans: list[Plan], progress: Callable | None = None, desc: str = "labels") -> list[float]:
        refs = [self.task.remote(self.opts, p.to_json()) for p in plans]
        pending, bar = list(refs), None
        if progress is not None:
            bar = progress(None, desc=f"{desc} on ray", unit="config", total=len(refs))
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            if bar is not None:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return [float(v) for v in self.ray.get(refs)]

    def close(self) -> None:
        self.ray.shutdown()
