"""The TVM size model for budgeted plans: the params file exactly, the library by building it.

A TVM decoder bundle's model files are the compiled library and
`params.safetensors` (target.py). Both are sized from the real lowering,
never from a restatement of it:

- params: the lowering runs on zero weights with `SizingParams`, which keeps
  each stored array's dtype and shape only (int4 bytes and f16 group scales,
  int8 rows and f32 scales, f16 low-rank factors, norms, RoPE tables...). The
  file is safetensors: an 8-byte length, a JSON header (per array: dtype,
  shape, data offsets) padded with spaces to 8 bytes, then the data. The
  order of the arrays in the file (it sets the offsets' digits) is taken from
  safetensors itself on one-element stand-ins, so `params_file_bytes` is the
  size `save_params` writes, to the byte. Per (tensor, format) the ILP sums
  the tensor's arrays and header entries with offsets at their widest, an
  upper bound within a few bytes per array; `exact_bytes` sizes a whole plan.
- library: its size is not additive per tensor (it holds one kernel per
  distinct (format, shape) workload, plus the VM code and the runtime glue),
  so it is measured: `exact_bytes` lowers the plan on zero weights and builds
  and exports the library for the device profile (the module does not depend
  on weight values: weights are parameters, never constants). The ILP's fixed
  overhead counts the library of a coverage plan (layer i in candidate format
  i mod n, with the candidate ranks), which holds every linear kernel the
  candidates can ask for on a model with enough layers; when a plan's real
  library is larger the allocator solves again with the excess subtracted
  (passes/allocate.py). A budgeted plan's predicted bytes are the bytes of
  the files written, and the export checks them again after the build.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from edgeq.core.cache import cache_dir, read_json_entry, write_json_entry
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format, get_format
from edgeq.core.ir import Graph
from edgeq.core.layout import FileLayout, zero_weights
from edgeq.core.plan import Plan, TensorPlan
from edgeq.models import names
from edgeq.targets.profiles import get_profile
from edgeq.targets.tvm.build import compile_module, export_library, library_kind, resolve_target
from edgeq.targets.tvm.dot import dot_kind
from edgeq.targets.tvm.lower import lower_tvm

LAYOUT_VERSION = 1
OWNED_SUFFIXES = ("", ".scale", ".lowrank_a", ".lowrank_b")


def _zero_branches(graph: Graph, ranks: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {n: (np.zeros((r, graph.weights[n].shape[1]), np.float16), np.zeros((graph.weights[n].shape[0], r),
                                                                               np.float16))
            for n, r in ranks.items() if r}


def _stand_in_header(specs: dict) -> tuple[list[str], dict[str, str]]:
    """(the order safetensors writes these arrays in, each one's dtype name in the header)."""
    from safetensors.numpy import save

    raw = save({n: np.zeros(1, s.dtype) for n, s in specs.items()})
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    head.pop("__metadata__", None)
    return list(head), {k: v["dtype"] for k, v in head.items()}


def _entry(name: str, dtype: str, shape, begin: int, end: int) -> str:
    return json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}},
                      separators=(",", ":"), ensure_ascii=False)[1:-1]


def params_file_bytes(specs: dict) -> int:
    """Bytes of the safetensors file holding arrays of these dtypes and shapes ({name: ArraySpec})."""
    order, dtypes = _stand_in_header(specs)
    entries, offset = [], 0
    for name in order:
        s = specs[name]
        entries.append(_entry(name, dtypes[name], s.shape, offset, offset + s.nbytes))
        offset += s.nbytes
    header = len(("{" + ",".join(entries) + "}").encode())
    return 8 + header + (-header) % 8 + offset


def size_params(zero_graph: Graph, plan: Plan, ranks: dict[str, int] | None = None) -> dict:
    """{stored array name: ArraySpec} of `plan` (with rank-r branches on `ranks`' weights), in parameter order."""
    return lower_tvm(zero_graph, plan, branches=_zero_branches(zero_graph, ranks or {}), sizing=True).params


def _owner(graph: Graph, mats: list[str], stored) -> dict[str, str]:
    """Stored array -> the decidable weight it belongs to (its own arrays, scales and branch factors)."""
    out = {}
    for n in mats:
        for s in OWNED_SUFFIXES:
            if n + s in stored:
                out[n + s] = n
    return out


def tvm_layout(graph: Graph, fmts: list[Format], ranks: list[int] = (), profile=None,
               ndk_clang: str | None = None) -> FileLayout:
    """The FileLayout of TVM decoders for the candidate formats `fmts` and branch ranks `ranks`, the library
    built for `profile` (a targets.profiles.DeviceProfile; default `cpu`)."""
    if graph.kind != "decoder":
        raise EdgeqError(None, f"budgeted TVM plans are for decoders only for now, not {graph.kind}s")
    profile = profile or get_profile("cpu")
    zg = zero_weights(graph)
    mats = [n for n, t in graph.weights.items() if len(t.shape) == 2]
    ranks = sorted({int(r) for r in ranks if r > 0})
    # the widest data offset any plan can have: every matrix f32 and every branch at the largest rank
    widest = sum(4 * t.n_elements for t in graph.weights.values())
    if ranks:
        widest += sum(2 * ranks[-1] * sum(graph.weights[n].shape) for n in mats if n != names.EMBED)
    digits = 10 ** len(str(widest)) - 1

    def entry_bound(name: str, spec) -> int:
        """A header entry with both offsets at their widest, and its comma."""
        return len(_entry(name, "XXXX", spec.shape, digits, digits).encode()) + 1      # dtype names: F32, BF16...

    def plan_in(fmt: str) -> Plan:
        tensors = {n: TensorPlan("f32") for n in graph.weights}
        for n in mats:
            if get_format(fmt).can_carry(graph.weights[n].shape):
                tensors[n] = TensorPlan(fmt)
        return Plan(tensors=tensors)

    def per_weight(specs: dict) -> dict[str, int]:
        per = {n: 0 for n in mats}
        for name, owner in _owner(graph, mats, specs).items():
            per[owner] += specs[name].nbytes + entry_bound(name, specs[name])
        return per

    base_specs = size_params(zg, plan_in("f32"))
    owned = _owner(graph, mats, base_specs)
    fixed = {k: s for k, s in base_specs.items() if k not in owned}
    params_overhead = 8 + 2 + 7 + sum(s.nbytes + entry_bound(k, s) for k, s in fixed.items())
    table: dict[tuple[str, str], int] = {(n, "f32"): b for n, b in per_weight(base_specs).items()}
    for f in fmts:
        if f.name != "f32":
            p = plan_in(f.name)
            per = per_weight(size_params(zg, p))
            table.update({(n, f.name): per[n] for n in mats if p.tensors[n].format == f.name})
    branch_table: dict[tuple[str, int], int] = {}
    base = per_weight(base_specs)
    for r in ranks:
        has = {n: r for n in mats if n != names.EMBED}
        per = per_weight(size_params(zg, plan_in("f32"), has))
        branch_table.update({(n, r): per[n] - base[n] for n in has})

    library = _Library(zg, profile, ndk_clang)
    coverage = _coverage_plan(graph, mats, [f.name for f in fmts], ranks)
    overhead = params_overhead + library.bytes(*coverage)

    def exact_bytes(plan: Plan) -> int:
        ranks_of = {n: t.rank for n, t in plan.tensors.items() if t.rank}
        return params_file_bytes(size_params(zg, plan, ranks_of)) + library.bytes(plan, ranks_of)

    return FileLayout.from_tables("tvm", overhead, table, branch_table, key=f"tvm/layout-v{LAYOUT_VERSION}/params",
                                  exact_bytes=exact_bytes)


def _coverage_plan(graph: Graph, mats: list[str], fmts: list[str], ranks: list[int]) -> tuple[Plan, dict[str, int]]:
    """A plan whose library holds every linear kernel the candidates can ask for (given enough layers): the
    matrices of layer i in format i mod n (and rank (i div n) mod m), the rest in the first format."""
    n_layers = graph.config.n_layers
    tensors = {n: TensorPlan("f32") for n in graph.weights}
    branches: dict[str, int] = {}
    for n in mats:
        layer = int(n.split(".")[2]) if n.startswith("model.layers.") else n_layers
        for k in range(len(fmts)):
            f = fmts[(layer + k) % len(fmts)]
            if get_format(f).can_carry(graph.weights[n].shape):
                tensors[n] = TensorPlan(f)
                break
        if ranks and n != names.EMBED:
            branches[n] = ranks[(layer // len(fmts)) % len(ranks)]
    return Plan(tensors=tensors), branches


class _Library:
    """Bytes of the library built for a plan on the device profile. Each plan is built once; sizes are cached
    under EDGEQ_CACHE keyed by the plan, the weights' shapes, the target, TVM's version and the TVM lowering's
    own source (a build is deterministic, so the same key is the same size)."""

    def __init__(self, zero_graph: Graph, profile, ndk_clang: str | None):
        self.graph = zero_graph
        self.profile = profile
        self.ndk_clang = ndk_clang
        self.target = resolve_target(profile)
        self.dot = dot_kind(self.target)        # the export's integer kernels (VNNI int4/int8 differ in code size)
        self.sizes: dict[str, int] = {}
        self.context = [LAYOUT_VERSION, self.target, library_kind(profile, ndk_clang), ndk_clang, _tvm_version(),
                        _lowering_digest(), zero_graph.config.to_json(),
                        [[n, list(t.shape)] for n, t in zero_graph.weights.items()]]

    def bytes(self, plan: Plan, ranks: dict[str, int]) -> int:
        key = json.dumps([[n, plan.tensors[n].format, ranks.get(n, 0)] for n in self.graph.weights])
        if key in self.sizes:
            return self.sizes[key]
        path = self._cache_path(key)
        cached = read_json_entry(path)      # None when absent, or torn (then removed): built again
        if isinstance(cached, dict) and type(cached.get("bytes")) is int and cached["bytes"] > 0:
            self.sizes[key] = cached["bytes"]
            return self.sizes[key]
        mod = lower_tvm(self.graph, plan, branches=_zero_branches(self.graph, ranks), sizing=True, dot=self.dot,
                        fused_attention=self.target.get("kind") == "llvm",
                        gpu=self.target.get("kind") == "cuda").mod     # as target.py lowers it
        ex = compile_module(mod, self.target, None)
        with tempfile.TemporaryDirectory(prefix="edgeq-tvm-size-") as d:
            self.sizes[key] = export_library(ex, Path(d) / "model", self.profile, self.ndk_clang).stat().st_size
        write_json_entry(path, {"bytes": self.sizes[key]})
        return self.sizes[key]

    def _cache_path(self, key: str) -> Path | None:
        root = cache_dir()
        if root is None:
            return None
        digest = hashlib.sha256(json.dumps([self.context, key], sort_keys=True, default=str).encode()).hexdigest()
        return root / "tvm-library-size" / f"{digest[:32]}.json"


def _tvm_version() -> str:
    import tvm

    return str(getattr(tvm, "__version__", "unknown"))


@functools.lru_cache(maxsize=1)
def _lowering_digest() -> str:
    """SHA-256 of the TVM target's own sources: a change to the lowering or the schedule changes the library."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
