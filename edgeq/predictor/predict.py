"""Using a latency profile: find it, check it fits the device and runtime, predict a bundle, a plan or a graph.

`edgeq predict`, the manifest's `predicted` and the ILP's latency row all come through here, so a plan is
predicted the same way wherever it is predicted.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.predictor.model import Prediction, Predictor
from edgeq.predictor.profile import LatencyProfile, cached_profile_path, load_profile, runtime_dist
from edgeq.predictor.workload import Workload, bundle_workload, graph_workload
from edgeq.runtime import runtime_dists
from edgeq.runtime.latency import device_facts

DEFAULT_PROMPT_TOKENS = 128
DEFAULT_CONTEXT_TOKENS = 64


@functools.lru_cache(maxsize=8)
def _fitted(path: str, mtime: float) -> tuple[LatencyProfile, Predictor]:
    profile = load_profile(path)
    try:
        return profile, Predictor(profile)
    except EdgeqError as exc:           # a profile that cannot be fitted: the message names its file
        if exc.path is not None:
            raise
        raise EdgeqError(path, exc.problem) from None


def open_profile(path: str | os.PathLike | None, backend: str, threads: int | None,
                 kind: str | None = None) -> tuple[Path, LatencyProfile, Predictor]:
    """The profile at `path`, or this machine's cached profile for the backend, threads and model kind (default
    decoder); fitted. A profile of another backend, thread count or model kind is refused in one line."""
    if path is None:
        facts = device_facts(runtime_dists())
        found = [p for p in (cached_profile_path(facts, backend, threads or 1, c, kind or "decoder")
                             for c in ("wall", "cpu")) if p is not None and p.is_file()]
        cached = found[0] if found else None
        if cached is None:
            what = "" if kind in (None, "decoder") else f" --model-kind {kind}"
            raise EdgeqError(None, f"no latency profile of this machine for {backend}{what} with {threads or 1} "
                                   f"thread(s): run `edgeq profile --device local --backend {backend}{what} --threads "
                                   f"{threads or 1}` or pass --latency-profile FILE")
        path = cached
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(path, "no such latency profile")
    profile, fitted = _fitted(str(path.resolve()), path.stat().st_mtime)
    profile.check_use(backend, threads, path, kind)
    return path, profile, fitted


def latency_profile_backend(path: str | os.PathLike) -> str:
    return _fitted(str(Path(path).resolve()), Path(path).stat().st_mtime)[0].backend if Path(path).is_file() \
        else load_profile(path).backend


def check_runtime_here(profile: LatencyProfile, path: Path) -> None:
    """The runtime version this host would record in a bundle must be the one the profile timed."""
    from importlib import metadata

    dist = runtime_dist(profile.backend)
    try:
        have = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return
    profile.check_runtime({dist: have}, "this installation", path)


def predict_workload(fitted: Predictor, w: Workload, prompt_tokens: int | None,
                     context_tokens: int | None) -> Prediction:
    if w.kind == "cnn":             # one image
        return fitted.predict(w)
    if prompt_tokens is None:       # an encoder truncates longer inputs to its own length
        prompt_tokens = min(DEFAULT_PROMPT_TOKENS, w.n_ctx) if w.kind == "encoder" else DEFAULT_PROMPT_TOKENS
    return fitted.predict(w, prompt_tokens, DEFAULT_CONTEXT_TOKENS if context_tokens is None else context_tokens)


def profile_record(path: Path, profile: LatencyProfile) -> dict[str, Any]:
    """How a manifest or a plan names the profile a prediction came from (no paths: bundles are portable)."""
    return {"device": profile.device.get("cpu"), "device_key": profile.device_key(), "sha256": profile.digest(),
            "runtime_version": profile.runtime_version, "clock": profile.clock,
            "noise_spread": profile.noise.get("spread")}


def manifest_prediction(path: str | os.PathLike, graph: Graph, plan: Plan, backend: str, n_ctx: int, kv_dtype: str,
                        file_bytes: int, prompt_tokens: int | None = None,
                        context_tokens: int | None = None) -> dict[str, Any]:
    """The manifest's `predicted` for one backend's artifact (an encoder's: `latency_ms` of one call of batch 1
    over `prompt_tokens` tokens, and no per-token latency; a CNN's: of one image)."""
    p, profile, fitted = open_profile(path, backend, None, graph.kind)
    w = graph_workload(graph, plan, n_ctx, kv_dtype, file_bytes, backend)
    pred = predict_workload(fitted, w, prompt_tokens, context_tokens)
    if w.kind == "cnn":
        return {"latency_ms_per_token": None, "latency_ms": round(pred.prefill_ms, 5),
                "peak_memory_bytes": pred.peak_memory_bytes, "prefill_ms": round(pred.prefill_ms, 5), "images": 1,
                "batch": 1, "backend": backend, "threads": profile.threads,
                "latency_profile": profile_record(p, profile)}
    if w.kind == "encoder":
        return {"latency_ms_per_token": None, "latency_ms": round(pred.prefill_ms, 3),
                "peak_memory_bytes": pred.peak_memory_bytes, "prefill_ms": round(pred.prefill_ms, 3),
                "prompt_tokens": pred.prompt_tokens, "batch": 1, "backend": backend, "threads": profile.threads,
                "latency_profile": profile_record(p, profile)}
    return {"latency_ms_per_token": round(pred.decode_ms_per_token, 4), "peak_memory_bytes": pred.peak_memory_bytes,
            "prefill_ms": round(pred.prefill_ms, 3), "prompt_tokens": pred.prompt_tokens,
            "context_tokens": pred.context_tokens, "backend": backend, "threads": profile.threads,
            "latency_profile": profile_record(p, profile)}


def predict_bundle(bundle: str | os.PathLike, profile_path, backend: str | None = None, threads: int | None = None,
                   prompt_tokens: int | None = None, context_tokens: int | None = None) -> Prediction:
    w, backend, manifest = bundle_workload(bundle, backend)
    p, profile, fitted = open_profile(profile_path, backend, threads, w.kind)
    profile.check_runtime(manifest.get("runtime_versions") or {}, f"bundle {bundle}", p)
    return predict_workload(fitted, w, prompt_tokens, context_tokens)
