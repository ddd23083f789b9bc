"""calibrate: input statistics of every linear layer, from calibration text run through the reference executor.

Per distinct linear input (q/k/v share one, gate/up share one) it keeps the
token count, the sum of squares per input channel (llama.cpp's importance
matrix is exactly that: `in_sum2` / `counts`) and, where the width allows
(`max_full`, or named in `full_for` whatever their width), the full sum of
outer products, so that E[xxᵀ] is available to the sensitivity pass, to
low-rank compensation and to the MLP channel ordering. With `defer_full` those
full sums are not held: they are recomputed one input at a time when asked
for (`Calibration.full`, passes/calibrate_replay.py), for a reader that needs
each only briefly (GPTQ's pricing). The tied embedding,
which is also the output head, gets the head's input statistics plus the
token counts of the lookups. It also keeps, per layer, the mean cosine between
the residual stream entering and leaving the layer (UniQL's layer importance).

Calibration text is the user's (`--calib-text`, `--calib-jsonl`: a
`CalibrationText`), else `edgeq.texts.calibration_text()` (disjoint from the
evaluation text), cut into llama-imatrix-style windows (first token replaced
by BOS); `subset=(i, n)` takes the i-th of n disjoint sets of windows (to
measure how much a result depends on the text). Results are cached on disk
by (source model, the text's SHA-256, windows, width limit, subset), so
repeated plans and exports cost one calibration.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.core.cache import cache_dir, read_entry, write_entry
from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.fs import sha256_file, sha256_source
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.importers.calibration_text import CalibrationText, default_calibration_text
from edgeq.importers.imatrix import Imatrix, ImatrixEntry, read_imatrix
from edgeq.importers.loader import graph_tokenizer_spec
from edgeq.models import llama
from edgeq.passes.base import Context, Pass
from edgeq.passes.calibrate_replay import MomentReplay
from edgeq.runtime.tokenizer import build_tokenizer, encode, render_chat

CALIBRATION_VERSION = 2
DEFAULT_WINDOWS = 4
DEFAULT_CTX = 512
DEFAULT_MAX_FULL = 2048


@dataclass
class InputStats:
    """Second moments of one linear input (float64 sums over `n` tokens)."""

    n: int
    sum_sq: np.ndarray                     # (width,)
    sum_outer: np.ndarray | None = None    # (width, width), float64, or None when only the diagonal is kept
    sum: np.ndarray | None = None          # (width,) first moments (None: an imatrix file, or an older cache entry)

    @property
    def width(self) -> int:
        return int(self.sum_sq.shape[0])

    def diag(self) -> np.ndarray:
        """E[x_j²]: llama.cpp's importance-matrix values for this input."""
        return self.sum_sq / max(self.n, 1)

    def importance(self) -> np.ndarray:
        """float32 in_sum2 / counts, computed the way llama-quantize does from an imatrix file."""
        return self.sum_sq.astype(np.float32) / np.float32(max(self.n, 1))

    def full(self) -> np.ndarray | None:
        return None if self.sum_outer is None else self.sum_outer / max(self.n, 1)

    def mean(self) -> np.ndarray | None:
        """E[x_j] (pruning's mean compensation: a removed channel's average contribution goes into a bias)."""
        return None if self.sum is None else self.sum / max(self.n, 1)


@dataclass
class Calibration:
    """Per linear weight (canonical name): the statistics of the input it multiplies."""

    inputs: dict[str, InputStats]                 # by input key (the IR value name, or "file:<name>")
    weight_input: dict[str, str]                  # weight canonical name -> input key
    token_counts: np.ndarray | None = None        # lookups per token id (embedding), if known
    info: dict[str, Any] = field(default_factory=dict)   # provenance: text, windows, ctx, tokens, source ...
    layer_cos: np.ndarray | None = None           # per layer, mean cos(residual in, residual out) over tokens
    # inputs whose full sum of outer products is not held but recomputed when asked for (`full`), by `replay`
    deferred: frozenset[str] = frozenset()
    replay: MomentReplay | None = field(default=None, repr=False, compare=False)

    def stats(self, weight: str) -> InputStats | None:
        key = self.weight_input.get(weight)
        return None if key is None else self.inputs[key]

    def has_full(self, weight: str) -> bool:
        """Whether `full` gives the weight's input covariance (held, or recomputed on demand)."""
        key = self.weight_input.get(weight)
        return key is not None and (self.inputs[key].sum_outer is not None
                                    or key in self.deferred and self.replay is not None)

    def full(self, weight: str) -> np.ndarray | None:
        """E[xxᵀ] of the weight's input (float64): the held sums', or recomputed now (a new matrix each call: a
        reader of deferred covariances holds one while it needs it)."""
        key = self.weight_input.get(weight)
        if key is None:
            return None
        s = self.inputs[key]
        if s.sum_outer is None and key in self.deferred and self.replay is not None:
            h = self.replay.sum_outer(key)
            h /= max(s.n, 1)
            return h
        return s.full()

    def reindexed(self, columns: dict[str, np.ndarray]) -> "Calibration":
        """The statistics of a model whose weights named in `columns` read only those input channels, in that
        order (a permuted and possibly narrowed input; the MLP orderings and widths of pruning)."""
        inputs, weight_input = dict(self.inputs), dict(self.weight_input)
        for weight, idx in columns.items():
            key = weight_input[weight]
            s = inputs[key]
            weight_input[weight] = new = f"{key}[{weight}]" if not key.endswith(f"[{weight}]") else key
            inputs[new] = InputStats(s.n, s.sum_sq[idx], None if s.sum_outer is None else s.sum_outer[np.ix_(idx, idx)],
                                     None if s.sum is None else s.sum[idx])
        used = set(weight_input.values())
        inputs = {k: v for k, v in inputs.items() if k in used}
        return Calibration(inputs, weight_input, self.token_counts, self.info, self.layer_cos)

    def rotated(self, maps: dict[str, np.ndarray]) -> "Calibration":
        """The statistics of a model whose weights named in `maps` read x' = Mᵀx instead of x (M square, applied
        to their input: attention pruning's V/O rotation seen from the output projection). Needs the full
        covariance of those inputs."""
        inputs, weight_input = dict(self.inputs), dict(self.weight_input)
        for weight, m in maps.items():
            key = weight_input[weight]
            s = inputs[key]
            if s.sum_outer is None:
                raise EdgeqError(None, f"{weight}: rotating its input needs the full covariance of it (calibration)")
            outer = m.T @ s.sum_outer @ m
            weight_input[weight] = new = f"{key}[{weight}]" if not key.endswith(f"[{weight}]") else key
            inputs[new] = InputStats(s.n, np.maximum(np.diag(outer), 0.0), outer, None if s.sum is None else m.T @ s.sum)
        used = set(weight_input.values())
        return Calibration({k: v for k, v in inputs.items() if k in used}, weight_input, self.token_counts, self.info,
                           self.layer_cos)

    def imatrix(self) -> dict[str, np.ndarray]:
        """Canonical weight name -> importance (E[x²], float32), what ggml's quantizers take."""
        return {w: self.inputs[k].importance() for w, k in self.weight_input.items()}

    def to_json(self) -> dict[str, Any]:
        """What the manifest and the plan record about the calibration."""
        full = sum(1 for k, s in self.inputs.items() if s.sum_outer is not None or k in self.deferred)
        return {**self.info, "linear_weights": len(self.weight_input), "inputs": len(self.inputs),
                "inputs_with_full_covariance": full}

    # --- cache -------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The statistics as an .npz (no pickles), for the cache."""
        arrays: dict[str, np.ndarray] = {}
        keys = sorted(self.inputs)
        for i, k in enumerate(keys):
            s = self.inputs[k]
            arrays[f"n{i}"] = np.array(s.n)
            arrays[f"sq{i}"] = s.sum_sq
            if s.sum_outer is not None:
                arrays[f"outer{i}"] = s.sum_outer
            if s.sum is not None:
                arrays[f"sum{i}"] = s.sum
        if self.token_counts is not None:
            arrays["token_counts"] = self.token_counts
        if self.layer_cos is not None:
            arrays["layer_cos"] = self.layer_cos
        meta = {"keys": keys, "weight_input": self.weight_input, "info": self.info}
        if self.deferred:
            meta["deferred"] = sorted(self.deferred)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Calibration":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            inputs = {}
            for i, k in enumerate(meta["keys"]):
                inputs[k] = InputStats(int(z[f"n{i}"]), z[f"sq{i}"], z[f"outer{i}"] if f"outer{i}" in z else None,
                                       z[f"sum{i}"] if f"sum{i}" in z else None)
            counts = z["token_counts"] if "token_counts" in z else None
            cos = z["layer_cos"] if "layer_cos" in z else None
        return cls(inputs, meta["weight_input"], counts, meta["info"], cos, frozenset(meta.get("deferred", ())))


MIN_TOKENS = 64              # below this a calibration says nothing about a layer's inputs


def calibration_windows(tokens: list[int], ctx: int, n_windows: int, bos_id: int | None, add_bos: bool,
                        source=None, subset: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """`n_windows` windows of `ctx` tokens spread evenly over the text, BOS first like llama-imatrix; text shorter
    than one window is one shorter window.

    `subset=(i, n)`: n x n_windows windows are spread over the text and this is every n-th of them from the i-th,
    so the n subsets are disjoint and each covers the whole text."""
    which, n_sets = subset
    if not 0 <= which < n_sets:
        raise EdgeqError(None, f"calibration subset {which} of {n_sets} does not exist")
    available = len(tokens) // ctx
    if available < 1 and n_sets == 1:
        if len(tokens) < MIN_TOKENS:
            raise EdgeqError(getattr(source, "path", None), f"calibration text has {len(tokens)} tokens, fewer "
                                                            f"than the {MIN_TOKENS} edgeq needs ({n_windows * ctx} "
                                                            "recommended)")
        ctx, available = len(tokens), 1
    if available < n_sets:
        raise EdgeqError(getattr(source, "path", None), f"calibration text has {len(tokens)} tokens, fewer than "
                                                        f"{n_sets} windows of {ctx} (--calib-subset)")
    n = min(n_windows * n_sets, available)
    n -= n % n_sets
    starts = [int(round(i * (available - 1) / max(n - 1, 1))) * ctx for i in range(n)] if n > 1 else [0]
    starts = starts[which::n_sets]
    out = []
    for s in starts:
        w = list(tokens[s:s + ctx])
        if add_bos and bos_id is not None:
            w[0] = bos_id
        out.append(w)
    return out


def collect(graph: Graph, windows: list[list[int]], max_full: int = DEFAULT_MAX_FULL,
            progress: Callable | None = None, full_for: frozenset[str] = frozenset(),
            defer_full: bool = False) -> Calibration:
    """Run the windows through the reference executor and accumulate every linear input's moments (the full
    covariance of inputs up to `max_full` wide and of the weights named in `full_for`; with `defer_full` those
    are left to a replay, see the module docstring), and each layer's cosine between its residual input and
    output."""
    inputs: dict[str, InputStats] = {}
    deferred: set[str] = set()
    weight_input: dict[str, str] = {}
    owner: dict[str, str] = {}

    def observe(node, args) -> None:
        key, weight = node.inputs[0], node.inputs[1]
        weight_input[weight] = key
        # q/k/v (and gate/up) multiply the same input: only the first of them counts it
        if owner.setdefault(key, weight) != weight:
            return
        x = np.asarray(args[0], dtype=np.float32)
        s = inputs.get(key)
        if s is None:
            width = x.shape[-1]
            full = width <= max_full or weight in full_for
            if full and defer_full:
                deferred.add(key)
            s = inputs[key] = InputStats(0, np.zeros(width), np.zeros((width, width)) if full and not defer_full
                                         else None, np.zeros(width))
        s.n += x.shape[0]
        s.sum_sq += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        s.sum += x.sum(axis=0, dtype=np.float64)
        if s.sum_outer is not None:
            s.sum_outer += x.T @ x

    # The residual stream at each layer boundary is what the norm opening the next layer (or the final norm)
    # reads; windows pass each node in order, so the k-th call at a boundary is the k-th window.
    boundary = {w: i for i, w in enumerate(llama.residual_norms(graph))} if graph.arch == "llama" else {}
    streams: dict[int, list[np.ndarray]] = {}
    cos_sum = np.zeros(max(len(boundary) - 1, 0))
    cos_n = 0

    def observe_norm(node, args) -> None:
        nonlocal cos_n
        b = boundary.get(node.inputs[1])
        if b is None:
            return
        x = np.asarray(args[0], dtype=np.float64)
        here = streams.setdefault(b, [])
        if b > 0:
            prev = streams[b - 1][len(here)]
            cos = np.einsum("ij,ij->i", prev, x) / np.maximum(np.linalg.norm(prev, axis=1) * np.linalg.norm(x, axis=1),
                                                              1e-30)
            cos_sum[b - 1] += cos.sum()
            if b == 1:
                cos_n += len(cos)
        here.append(x)
        if b > 0 and len(here) == len(windows):
            del streams[b - 1]

    # Streamed: every weight is loaded once for all windows and dropped, so calibrating costs about one
    # layer of float weights however big the model.
    ex = Executor(graph, observers={"linear": observe, "rms_norm": observe_norm}, cache_weights=False)
    # The output head's product (vocab-wide logits) is the costliest node and only its input
    # matters here: stop before it and observe that input directly.
    graph_outputs = {v.name for v in graph.outputs}
    heads = [n for n in graph.nodes if n.op == "linear" and n.outputs[0] in graph_outputs]
    head_inputs = tuple(dict.fromkeys(n.inputs[0] for n in heads))
    vocab = graph.weights[_embedding_name(graph)].shape[0]
    counts = np.zeros(vocab, dtype=np.int64)
    envs: list = []
    for _ in ([0] if progress is None else progress([0], desc=f"calibrate ({len(windows)} windows)", unit="pass")):
        envs = ex.run_many(windows, outputs=head_inputs)
    for w, env in zip(windows, envs):
        for n in heads:
            observe(n, [env[n.inputs[0]]])
        counts += np.bincount(np.asarray(w), minlength=vocab)
    # sum_outer was accumulated from float32 products; symmetrise the rounding away.
    for s in inputs.values():
        if s.sum_outer is not None:
            s.sum_outer = (s.sum_outer + s.sum_outer.T) / 2
    return Calibration(inputs, weight_input, counts, {"windows": len(windows), "ctx": len(windows[0]),
                                                       "tokens": int(sum(len(w) for w in windows))},
                       cos_sum / cos_n if cos_n else None, frozenset(deferred),
                       MomentReplay(graph, windows) if deferred else None)


def _embedding_name(graph: Graph) -> str:
    for node in graph.nodes:
        if node.op == "embedding":
            return node.inputs[1]
    raise EdgeqError(None, "the model has no embedding node")


def calibration_tokens(graph: Graph, source: CalibrationText | None = None) -> tuple[list[int], int | None, bool]:
    """The calibration text tokenized with the model's own tokenizer (llama.cpp's ids); a chat source rendered
    conversation by conversation through the model's template, its special tokens parsed (as on the device)."""
    source = source or default_calibration_text()
    spec = graph_tokenizer_spec(graph)
    tok = build_tokenizer(spec)
    if source.kind != "jsonl":
        return encode(tok, spec, source.text(), add_special=True, parse_special=False), spec.bos_id, spec.add_bos
    if spec.chat_template is None:
        raise EdgeqError(source.path, "--calib-jsonl renders conversations with the model's chat template, and "
                                      "this model has none (use --calib-text)")
    ids: list[int] = []
    for conv in source.conversations():
        ids += encode(tok, spec, render_chat(spec, conv, add_generation_prompt=False), add_special=True,
                      parse_special=True)
    return ids, spec.bos_id, spec.add_bos


def shortfall_note(n_tokens: int, n_windows: int, ctx: int, source: CalibrationText | None) -> str | None:
    """A warning when the text holds fewer tokens than the windows asked for."""
    wanted = n_windows * ctx
    if n_tokens >= wanted:
        return None
    name = (source or default_calibration_text()).name
    return (f"warning: calibration text {name} has {n_tokens} tokens, fewer than the {wanted} recommended "
            f"({n_windows} windows of {ctx}); the statistics rest on less text")


def source_digest(graph: Graph) -> str:
    """SHA-256 of the source file or folder when there is one (with the merged adapters), else of the weights."""
    src = graph.metadata.get("source_path")
    if src and Path(src).exists():
        digest = sha256_source(src)
        adapters = graph.metadata.get("adapters")
        if adapters:     # a merged adapter changes every statistic downstream of it
            listing = json.dumps([digest] + [[a["sha256"], a["config_sha256"], a["weight"]] for a in adapters])
            digest = hashlib.sha256(listing.encode()).hexdigest()
        return digest
    h = hashlib.sha256()
    for name, t in graph.weights.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()


def calibrate(graph: Graph, n_windows: int = DEFAULT_WINDOWS, ctx: int = DEFAULT_CTX, max_full: int = DEFAULT_MAX_FULL,
              progress: Callable | None = None, use_cache: bool = True, source: CalibrationText | None = None,
              warn: Callable[[str], None] | None = None, full_for: frozenset[str] = frozenset(),
              subset: tuple[int, int] = (0, 1), means: bool = False, defer_full: bool = False) -> Calibration:
    """Calibration statistics for `graph`, from the cache when the same ones were computed before. `warn` hears
    when the text is shorter than the windows asked for. `means`: the first moments are needed (a cached entry
    without them is computed again). `defer_full`: full covariances recomputed when read (`Calibration.full`), not
    held; what the calibration records is the same."""
    source = source or default_calibration_text()
    text_sha = source.sha256 if source.is_default else f"{source.kind}:{source.sha256}"   # one file, two readings
    src = source_digest(graph)
    key = hashlib.sha256(json.dumps([CALIBRATION_VERSION, src, text_sha, n_windows, ctx, max_full, sorted(full_for),
                                     list(subset)] + (["deferred"] if defer_full else [])).encode()).hexdigest()
    root = cache_dir() if use_cache else None
    path = None if root is None else root / "calibration" / f"{key[:32]}.npz"
    cached = read_entry(path)       # None when absent, or torn (then removed): computed again
    if cached is not None:
        try:
            cal = Calibration.from_bytes(cached)
            # entries written before first moments were kept lack them: computed again (and rewritten) when needed
            if not means or all(s.sum is not None for s in cal.inputs.values()):
                if warn is not None and cal.info.get("warning"):
                    warn(cal.info["warning"])
                if cal.deferred:
                    tokens, bos, add_bos = calibration_tokens(graph, source)
                    cal.replay = MomentReplay(graph, calibration_windows(tokens, ctx, n_windows, bos, add_bos,
                                                                         source, subset))
                return cal
        except (OSError, ValueError, KeyError):
            pass
    tokens, bos, add_bos = calibration_tokens(graph, source)
    note = shortfall_note(len(tokens), n_windows, ctx, source)
    if note is not None and warn is not None:
        warn(note)
    windows = calibration_windows(tokens, ctx, n_windows, bos, add_bos, source, subset)
    cal = collect(graph, windows, max_full, progress, full_for, defer_full)
    cal.info.update({"source": "edgeq calibrate", **source.record(), "model_sha256": src, "max_full_width": max_full})
    if note is not None:
        cal.info["warning"] = note
    if subset != (0, 1):
        cal.info["subset"] = f"{subset[0]}/{subset[1]}"
    if path is not None:
        write_entry(path, cal.to_bytes())        # best effort: caching is an optimisation only
    return cal


def imatrix_from_calibration(graph, cal) -> Imatrix:
    """A llama.cpp imatrix from edgeq's calibration (raw sums and token counts, GGUF names)."""
    entries = {}
    for weight, key in cal.weight_input.items():
        t = graph.weights[weight]
        s = cal.inputs[key]
        entries[t.alias or llama.gguf_name(weight)] = ImatrixEntry(s.sum_sq.astype(np.float32), np.array([s.n]))
    info = cal.info
    return Imatrix(entries, [str(info.get("text", "edgeq calibration text"))], int(info.get("windows", 0)),
                   int(info.get("ctx", 0)))


def calibration_from_imatrix(graph, im: Imatrix, source: str | os.PathLike | None = None):
    """A diagonal-only Calibration from an imatrix, keyed by the graph's canonical names.

    Entries for tensors the model does not have, or of the wrong width, are an
    error (llama-quantize refuses a size mismatch too); weights without an
    entry are quantized without an importance matrix, as llama.cpp does.
    """
    by_alias = {(t.alias or llama.gguf_name(n)): n for n, t in graph.weights.items() if len(t.shape) == 2}
    inputs, weight_input = {}, {}
    for name, e in im.entries.items():
        canonical = by_alias.get(name)
        if canonical is None:
            raise EdgeqError(source, f"imatrix entry {name} names no 2-D weight of this model")
        width = graph.weights[canonical].shape[-1]
        if e.counts.size != 1 or e.sums.size != width:
            raise EdgeqError(source, f"imatrix entry {name} has {e.sums.size} values, the weight has {width} columns")
        if e.counts[0] > 0:
            n, sums = int(e.counts[0]), e.sums.astype(np.float64)
        else:                                   # nothing counted: llama.cpp uses ones
            n, sums = 1, np.ones(width)
        key = f"file:{name}"
        inputs[key] = InputStats(n, sums, None)
        weight_input[canonical] = key
    info = {"source": "imatrix file", "path": None if source is None else os.fspath(source),
            "datasets": im.datasets, "chunk_count": im.chunk_count, "chunk_size": im.chunk_size,
            "legacy_format": im.legacy, "entries": len(im.entries)}
    if source is not None:
        info["sha256"] = sha256_file(source)
    return Calibration(inputs, weight_input, None, info)


class Calibrate(Pass):
    """Analysis pass: puts a `Calibration` in ctx.analysis['calibration'] (the plan is unchanged)."""

    name = "calibrate"

    def __init__(self, n_windows: int = DEFAULT_WINDOWS, ctx: int = DEFAULT_CTX, max_full: int = DEFAULT_MAX_FULL,
                 imatrix_file: str | None = None, source: CalibrationText | None = None,
                 full_for: frozenset[str] = frozenset(), subset: tuple[int, int] = (0, 1), means: bool = False,
                 defer_full: bool = False):
        """`means`: the first moments are needed (--prune-compensate); `defer_full`: see `calibrate`."""
        self.source = source
        self.means = means
        self.defer_full = defer_full
        self.n_windows = n_windows
        self.ctx_len = ctx
        self.max_full = max_full
        self.imatrix_file = imatrix_file
        self.full_for = full_for
        self.subset = subset

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        if self.imatrix_file:
            cal = calibration_from_imatrix(graph, read_imatrix(self.imatrix_file), self.imatrix_file)
        else:
            cal = calibrate(graph, self.n_windows, self.ctx_len, self.max_full, ctx.progress, source=self.source,
                            warn=ctx.warn, full_for=self.full_for, subset=self.subset, means=self.means,
                            defer_full=self.defer_full)
        ctx.analysis["calibration"] = cal
        ctx.record(self.name, **cal.to_json())
        return graph, plan

