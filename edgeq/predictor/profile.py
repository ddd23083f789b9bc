"""The latency profile: what `edgeq profile` measured on one device, for one backend, thread count and model
kind (decoders, encoders or CNNs: a profile of one kind is refused for another). A CNN profile times subnets of
one supernet (its structure is in `settings["supernet"]`): the per-layer table it is fitted to is that supernet's.

A versioned JSON file (format `edgeq-latency-profile`), cached per device, backend and threads in
~/.cache/edgeq/profiles/. It keeps the raw measurements (each micro-model's workload, its per-round wall
times, its node-by-node kernel timings and peak memory), not a fitted model: the predictor is fitted from
them when loaded (model.py), so a better fit never needs the device again. It records what it is valid for
(the CPU model and flags, cores, the runtime's version, threads) and how noisy the device was.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeq.core.cache import cache_dir
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import atomic_write_text
from edgeq.predictor.workload import CnnWorkload, Workload, workload_from_json
from edgeq.runtime import BACKENDS

PROFILE_FORMAT = "edgeq-latency-profile"
PROFILE_VERSION = 1
NOISE_LIMIT = 0.05            # run-to-run spread of the same measurement above this: too noisy to profile
MAX_PROFILE_BYTES = 256 << 20
PROFILED_KINDS = ("decoder", "encoder", "cnn")
# how `settings["node_times"]` says node-by-node CPU times were taken: 2, runtime/onnx_ops.py's CPU share spread by
# each node's least wall time (none: 1, each call's nodes scaled by its CPU share, medians; ONNX decoder profiles
# measured so are refused)
NODE_TIMES = 2


@dataclass
class ModelRun:
    """One micro-model measured on the device."""

    name: str
    workload: Workload | CnnWorkload
    prefill_ms: dict[str, list[float]]      # prompt tokens -> the median of each round (ms)
    decode_ms: dict[str, list[float]]       # tokens already in the cache -> the median of each round (ms)
    peak_rss_bytes: list[int]               # per round: the runner's peak resident memory
    max_tokens: int                         # the most tokens one runner process held (what the peak saw)
    ops: dict[str, Any] = field(default_factory=dict)   # {"prefill": {N: summary}, "decode": {C: summary}}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["workload"] = self.workload.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelRun":
        d = dict(d)
        d["workload"] = workload_from_json(d["workload"])
        return cls(**d)


@dataclass
class LatencyProfile:
    backend: str
    threads: int
    device: dict[str, Any]                  # spec, machine, cpu, flags, cores, system, runtime_versions
    settings: dict[str, Any]                # prefill lengths, decode contexts, steps, rounds, warm-up
    noise: dict[str, Any]                   # spread (median relative std of a measurement over rounds), verdict
    load_average: dict[str, Any]            # before / after, as the device reported it
    models: list[ModelRun]
    created: str = ""
    edgeq_version: str = ""
    kind: str = "decoder"                   # the model kind its micro-models are (decoder, encoder, cnn)

    # --- identity -----------------------------------------------------------------------------------------

    @property
    def clock(self) -> str:
        """What the figures measure: `wall` (the wall clock) or `cpu` (one thread's CPU time: an idle device's
        wall clock)."""
        return self.settings.get("clock", "wall")

    @property
    def runtime_version(self) -> str | None:
        return (self.device.get("runtime_versions") or {}).get(runtime_dist(self.backend))

    def device_key(self) -> str:
        return device_key(self.device)

    def describe(self) -> str:
        return (f"{self.backend} {self.runtime_version or '?'}{'' if self.kind == 'decoder' else ' ' + self.kind + 's'}, "
                f"{self.threads} thread{'s' * (self.threads != 1)}"
                f"{', CPU time' if self.clock == 'cpu' else ''}, "
                f"{self.device.get('cpu', '?')} ({self.device.get('cores', '?')} cores) via {self.device.get('spec')}")

    # --- checks -------------------------------------------------------------------------------------------

    def check_device(self, facts: dict[str, Any], where: str, path=None) -> None:
        """Refuse to predict for a device the profile was not measured on (another CPU, flags or core count)."""
        if device_key(facts) != self.device_key():
            diff = [k for k in ("machine", "cpu", "cores", "flags") if facts.get(k) != self.device.get(k)]
            raise EdgeqError(path, f"this latency profile was measured on {self.device.get('cpu')!r} "
                                   f"({self.device.get('cores')} cores), not on {where} ({facts.get('cpu')!r}, "
                                   f"{facts.get('cores')} cores; differs in {', '.join(diff)}): run `edgeq profile "
                                   f"--device ...` there")

    def check_runtime(self, versions: dict[str, str], where: str, path=None) -> None:
        """Refuse a profile of another version of the backend's runtime than the one that will run the plan."""
        dist = runtime_dist(self.backend)
        have = (versions or {}).get(dist)
        if have is not None and self.runtime_version is not None and have != self.runtime_version:
            raise EdgeqError(path, f"this latency profile timed {dist} {self.runtime_version}, but {where} uses "
                                   f"{dist} {have}: profile again with that version")

    def check_use(self, backend: str, threads: int | None, path=None, kind: str | None = None) -> None:
        if backend != self.backend:
            raise EdgeqError(path, f"this latency profile is for the {self.backend} backend, not {backend}")
        if kind is not None and kind != self.kind:
            how = (f"profile with `edgeq profile --backend {backend} --model-kind {kind}`" if kind in PROFILED_KINDS
                   else f"latency profiles cover {', '.join(PROFILED_KINDS)}s for now")
            raise EdgeqError(path, f"this latency profile times {self.kind}s, not {kind}s: {how}")
        if threads is not None and int(threads) != self.threads:
            raise EdgeqError(path, f"this latency profile was measured with {self.threads} thread"
                                   f"{'s' * (self.threads != 1)}; profile with --threads {threads} for that")

    # --- files --------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "edgeq_version": self.edgeq_version,
                "created": self.created, "backend": self.backend,
                **({} if self.kind == "decoder" else {"kind": self.kind}),   # decoder profiles' digests unchanged
                "threads": self.threads, "device": self.device,
                "settings": self.settings, "noise": self.noise, "load_average": self.load_average,
                "models": [m.to_json() for m in self.models]}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def runtime_dist(backend: str) -> str | None:
    """The distribution whose version a backend's timings depend on (the one a bundle records and checks)."""
    m = BACKENDS.get(backend)
    return None if m is None else m.RUNTIME_DIST


def device_key(facts: dict[str, Any]) -> str:
    """What makes two devices the same for timing: machine, CPU model, its feature flags, cores."""
    ident = {k: facts.get(k) for k in ("machine", "cpu", "cores", "flags")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def load_profile(path: str | os.PathLike) -> LatencyProfile:
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(path, "no such latency profile")
    if path.stat().st_size > MAX_PROFILE_BYTES:
        raise EdgeqError(path, "latency profile is implausibly large")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EdgeqError(path, f"not a latency profile (not valid JSON: {exc})") from None
    if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
        raise EdgeqError(path, f"not an {PROFILE_FORMAT} file (a --target device profile is something else)")
    if d.get("version") != PROFILE_VERSION:
        raise EdgeqError(path, f"latency profile version {d.get('version')} is not the one this edgeq reads "
                               f"({PROFILE_VERSION}): profile the device again")
    try:
        return LatencyProfile(backend=d["backend"], threads=int(d["threads"]), device=d["device"],
                              settings=d["settings"], noise=d["noise"], load_average=d.get("load_average") or {},
                              models=[ModelRun.from_json(m) for m in d["models"]], created=d.get("created", ""),
                              edgeq_version=d.get("edgeq_version", ""), kind=str(d.get("kind", "decoder")))
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgeqError(path, f"latency profile is incomplete or damaged ({type(exc).__name__}: {exc})") from None


def cached_profile_path(facts: dict[str, Any], backend: str, threads: int, clock: str = "wall",
                        kind: str = "decoder") -> Path | None:
    """Where the profile of this device, backend, thread count, clock and model kind is cached (None: caching is
    off)."""
    root = cache_dir()
    if root is None:
        return None
    return root / "profiles" / (f"{device_key(facts)}-{backend}{'' if kind == 'decoder' else '-' + kind}"
                                f"-t{int(threads)}{'-cpu' if clock == 'cpu' else ''}.json")
