"""Accuracy, measured: held-out whole-model plans, predicted from a profile and run for real on the device.

`edgeq profile --validate K` draws K plans of a real model (default SmolLM2-135M; encoder profiles:
all-MiniLM-L6-v2) that no micro-model looks like: every 2-D weight gets a random format among those the backend can
write at its shape, with each plan's own random preference over formats (so plans range from mostly-2-bit to
mostly-float). An encoder's linears draw from every format written for encoders (static and dynamic int8 too),
and in about a third of its layers q, k and v share one draw (so fused QAttention layers occur as they do in real
plans); an encoder's call (batch 1, --prompt-tokens tokens) is its `prefill`, and it has no decode step. A CNN
profile's held-out plans are random subnets of its supernet (cnn_design.py: widths, depth, kernels and a format
per layer, from a seed no micro-model uses), each call one image. Each
plan is exported through the pipeline with the profile, so its manifest carries the prediction; all bundles are
then timed on the device in interleaved rounds (the runner's `latency` op: one prefill of N tokens, decode steps
at C tokens of context), and each bundle's measurements.json gets the measured figures beside the predicted ones.
A plan is within tolerance when |predicted / measured − 1| ≤ max(10 %, 2 × its own run-to-run spread). The
device's spread (the same plan measured in several rounds) is reported beside the errors: it is the floor.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.compile import pipeline
from edgeq.compile.options import ExportOptions
from edgeq.core.errors import EdgeqError
from edgeq.core.plan import Plan, TensorPlan, plan_from_json
from edgeq.devices import DeviceError
from edgeq.passes import Context
from edgeq.models import names
from edgeq.models.recipes.minilm import MINILM_NAME
from edgeq.predictor.cnn_design import HELD_OUT_SEED, SUPERNET, CnnMicroModel, random_points
from edgeq.predictor.design import ENCODER_ROLES, encoder_formats, timing_plan
from edgeq.predictor.measure import CNN_CALLS, CNN_ROUNDS, CNN_WARMUP, device_for, median_ms, ones_imatrix, spread
from edgeq.predictor.predict import DEFAULT_CONTEXT_TOKENS, DEFAULT_PROMPT_TOKENS
from edgeq.predictor.profile import LatencyProfile
from edgeq.targets.registry import get_target

TOLERANCE = 0.10
SEED = 20_000                 # plan seeds: far from the micro-models' (design.py)


@dataclass(frozen=True)
class ValidationSettings:
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    rounds: int = 3
    steps: int = 8
    prefill_steps: int = 2
    warmup: int = 1


def random_plans(graph, backend: str, k: int, seed: int = SEED) -> list[Plan]:
    """K plans with a random format per 2-D weight, each plan with its own preference over the formats."""
    encoder = graph.kind == "encoder"
    formats = encoder_formats(backend) if encoder else get_target(backend).candidate_formats()
    plans = []
    for i in range(k):
        rng = np.random.default_rng(seed + i)
        pref = rng.dirichlet(np.full(len(formats), 0.4))
        why = f"latency validation plan {i}"

        def draw(shape) -> str:
            fits = [j for j, f in enumerate(formats) if f.can_carry(shape)]
            p = pref[fits] + 1e-3
            return formats[int(rng.choice(fits, p=p / p.sum()))].name

        tensors = {}
        for name, t in graph.weights.items():
            if encoder and (len(t.shape) != 2 or not name.startswith("encoder.")):
                # embeddings are looked up, not multiplied: the token table's format varies, the rest stay f32
                tensors[name] = TensorPlan(str(rng.choice(["f32", "f16", "int8"])) if name == names.WORD_EMBED
                                           else "f32", reason=why)
            elif len(t.shape) == 2:
                tensors[name] = timing_plan(draw(t.shape), why)
        if encoder:
            for layer in range(graph.config.n_layers):
                if rng.random() < 1 / 3:                  # q, k and v in one format (int8 ones fuse)
                    qkv = [f"encoder.layer.{layer}.{r}.weight" for r in ENCODER_ROLES[:3]]
                    fmt = draw(graph.weights[qkv[0]].shape)
                    for n in qkv:
                        tensors[n] = timing_plan(fmt, why)
        plans.append(Plan(tensors=tensors, preset=None))
    return plans


def _within(pred: float, meas: float, spr: float) -> bool:
    return abs(pred / meas - 1.0) <= max(TOLERANCE, 2.0 * spr)


def summarize(rows: list[dict[str, Any]], what: str) -> dict[str, Any]:
    pred = np.array([r["predicted"][what] for r in rows])
    meas = np.array([r["measured"][what] for r in rows])
    spr = np.array([r["measured"][f"{what}_spread"] for r in rows])
    err = pred / meas - 1.0
    ok = [_within(p, m, s) for p, m, s in zip(pred, meas, spr)]
    return {"plans": len(rows), "within": int(sum(ok)), "share_within": round(float(np.mean(ok)), 4),
            "share_within_10pct": round(float(np.mean(np.abs(err) <= TOLERANCE)), 4),
            "mape": round(float(np.mean(np.abs(err))), 4), "median_error": round(float(np.median(err)), 4),
            "worst_error": round(float(err[np.argmax(np.abs(err))]), 4),
            "device_spread_median": round(float(np.median(spr)), 4),
            "device_spread_p90": round(float(np.percentile(spr, 90)), 4)}


def memory_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The peak-memory predictions against the runner's measured peaks (VmHWM; the median over rounds)."""
    err = np.array([r["predicted"]["peak_memory_bytes"] / max(r["measured"]["peak_rss_bytes"], 1) - 1 for r in rows])
    return {"memory_mape": round(float(np.mean(np.abs(err))), 4),
            "memory": {"share_within_10pct": round(float(np.mean(np.abs(err) <= TOLERANCE)), 4),
                       "median_error": round(float(np.median(err)), 4),
                       "worst_error": round(float(err[np.argmax(np.abs(err))]), 4)}}


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    call = "call of one image (ms)" if rows and rows[0]["measured"].get("prompt_tokens") == 1 else "prefill (ms)"
    panels = [(w, label) for w, label in (("decode_ms_per_token", "decode step (ms)"), ("prefill_ms", call))
              if all(r["predicted"].get(w) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, (what, label) in zip(axes[0], panels):
        p = np.array([r["predicted"][what] for r in rows])
        m = np.array([r["measured"][what] for r in rows])
        lo, hi = 0.9 * min(p.min(), m.min()), 1.1 * max(p.max(), m.max())
        xs = np.linspace(lo, hi, 10)
        ax.fill_between(xs, xs * (1 - TOLERANCE), xs * (1 + TOLERANCE), color="0.9", label="±10 %")
        ax.plot(xs, xs, color="0.5", lw=1)
        ax.scatter(m, p, s=18, color="tab:blue")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(loc="upper left")
    fig.suptitle(textwrap.fill(title, 75 * len(panels)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_plans(profile_path: Path, profile: LatencyProfile, target: str, k: int, out: Path, model: str | None,
                 settings: ValidationSettings, progress: Callable | None) -> tuple[int | None, list[Path]]:
    """K random plans of a decoder or encoder, exported with the profile's prediction; (n_ctx, bundles)."""
    backend = profile.backend
    encoder = profile.kind == "encoder"
    model = model or (MINILM_NAME if encoder else None)
    _, graph = pipeline.import_and_merge(model, [], Context(backend=backend))
    if graph.kind != profile.kind:
        raise EdgeqError(model, f"the latency profile times {profile.kind}s; this model is a {graph.kind}")
    n_ctx = max(settings.prompt_tokens, settings.context_tokens + settings.steps + 2)
    n_ctx = None if encoder else int(min(graph.config.context_length, max(256, 2 ** math.ceil(math.log2(n_ctx)))))
    bundles: list[Path] = []
    plans = random_plans(graph, backend, k)
    it = plans if progress is None else progress(plans, desc="export held-out plans", unit="plan")
    for i, plan in enumerate(it):
        folder = out / f"plan-{i:02d}"
        plan_file = out / f"plan-{i:02d}.json"
        plan.save(plan_file)
        imatrix = ones_imatrix(graph, {n: t.format for n, t in plan.tensors.items()},
                               out / f"plan-{i:02d}.imatrix.gguf")
        opts = ExportOptions(model=model, target=target, backend=backend, plan=str(plan_file),
                             out=str(folder), force=True, check=False, reference=False,
                             calibration=imatrix is not None, imatrix=None if imatrix is None else str(imatrix),
                             n_ctx=n_ctx,
                             latency_profile=str(profile_path), prompt_tokens=settings.prompt_tokens,
                             context_tokens=settings.context_tokens)
        pipeline.export(opts)
        bundles.append(folder)
    return n_ctx, bundles


def export_cnn_plans(profile_path: Path, target: str, backend: str, k: int, out: Path, model: str | None,
                     progress: Callable | None) -> list[Path]:
    """K random subnets of the profile's supernet (widths, depth, kernels, a format per layer; a seed no
    micro-model uses), each exported through the pipeline with the profile's prediction."""
    if model not in (None, SUPERNET):
        raise EdgeqError(model, f"a CNN latency profile is validated on subnets of its supernet ({SUPERNET}); "
                                "--model does not apply")
    points = random_points(k, HELD_OUT_SEED)
    it = list(enumerate(points))
    it = it if progress is None else progress(it, desc="export held-out subnets", unit="plan")
    bundles = []
    for i, (w, fm) in it:
        mm = CnnMicroModel(f"plan-{i:02d}", tuple(w), tuple(fm), HELD_OUT_SEED)
        folder = out / mm.name
        plan_file = out / f"{mm.name}.json"
        mm.plan().save(plan_file)
        opts = ExportOptions(target=target, backend=backend, plan=str(plan_file), out=str(folder), force=True,
                             check=False, reference=False, calibration=False, latency_profile=str(profile_path))
        pipeline.export(opts, graph=mm.graph())
        bundles.append(folder)
    return bundles


def validate(profile_path: Path, profile: LatencyProfile, device_spec: str, k: int, out: Path, model: str | None = None,
             settings: ValidationSettings = ValidationSettings(), progress: Callable | None = None,
             log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Export, predict and time K held-out plans; the report (also written to `out`/validation.json and
    validation.png)."""
    if k < 1:
        raise EdgeqError(None, "--validate needs at least one plan")
    backend, threads = profile.backend, profile.threads
    out.mkdir(parents=True, exist_ok=True)
    device = device_for(device_spec)
    try:
        why = device.unreachable_reason() or device.missing_backend_reason(backend)
        if why:
            raise EdgeqError(None, why)
        try:                            # refused before minutes of exports and runs (and checked again after)
            early = device.facts()
        except DeviceError:
            early = None
        if early:
            profile.check_device(early, device.name, profile_path)
        encoder = profile.kind in ("encoder", "cnn")       # one call, no decode step
        if profile.kind == "cnn":
            settings = replace(settings, prompt_tokens=1, prefill_steps=CNN_CALLS, warmup=CNN_WARMUP,
                               rounds=max(settings.rounds, CNN_ROUNDS))
            n_ctx = None
            bundles = export_cnn_plans(profile_path, device.profile(), backend, k, out, model, progress)
        else:
            n_ctx, bundles = export_plans(profile_path, profile, device.profile(), k, out, model, settings, progress)
        remote = [device.push(b) for b in bundles]
        args = {"prefill": [settings.prompt_tokens], "decode": [] if encoder else [settings.context_tokens],
                "steps": settings.steps, "prefill_steps": settings.prefill_steps, "warmup": settings.warmup}
        runs: list[list[dict]] = [[] for _ in bundles]
        facts = None
        loads = []
        jobs = [(r, i) for r in range(settings.rounds) for i in range(len(bundles))]
        it2 = jobs if progress is None else progress(jobs, desc="time held-out plans", unit="run")
        for r, j in it2:
            i = (j + r) % len(bundles)          # rotate the order each round
            res = device.run(remote[i], "latency", args, backend=backend, threads=threads, n_ctx=n_ctx, timeout=3600)
            if not res.ok:
                raise EdgeqError(bundles[i], f"{device.name}: timing failed: {res.error}")
            facts = facts or res.result.get("device")
            loads += [res.result.get("load_average_before"), res.result.get("load_average_after")]
            runs[i].append({**res.result, "peak_rss_bytes": res.peak_rss_bytes})
        if facts is not None:
            profile.check_device(facts, device.name, profile_path)
        rows = []
        for b, rr in zip(bundles, runs):
            m = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
            pred = m["predicted"]
            clock = profile.clock
            other = "wall" if clock == "cpu" else "cpu"
            pre = [median_ms(x["prefill"][str(settings.prompt_tokens)], clock) for x in rr]
            pre_other = [median_ms(x["prefill"][str(settings.prompt_tokens)], other) for x in rr]
            measured = {"prefill_ms": float(np.median(pre)), "prefill_ms_spread": spread(pre),
                        "rounds_prefill_ms": [round(x, 6 if profile.kind == "cnn" else 3) for x in pre],
                        "peak_rss_bytes": int(np.median([x["peak_rss_bytes"] or 0 for x in rr])),
                        "prompt_tokens": settings.prompt_tokens, "threads": threads, "device": device.name,
                        "clock": clock, f"prefill_ms_{other}": float(np.median(pre_other))}
            if not encoder:
                dec = [median_ms(x["decode"][str(settings.context_tokens)], clock) for x in rr]
                dec_other = [median_ms(x["decode"][str(settings.context_tokens)], other) for x in rr]
                measured.update({"decode_ms_per_token": float(np.median(dec)),
                                 "decode_ms_per_token_spread": spread(dec),
                                 "rounds_decode_ms": [round(x, 4) for x in dec],
                                 "context_tokens": settings.context_tokens,
                                 f"decode_ms_per_token_{other}": float(np.median(dec_other))})
            predicted = {"decode_ms_per_token": pred["latency_ms_per_token"], "prefill_ms": pred["prefill_ms"],
                         "peak_memory_bytes": pred["peak_memory_bytes"]}
            mfile = b / "measurements.json"
            meas_doc = json.loads(mfile.read_text(encoding="utf-8")) if mfile.is_file() else {}
            meas_doc["latency"] = {"measured": measured, "predicted": predicted}
            mfile.write_text(json.dumps(meas_doc, indent=1) + "\n", encoding="utf-8")
            model_bytes = sum(a["bytes"] for a in m["artifacts"] if a["role"] != "tokenizer")
            rows.append({"bundle": b.name, "bytes": model_bytes, "bpw": m["model"]["bits_per_weight"],
                         "formats": plan_from_json(m["plan"]).format_counts(), "predicted": predicted,
                         "measured": measured})
        good = [x for x in loads if x]
        report = {"backend": backend, "kind": profile.kind, "threads": threads, "device": device.name,
                  "clock": profile.clock, "cpu": (facts or {}).get("cpu"),
                  "cpu_flags": " ".join(f for f in (facts or {}).get("flags", [])
                                        if f.startswith(("avx", "fma", "sse4"))),
                  "model": (f"subnets of the {SUPERNET} supernet" if profile.kind == "cnn" else
                            model or (MINILM_NAME if encoder else "SmolLM2-135M-Instruct (default)")),
                  "settings": settings.__dict__, "tolerance": f"max({TOLERANCE:.0%}, 2 x the plan's run-to-run spread)",
                  "load_average": {"first": good[0] if good else None, "last": good[-1] if good else None,
                                   "max_1min": max((x[0] for x in good), default=None)},
                  "profile": {"sha256": profile.digest(), "noise": profile.noise},
                  **({} if encoder else {"decode": summarize(rows, "decode_ms_per_token")}),
                  "prefill": summarize(rows, "prefill_ms"),
                  **memory_summary(rows),
                  "plans": rows}
        (out / "validation.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        p = report["prefill"]
        d = report.get("decode")
        what = (f"decode {d['share_within']:.0%} within (MAPE {d['mape']:.1%}), prefill" if d else
                "one image" if profile.kind == "cnn" else f"batch 1 x {settings.prompt_tokens} tokens")
        plot(rows, f"{backend} {profile.kind}s, {threads} thread(s), {profile.clock} clock, {k} held-out plans on "
                   f"{report['cpu']}: {what} {p['share_within']:.0%} within (MAPE {p['mape']:.1%}); "
                   f"load {report['load_average']['max_1min']}", out / "validation.png")
        return report
    finally:
        device.close()

