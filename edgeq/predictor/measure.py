"""Measuring a latency profile: export the micro-models, run them on the device, interleaved, and judge noise.

Each micro-model is exported through the one compile pipeline (a plan file naming every weight's format),
pushed to the device through the HIL `Device` interface and timed there by the on-device runner (op
`latency`, runtime/latency.py). Rounds are interleaved (round r runs every model before round r+1 runs any),
so a burst of load on a shared machine spreads over all models instead of skewing one. Every figure is a
median: of the timed calls in a round, then over rounds. The same measurement's spread over rounds is the
device's noise; above NOISE_LIMIT the device is too noisy to profile.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq import __version__
from edgeq.compile import pipeline
from edgeq.compile.options import ExportOptions
from edgeq.core.cache import cache_dir
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.devices import Device, open_device
from edgeq.importers.imatrix import Imatrix, ImatrixEntry, write_imatrix
from edgeq.predictor.design import MicroModel
from edgeq.predictor.profile import NODE_TIMES, NOISE_LIMIT, PROFILED_KINDS, LatencyProfile, ModelRun
from edgeq.models import llama
from edgeq.predictor.workload import bundle_workload, cnn_workload
from edgeq.targets.registry import TARGETS, get_target


# a CNN's call of one image takes 0.013-0.05 ms on the digits supernet: each round times CNN_CALLS calls (~30 ms;
# the median is kept), and a runner costs ~0.4 s to start, so rounds are cheap: many of them spread a loaded machine's
# bursts over all micro-models (at 300 calls x 2 rounds, load 7.5, the same subnet's rounds differed by 7.5 %, median)
CNN_CALLS = 1000
CNN_WARMUP = 50
CNN_ROUNDS = 7


@dataclass(frozen=True)
class Settings:
    """What is timed per micro-model and how often."""

    prefill: tuple[int, ...] = (8, 32, 128, 512)      # prompt lengths
    decode: tuple[int, ...] = (0, 64, 256, 1000)      # tokens already in the cache at a decode step
    steps: int = 6                                    # timed decode steps per context (the median is kept)
    prefill_steps: int = 2                            # timed prefills per length
    warmup: int = 1
    rounds: int = 3                                   # interleaved rounds of whole-model timings
    op_rounds: int = 2                                # interleaved rounds of node-by-node timings
    # encoders: profiled calls per length in a node-by-node run (0: prefill_steps); each node's least time over
    # them is its share of the call's CPU time (runtime/onnx_ops.py), so a wait of the OS that lands on a node in
    # some calls must miss it in one: with 3 calls at load 10 a 1.5 ms kernel read 1.5-5 ms from run to run
    op_steps: int = 0
    # `wall`: the wall clock (what a user waits); `cpu`: the process's CPU time, one thread only: on a shared
    # machine it leaves out the time the runtime waited for a core, i.e. it is what an idle device's wall clock
    # would show
    clock: str = "wall"
    # how node-by-node times under the CPU clock were taken (runtime/onnx_ops.py: 2, the nodes' CPU share spread by
    # each node's least wall time); an ONNX decoder profile without it is refused (model.Predictor)
    node_times: int = NODE_TIMES

    @classmethod
    def for_kind(cls, kind: str, quick: bool, clock: str) -> "Settings":
        """A decoder's prefills and decode steps; an encoder's calls at four sequence lengths (no decode); a
        CNN's call of one image (key 1), CNN_CALLS times per round (a call takes tens of µs), whole calls only."""
        rounds = {"rounds": 2, "op_rounds": 1} if quick else {}
        if kind == "cnn":
            return cls(prefill=(1,), decode=(), prefill_steps=CNN_CALLS, warmup=CNN_WARMUP, clock=clock,
                       rounds=CNN_ROUNDS if not quick else 3, op_rounds=0)
        if kind == "encoder":
            return cls(prefill=(32, 64, 128, 256), decode=(), prefill_steps=3, op_steps=10, clock=clock, **rounds)
        return cls(clock=clock, **rounds)

    def runner_args(self) -> dict[str, Any]:
        return {"prefill": list(self.prefill), "decode": list(self.decode), "steps": self.steps,
                "prefill_steps": self.prefill_steps, "warmup": self.warmup, "clock": self.clock,
                **({"op_steps": self.op_steps} if self.op_steps else {})}


def device_for(spec: str) -> Device:
    """The HIL device a spec names; `cpu` is an alias of `local`."""
    return open_device("local" if spec.strip() == "cpu" else spec)


def ones_imatrix(graph, formats: dict[str, str], path: Path) -> Path | None:
    """An importance matrix of ones for the weights whose formats are written from one only (the low-bit
    i-quants), or None when no weight needs one: a plan exported to be timed, not scored, needs no calibration,
    since a kernel's speed does not depend on the values."""
    needs = [n for n, f in formats.items() if get_format(f).requires_imatrix]
    if not needs:
        return None
    write_imatrix(path, Imatrix({graph.weights[n].alias or llama.gguf_name(n): ImatrixEntry(
        np.ones(graph.weights[n].shape[-1], np.float32), np.array([1.0], np.float32)) for n in needs},
        ["ones (latency timing only)"], 1, 1))
    return path


def micro_bundle(mm: MicroModel, backend: str, target: str, work: Path, progress=None) -> Path:
    """The micro-model's bundle, exported once per content (cached beside the profiles)."""
    ident = mm.identity() if mm.kind == "cnn" else [mm.name, mm.seed, mm.n_ctx, mm.formats, mm.config.to_json()]
    key = hashlib.sha256(json.dumps([__version__, backend, target, *ident], sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir()
    folder = (root / "profiles" / "micro" if root is not None else work) / f"{backend}-{mm.name}-{key}"
    if (folder / "manifest.json").is_file():
        return folder
    plan_file = work / f"{mm.name}.plan.json"
    mm.plan().save(plan_file)
    graph = mm.graph(work)
    imatrix = ones_imatrix(graph, mm.formats, work / f"{mm.name}.imatrix.gguf")
    opts = ExportOptions(target=target, backend=backend, plan=str(plan_file), out=str(folder), force=True,
                         check=False, reference=False, calibration=imatrix is not None,
                         imatrix=None if imatrix is None else str(imatrix),
                         n_ctx=mm.n_ctx if mm.kind == "decoder" else None)
    pipeline.export(opts, graph=graph, progress=None)
    return folder


def _model_bytes(bundle: Path) -> int:
    """The model files of a bundle (what its runner maps), from its manifest."""
    m = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    return sum(int(a["bytes"]) for a in m["artifacts"] if a.get("role") != "tokenizer")


def median_ms(times: dict[str, list[float]], clock: str = "wall") -> float:
    """The median of a runner's timed calls (runtime/latency.py) in ms, by the wall clock or CPU time."""
    return float(np.median(times["cpu_s" if clock == "cpu" else "wall_s"]) * 1e3)


def check_clock(clock: str, threads: int) -> None:
    if clock not in ("wall", "cpu"):
        raise EdgeqError(None, f"unknown --clock {clock!r} (wall, cpu)")
    if clock == "cpu" and threads != 1:
        raise EdgeqError(None, "--clock cpu times one thread (the CPU time of several threads is not a latency)")


def _merge_ops(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Node-by-node summaries of the same call from several rounds: medians, weight by weight."""
    weights = sorted({w for s in summaries for w in s["weights_us"]})
    ops = sorted({o for s in summaries for o in s["ops_us"]})
    return {
        "weights_us": {w: round(float(np.median([s["weights_us"][w] for s in summaries if w in s["weights_us"]])), 2)
                       for w in weights},
        "weights_rows": {w: r for s in summaries for w, r in s.get("weights_rows", {}).items()},
        "ops_us": {o: [int(np.median([s["ops_us"][o][0] for s in summaries if o in s["ops_us"]])),
                       round(float(np.median([s["ops_us"][o][1] for s in summaries if o in s["ops_us"]])), 2)]
                   for o in ops},
        "handover_us": round(float(np.median([s["handover_us"] for s in summaries])), 3),
        "kv_len": int(max(s.get("kv_len", 0) for s in summaries)),
        "total_us": round(float(np.median([s["total_us"] for s in summaries])), 1),
        "nodes": int(max(s.get("nodes", 0) for s in summaries)),
        **({"call_us": round(float(np.median([s["call_us"] for s in summaries])), 1)}
           if all("call_us" in s for s in summaries) else {}),
    }


def spread(values: list[float]) -> float:
    """Run-to-run spread of one measurement: relative standard deviation over its rounds."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or v.mean() <= 0:
        return 0.0
    return float(v.std(ddof=1) / v.mean())


def noise_verdict(runs: list[ModelRun]) -> dict[str, Any]:
    """The device's spread: the median over every measurement of its spread over rounds."""
    per = [(m.name, kind, k, spread(v)) for m in runs for kind, d in (("prefill", m.prefill_ms), ("decode", m.decode_ms))
           for k, v in d.items()]
    if not per:
        return {"spread": 0.0, "limit": NOISE_LIMIT, "noisy": False, "measurements": 0}
    s = float(np.median([p[3] for p in per]))
    worst = sorted(per, key=lambda p: -p[3])[:3]
    return {"spread": round(s, 4), "limit": NOISE_LIMIT, "noisy": s > NOISE_LIMIT, "measurements": len(per),
            "p90_spread": round(float(np.percentile([p[3] for p in per], 90)), 4),
            "worst": [{"model": n, kind: int(k), "spread": round(x, 4)} for n, kind, k, x in worst]}


def run_checked(device: Device, remote: str, args: dict[str, Any], backend: str, threads: int, n_ctx: int,
                what: str) -> dict[str, Any]:
    res = device.run(remote, "latency", args, backend=backend, threads=threads, n_ctx=n_ctx, timeout=3600)
    if not res.ok:
        raise EdgeqError(None, f"{device.name}: timing {what} failed: {res.error}")
    return {**res.result, "peak_rss_bytes": res.peak_rss_bytes}


def measure(models: list[MicroModel], device_spec: str, backend: str, threads: int, settings: Settings,
            progress: Callable | None = None, log: Callable[[str], None] = lambda s: None) -> LatencyProfile:
    """Export, push and time every micro-model on the device; the raw profile (not yet judged for noise)."""
    device = device_for(device_spec)
    try:
        why = device.unreachable_reason() or device.missing_backend_reason(backend)
        if why:
            raise EdgeqError(None, why)
        target = device.profile()
        work = Path(tempfile.mkdtemp(prefix="edgeq-profile-"))
        try:
            bundles = {}
            it = models if progress is None else progress(models, desc="export micro-models", unit="model")
            for mm in it:
                bundles[mm.name] = micro_bundle(mm, backend, target, work)
            remote = {mm.name: device.push(bundles[mm.name]) for mm in models}
            args = settings.runner_args()
            target_impl = get_target(backend)
            workloads, kernels = {}, {}
            for mm in models:
                if mm.kind == "cnn":        # timed as whole calls: no kernel names
                    workloads[mm.name] = cnn_workload(mm.graph(work), mm.plan(), _model_bytes(bundles[mm.name]))
                    kernels[mm.name] = []
                    continue
                w, _, _ = bundle_workload(bundles[mm.name], backend)
                weights = ({m.weight: llama.gguf_name(m.weight) for m in w.matmuls} if mm.kind == "decoder"
                           else {n: n for n in mm.formats})          # a fused kernel reads several weights
                w.aliases = target_impl.kernel_names(bundles[mm.name], weights)
                workloads[mm.name], kernels[mm.name] = w, sorted(w.aliases)
            wall: dict[str, list[dict]] = {mm.name: [] for mm in models}
            ops: dict[str, list[dict]] = {mm.name: [] for mm in models}
            # each model's whole-call and node-by-node runs back to back, so that the correction learned between
            # them sees the same load; rounds rotate the order of the models
            jobs = [(r, mm, node_by_node) for r in range(max(settings.rounds, settings.op_rounds))
                    for mm in models[r % len(models):] + models[:r % len(models)]
                    for node_by_node in (False, True)
                    if (settings.op_rounds if node_by_node else settings.rounds) > r]
            bar = None if progress is None else progress(range(len(jobs)), desc="time micro-models", unit="run")
            ticks = iter(bar) if bar is not None else None
            facts, loads = None, []
            for r, mm, node_by_node in jobs:
                extra = {"ops": True, "kernels": kernels[mm.name]} if node_by_node else {}
                res = run_checked(device, remote[mm.name], {**args, **extra}, backend, threads,
                                  mm.n_ctx if mm.kind == "decoder" else None, mm.name)
                facts = facts or res["device"]
                loads += [res.get("load_average_before"), res.get("load_average_after")]
                (ops if node_by_node else wall)[mm.name].append(res)
                if ticks is not None:
                    next(ticks, None)
            if bar is not None and hasattr(bar, "close"):
                bar.close()
            runs = []
            digits = 6 if models[0].kind == "cnn" else 4        # a CNN's call: tens of µs
            for mm in models:
                w = workloads[mm.name]
                rounds = wall[mm.name]
                op_runs = ops[mm.name]
                runs.append(ModelRun(
                    name=mm.name, workload=w,
                    prefill_ms={str(n): [round(median_ms(x["prefill"][str(n)], settings.clock), digits) for x in rounds]
                                for n in settings.prefill},
                    decode_ms={str(c): [round(median_ms(x["decode"][str(c)], settings.clock), digits) for x in rounds]
                               for c in settings.decode},
                    peak_rss_bytes=[int(x["peak_rss_bytes"] or 0) for x in rounds],
                    max_tokens=max([*settings.prefill,
                                    *(c + settings.warmup + settings.steps for c in settings.decode)]),
                    ops={"prefill": {str(n): _merge_ops([x["ops"]["prefill"][str(n)] for x in op_runs])
                                     for n in settings.prefill} if op_runs else {},
                         "decode": {str(c): _merge_ops([x["ops"]["decode"][str(c)] for x in op_runs])
                                    for c in settings.decode} if op_runs else {}}))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        good = [x for x in loads if x]
        return LatencyProfile(
            backend=backend, threads=threads, device={"spec": device.name, **(facts or {})},
            settings=asdict(settings), noise=noise_verdict(runs),
            load_average={"first": good[0] if good else None, "last": good[-1] if good else None,
                          "max_1min": max((x[0] for x in good), default=None)},
            models=runs, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), edgeq_version=__version__,
            kind=models[0].kind)
    finally:
        device.close()


def model_shapes(model: str | None) -> tuple[tuple[int, int, int], ...]:
    """(hidden, ffn, heads) of an encoder (default all-MiniLM-L6-v2) whose plans a profile is for."""
    from edgeq.models.recipes.minilm import MINILM_NAME
    from edgeq.passes import Context

    _, graph = pipeline.import_and_merge(model or MINILM_NAME, [], Context(backend="onnx"))
    if graph.kind != "encoder":
        raise EdgeqError(model, f"an encoder latency profile takes an encoder's widths; this is a {graph.kind}")
    c = graph.config
    return ((int(c.hidden_size), int(c.intermediate_size), int(c.n_heads)),)


def profile_device(device_spec: str, backend: str, threads: int, quick: bool = False, allow_noisy: bool = False,
                   clock: str = "wall", settings: Settings | None = None, progress: Callable | None = None,
                   log: Callable[[str], None] = lambda s: None, kind: str = "decoder",
                   model: str | None = None) -> LatencyProfile:
    """`edgeq profile`: measure the micro-models of a model kind (decoder, encoder) on the device, fit them once
    (so a profile that cannot be fitted is never written), and judge the noise: a device whose same measurement
    varies by more than NOISE_LIMIT from run to run is refused unless `allow_noisy`. Encoders: micro-models at the
    widths of `model` (default all-MiniLM-L6-v2, the validation's) too (design.encoder_micro_models: why)."""
    from edgeq.predictor.cnn_design import cnn_micro_models, supernet_record
    from edgeq.predictor.design import decoder_micro_models, encoder_formats, encoder_micro_models
    from edgeq.predictor.model import Predictor

    target = get_target(backend)
    if kind not in PROFILED_KINDS:
        raise EdgeqError(None, f"latency profiles cover {', '.join(PROFILED_KINDS)}s; not {kind}s")
    if kind not in target.latency_kinds:
        where = [t for t in TARGETS if kind in get_target(t).latency_kinds]
        raise EdgeqError(None, f"latency profiles of {kind}s cover the {' and '.join(where)} backend"
                               f"{'s' * (len(where) != 1)} for now, not {backend}")
    if threads < 1:
        raise EdgeqError(None, "--threads must be at least 1")
    check_clock(clock, threads)
    settings = settings or Settings.for_kind(kind, quick, clock)
    shapes = model_shapes(model) if kind == "encoder" else ()
    models = (cnn_micro_models(quick) if kind == "cnn" else
              encoder_micro_models(encoder_formats(backend), variants=1 if quick else 2, quick=quick,
                                   dominated=not quick, model_shapes=shapes)
              if kind == "encoder" else
              decoder_micro_models(target.candidate_formats(), variants=1 if quick else 2, quick=quick))
    log(f"profiling {kind}s on {backend} with {threads} thread(s) on {device_spec} ({settings.clock} clock): "
        f"{len(models)} micro-models{' (quick)' if quick else ''}, {settings.rounds} rounds + "
        f"{settings.op_rounds} node-by-node")
    prof = measure(models, device_spec, backend, threads, settings, progress, log)
    if kind == "cnn":
        prof.settings["supernet"] = supernet_record()
    if shapes:
        prof.settings["model_shapes"] = [list(x) for x in shapes]
    Predictor(prof)
    n = prof.noise
    if n["noisy"]:
        msg = (f"{device_spec} is too noisy to profile: the same measurement varies by {n['spread']:.1%} from run "
               f"to run (median over {n['measurements']}; limit {n['limit']:.0%}; load average "
               f"{prof.load_average.get('max_1min')})")
        if not allow_noisy:
            raise EdgeqError(None, msg + ": profile again when the device is idle, or pass --allow-noisy to keep it")
        log(f"warning: {msg}; kept (--allow-noisy)")
    return prof
