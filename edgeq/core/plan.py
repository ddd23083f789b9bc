"""The plan: per-tensor compression decisions, kept beside the IR.

A plan is an artifact a person reads and edits: `edgeq plan` writes one,
`edgeq export --plan` consumes one. Users write *rules* (glob patterns over
canonical or GGUF names, later rules win) and/or explicit per-tensor entries;
resolving a plan against a graph turns it into one decision per tensor, with
the reason for each, including shape fallbacks the backend forces.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import FORMATS
from edgeq.core.fs import atomic_write_text

PLAN_VERSION = 1
MAX_RANK = 1 << 16
MAX_PLAN_BYTES = 64 << 20


@dataclass
class TensorPlan:
    """One tensor's decision. `format` is what is written; `requested` what was asked before a fallback."""

    format: str
    reason: str = ""
    requested: str | None = None
    rank: int = 0                     # low-rank error branch (0: none)
    keep: int | None = None           # structured width kept after pruning (None: all)
    order: list[int] | None = None    # channel permutation (None: identity)
    tie: str | None = None            # name of a tensor that must share this decision (fused at run time)
    bytes: int | None = None          # bytes in the model files (GGUF alignment and any branch included)
    predicted_error: float | None = None   # the sensitivity pass's cost of this choice
    act_range: list[float] | None = None  # calibrated [min, max] of the activation this weight multiplies (static INT8)

    def to_json(self) -> dict[str, Any]:
        d = {"format": self.format, "reason": self.reason}
        for k in ("requested", "tie", "keep", "order", "bytes", "predicted_error", "act_range"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.rank:
            d["rank"] = self.rank
        return d


@dataclass
class PresetTensors:
    """What a preset means for one model: a decision per tensor, and what the plan's record says of it."""

    tensors: dict[str, TensorPlan]
    record: dict[str, Any]               # the assign_preset pass's record (preset, formats, ...), in its key order


@dataclass
class Rule:
    match: str
    format: str

    def matches(self, canonical: str, alias: str | None) -> bool:
        names = [canonical, canonical.removesuffix(".weight")]
        if alias:
            names += [alias, alias.removesuffix(".weight")]
        return any(fnmatch.fnmatchcase(n, self.match) for n in names)


@dataclass
class Plan:
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    preset: str | None = None          # the preset the plan starts from, if any
    backend: str | None = None
    rules: list[Rule] = field(default_factory=list)
    pruning: dict[str, Any] | None = None    # room for rate -> per-layer widths tables
    search: dict[str, Any] | None = None     # how a budgeted allocation was made (method, budget, totals)
    calibration: dict[str, Any] | None = None   # what the decisions were calibrated on (None: uncalibrated)
    # static INT8 graphs quantized between layers (CNNs): activation value -> calibrated [min, max]; an
    # activation without an entry stays float, so this is also where the plan says where Q/DQ pairs go
    activations: dict[str, list[float]] | None = None
    # compensated (GPTQ) writing, as decided (passes/gptq.py: act_order, sequential, damp, windows); None: plain.
    # Recorded so that `--plan` writes the same bytes as the export that made the plan.
    gptq: dict[str, Any] | None = None
    version: int = PLAN_VERSION

    def to_json(self) -> dict[str, Any]:
        d = {
            "version": self.version,
            "preset": self.preset,
            "backend": self.backend,
            "rules": [asdict(r) for r in self.rules],
            "pruning": self.pruning,
        }
        if self.search is not None:
            d["search"] = self.search
        if self.calibration is not None:
            d["calibration"] = self.calibration
        if self.activations is not None:
            d["activations"] = self.activations
        if self.gptq is not None:
            d["gptq"] = self.gptq
        d["tensors"] = {k: v.to_json() for k, v in self.tensors.items()}
        return d

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.format] = counts.get(t.format, 0) + 1
        return dict(sorted(counts.items()))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")


_TENSOR_KEYS = {"format", "reason", "requested", "rank", "keep", "order", "tie", "bytes", "predicted_error",
                "act_range"}


def _check_format(name: str, where: str, path) -> str:
    name = name.lower()
    if name not in FORMATS:
        raise EdgeqError(path, f"{where}: unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    return name


def plan_from_json(d: Any, path=None) -> Plan:
    """Validate a user's plan; every problem is one line naming the file and the field."""
    if not isinstance(d, dict):
        raise EdgeqError(path, "a plan must be a JSON object")
    version = d.get("version", PLAN_VERSION)
    if type(version) is not int or version != PLAN_VERSION:
        raise EdgeqError(path, f"plan version {version!r} is not supported (this edgeq reads version {PLAN_VERSION})")
    unknown = set(d) - {"version", "preset", "backend", "rules", "tensors", "pruning", "search", "calibration",
                         "activations", "gptq"}
    if unknown:
        raise EdgeqError(path, f"unknown plan key {sorted(unknown)[0]!r}")
    for key, typ in (("rules", list), ("tensors", dict), ("pruning", dict), ("search", dict), ("calibration", dict),
                     ("activations", dict), ("gptq", dict), ("preset", str), ("backend", str)):
        if d.get(key) is not None and not isinstance(d[key], typ):
            raise EdgeqError(path, f"'{key}' must be {'a list' if typ is list else 'an object' if typ is dict else 'a string'}")
    rules = []
    for i, r in enumerate(d.get("rules") or []):
        if not isinstance(r, dict) or not isinstance(r.get("match"), str) or not isinstance(r.get("format"), str):
            raise EdgeqError(path, f"rules[{i}] must be an object with string 'match' and 'format'")
        rules.append(Rule(r["match"], _check_format(r["format"], f"rules[{i}]", path)))
    tensors = {}
    raw = d.get("tensors") or {}
    if not isinstance(raw, dict):
        raise EdgeqError(path, "'tensors' must be an object of name -> decision")
    for name, t in raw.items():
        if isinstance(t, str):
            t = {"format": t}
        if not isinstance(t, dict) or not isinstance(t.get("format"), str):
            raise EdgeqError(path, f"tensors[{name!r}] needs a string 'format'")
        bad = set(t) - _TENSOR_KEYS
        if bad:
            raise EdgeqError(path, f"tensors[{name!r}] has unknown key {sorted(bad)[0]!r}")
        rank = t.get("rank", 0)
        if type(rank) is not int or not 0 <= rank <= MAX_RANK:
            raise EdgeqError(path, f"tensors[{name!r}].rank must be an integer from 0 to {MAX_RANK}")
        for key, ok, what in (("reason", lambda v: isinstance(v, str), "a string"),
                              ("requested", lambda v: isinstance(v, str), "a format name"),
                              ("tie", lambda v: isinstance(v, str), "a tensor name"),
                              ("keep", lambda v: type(v) is int and v > 0, "a positive integer"),
                              ("order", lambda v: isinstance(v, list) and all(type(i) is int for i in v),
                               "a list of integers"),
                              ("bytes", lambda v: type(v) is int and v >= 0, "a non-negative integer"),
                              ("predicted_error", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                               "a number")):
            if t.get(key) is not None and not ok(t[key]):
                raise EdgeqError(path, f"tensors[{name!r}].{key} must be {what}")
        act = t.get("act_range")
        if act is not None and not _is_range(act):
            raise EdgeqError(path, f"tensors[{name!r}].act_range must be [min, max] with min <= 0 <= max")
        tensors[name] = TensorPlan(
            format=_check_format(t["format"], f"tensors[{name!r}]", path), reason=t.get("reason", "set in plan"), requested=t.get("requested"),
            rank=rank, keep=t.get("keep"), order=t.get("order"), tie=t.get("tie"),
            bytes=t.get("bytes"), predicted_error=t.get("predicted_error"),
            act_range=[float(v) for v in act] if act is not None else None,
        )
    preset = d.get("preset")
    acts = d.get("activations")
    if acts is not None:
        if not isinstance(acts, dict):
            raise EdgeqError(path, "'activations' must be an object of activation name -> [min, max]")
        for name, r in acts.items():
            if not _is_range(r):
                raise EdgeqError(path, f"activations[{name!r}] must be [min, max] with min <= 0 <= max")
        acts = {k: [float(v) for v in r] for k, r in acts.items()}
    gptq = d.get("gptq")
    if gptq is not None:
        for key in ("act_order", "sequential"):
            if type(gptq.get(key, False)) is not bool:
                raise EdgeqError(path, f"gptq.{key} must be true or false")
        if gptq.get("windows") is not None and not (type(gptq["windows"]) is int and gptq["windows"] > 0):
            raise EdgeqError(path, "gptq.windows must be a positive integer")
        if gptq.get("importance", "imatrix") not in ("imatrix", "conditional"):
            raise EdgeqError(path, "gptq.importance must be \"imatrix\" or \"conditional\"")
        if gptq.get("aim", "quantized") not in ("quantized", "float"):
            raise EdgeqError(path, "gptq.aim must be \"quantized\" or \"float\"")
        if gptq.get("tokens", "uniform") not in ("uniform", "fisher"):
            raise EdgeqError(path, "gptq.tokens must be \"uniform\" or \"fisher\"")
        if gptq.get("token_windows") is not None and not (type(gptq["token_windows"]) is int
                                                          and gptq["token_windows"] > 0):
            raise EdgeqError(path, "gptq.token_windows must be a positive integer")
    return Plan(tensors=tensors, preset=preset, backend=d.get("backend"), rules=rules, pruning=d.get("pruning"),
                search=d.get("search"), calibration=d.get("calibration"), activations=acts, gptq=gptq)


def _is_range(r: Any) -> bool:
    return (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       and math.isfinite(v) for v in r) and r[0] <= 0 <= r[1])


def load_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(path, "no such plan file")
    if path.stat().st_size > MAX_PLAN_BYTES:
        raise EdgeqError(path, f"larger than {MAX_PLAN_BYTES} bytes")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EdgeqError(path, f"not valid JSON ({exc})") from None
    return plan_from_json(d, path)
