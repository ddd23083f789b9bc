"""What a plan asks of a device: its matrix products (weight, shape, format) and the architecture around them.

The predictor never looks at weights' values, only at this: a decoder's config, the format of every weight
its runtime multiplies with (the tied embedding is the output head), the context the runtime allocates and
the KV-cache type; an encoder's config and the format of every linear layer, where a layer whose q, k and v
the runtime multiplies as one kernel with its attention (ONNX's QAttention) counts as one product of the
fused format `qattention:FORMAT` (3·hidden x hidden), named for the query. It comes from a graph and a
finished plan (planning, export), or from a bundle's manifest (`edgeq predict BUNDLE`), so a plan is predicted
the same way before and after it is built.

A CNN's workload (`CnnWorkload`) is each conv's and linear's multiply-adds at batch 1 and format, and the activations
its plan quantizes: what the per-layer table (cnn_table.py) prices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.core.plan import Plan
from edgeq.core.plan import TensorPlan
from edgeq.importers.loader import graph_tokenizer_spec
from edgeq.models import bert, llama, names
from edgeq.models.cnn import WEIGHT_OPS, mixed_activations, spatial_shapes
from edgeq.targets.registry import get_target

FUSED_QKV = "qattention:"          # the format prefix of an encoder layer's fused q, k, v and attention
QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
ENCODER_ROLES = QKV + ("attention.output.dense", "intermediate.dense", "output.dense")


@dataclass(frozen=True)
class MatMul:
    """One weight the runtime multiplies activations with: its canonical name, (rows, cols) and format."""

    weight: str
    rows: int
    cols: int
    format: str


def stored_format(fmt: str) -> str:
    """The weight format behind a workload's kernel format (a fused QAttention's weights are `int8`...)."""
    return fmt.removeprefix(FUSED_QKV)


@dataclass
class Workload:
    """A decoder or encoder plan as the device sees it (an encoder: n_kv_heads = n_heads, no KV cache)."""

    hidden: int
    ffn: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    matmuls: list[MatMul]
    n_ctx: int
    kv_dtype: str = "f16"
    file_bytes: int = 0                      # the model files a runtime maps (0: unknown)
    aliases: dict[str, str] = field(default_factory=dict)   # the runtime's weight names -> canonical names
    kind: str = "decoder"                    # decoder | encoder
    tokenizer_entries: int = 0               # a decoder's vocabulary tokens + BPE merges (0: unknown)

    @property
    def weight_bytes(self) -> int:
        return sum(get_format(stored_format(m.format)).nbytes((m.rows, m.cols)) for m in self.matmuls)

    def kv_bytes(self, cell_multiple: int = 1) -> int:
        """The KV cache the runtime allocates for n_ctx tokens, in whole multiples of `cell_multiple` tokens (none
        in an encoder)."""
        if self.kind != "decoder":
            return 0
        per = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}.get(self.kv_dtype, 2.0)
        cells = -(-self.n_ctx // cell_multiple) * cell_multiple
        return int(2 * self.n_layers * self.n_kv_heads * self.head_dim * cells * per)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["matmuls"] = [[m.weight, m.rows, m.cols, m.format] for m in self.matmuls]
        if self.kind == "decoder":
            del d["kind"]                   # decoder profiles' digests stay what they were
        if not self.tokenizer_entries:
            del d["tokenizer_entries"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Workload":
        d = dict(d)
        d["matmuls"] = [MatMul(*m) for m in d["matmuls"]]
        return cls(**d)


@dataclass(frozen=True)
class CnnLayer:
    """One conv or linear of a CNN: its weight's name, multiply-adds of one image, format."""

    weight: str
    macs: int
    format: str


@dataclass
class CnnWorkload:
    """A CNN plan as the device sees it (batch 1): its layers in graph order and how many activations the plan
    quantizes (a Q/DQ pair each)."""

    layers: list[CnnLayer]
    n_quantized: int
    file_bytes: int = 0
    kind: str = "cnn"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": [[l.weight, l.macs, l.format] for l in self.layers],
                "n_quantized": self.n_quantized, "file_bytes": self.file_bytes}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CnnWorkload":
        return cls([CnnLayer(str(w), int(m), str(f)) for w, m, f in d["layers"]], int(d["n_quantized"]),
                   int(d.get("file_bytes", 0)))


def workload_from_json(d: dict[str, Any]) -> "Workload | CnnWorkload":
    return CnnWorkload.from_json(d) if d.get("kind") == "cnn" else Workload.from_json(d)


def cnn_workload(graph: Graph, plan: Plan, file_bytes: int = 0, source: str | None = None) -> CnnWorkload:
    """A CNN graph's workload under `plan`: a conv's MACs are its weight's size times its output pixels (grouped
    convs included: the weight holds in/groups channels), a linear's its weight's size; the quantized activations
    are those a mixed int8/float plan writes Q/DQ pairs for (models/cnn.mixed_activations), as the search's table
    counts them."""
    shapes = spatial_shapes(graph)
    layers = []
    for n in graph.nodes:
        if n.op not in WEIGHT_OPS:
            continue
        name = n.inputs[1]
        if name not in plan.tensors:
            raise EdgeqError(source, f"the plan gives no format for {name}")
        size = int(np.prod(graph.weights[name].shape))
        pixels = 1
        if n.op == "conv2d":
            _, h, w = shapes[n.outputs[0]]
            pixels = h * w
        layers.append(CnnLayer(name, size * pixels, plan.tensors[name].format))
    int8 = {l.weight for l in layers if l.format == "int8"}
    return CnnWorkload(layers, len(mixed_activations(graph, int8)), int(file_bytes))


def tokenizer_entries(spec) -> int:
    """A decoder tokenizer's vocabulary tokens and BPE merges: what loading it costs in proportion to."""
    return 0 if spec is None else len(spec.tokens) + len(spec.merges)


def layer_role(weight: str, n_layers: int) -> str:
    """A weight's name with its layer index written as `last` (the model's last layer) or `i` (any other): what
    decides whether a runtime computes the weight's product for every token of a prefill or only for those whose
    logits are asked for (llama.cpp's last MLP and head)."""
    parts = weight.split(".")
    for k, p in enumerate(parts[:-1]):
        if p.isdigit() and k and parts[k - 1] == "layers":
            parts[k] = "last" if int(p) == n_layers - 1 else "i"
            break
    return ".".join(parts)


def decoder_workload(config: llama.LlamaConfig, formats: dict[str, str], n_ctx: int, kv_dtype: str = "f16",
                     file_bytes: int = 0, source: str | None = None, mlp_widths: list[int] | None = None,
                     tokenizer_entries: int = 0) -> Workload:
    """The workload of a Llama-family decoder whose 2-D weights are written in `formats` (canonical names);
    `mlp_widths`: each layer's MLP channels when pruned (the ops around the MLPs then see their mean width, which
    is exact for costs linear in the width)."""
    shapes = dict(llama.expected_shapes(config))
    ffn = config.intermediate_size
    if mlp_widths is not None:
        for i, k in enumerate(mlp_widths):
            gate, up, down = llama.mlp_weights(i)
            shapes[gate], shapes[up] = (k, shapes[gate][1]), (k, shapes[up][1])
            shapes[down] = (shapes[down][0], k)
        ffn = max(1, round(sum(mlp_widths) / len(mlp_widths)))
    head = names.EMBED if config.tied_embeddings else names.LM_HEAD
    matmuls = []
    for name, shape in shapes.items():
        if len(shape) != 2 or (name == names.EMBED and not config.tied_embeddings):
            continue                    # 1-D tensors; an untied embedding is only looked up
        if name not in formats:
            raise EdgeqError(source, f"the plan gives no format for {name}")
        matmuls.append(MatMul(name, int(shape[0]), int(shape[1]), formats[name]))
    # the head last, as the runtime runs it
    matmuls.sort(key=lambda m: m.weight == head)
    return Workload(hidden=config.hidden_size, ffn=ffn, n_layers=config.n_layers,
                    n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                    vocab=config.vocab_size, matmuls=matmuls, n_ctx=int(n_ctx), kv_dtype=kv_dtype,
                    file_bytes=int(file_bytes), aliases={llama.gguf_name(n): n for n in shapes},
                    tokenizer_entries=int(tokenizer_entries))


def encoder_workload(config: bert.BertConfig, plans: dict[str, TensorPlan], backend: str, file_bytes: int = 0,
                     source: str | None = None) -> Workload:
    """The workload of a BERT encoder whose linear layers are planned `plans` (canonical names), on `backend`
    (which decides what it fuses). The embeddings are looked up, not multiplied: their cost is the other ops'."""
    target = get_target(backend)
    h, f = config.hidden_size, config.intermediate_size
    matmuls = []
    for i in range(config.n_layers):
        p = f"encoder.layer.{i}."
        for role in ENCODER_ROLES:
            if p + role + ".weight" not in plans:
                raise EdgeqError(source, f"the plan gives no format for {p + role}.weight")
        qkv = [plans[p + r + ".weight"] for r in QKV]
        if target.fused_qkv(qkv):
            matmuls.append(MatMul(p + QKV[0] + ".weight", 3 * h, h, FUSED_QKV + qkv[0].format))
            roles = ENCODER_ROLES[3:]
        else:
            roles = ENCODER_ROLES
        for role in roles:
            rows, cols = (f, h) if role == "intermediate.dense" else (h, f) if role == "output.dense" else (h, h)
            matmuls.append(MatMul(p + role + ".weight", rows, cols, plans[p + role + ".weight"].format))
    return Workload(hidden=h, ffn=f, n_layers=config.n_layers, n_heads=config.n_heads, n_kv_heads=config.n_heads,
                    head_dim=config.head_dim, vocab=config.vocab_size, matmuls=matmuls,
                    n_ctx=min(config.context_length, config.max_positions),     # longer inputs are truncated
                    kv_dtype="none", file_bytes=int(file_bytes), kind="encoder")


def graph_workload(graph: Graph, plan: Plan, n_ctx: int, kv_dtype: str = "f16", file_bytes: int = 0,
                   backend: str = "onnx") -> "Workload | CnnWorkload":
    """`backend`: the runtime an encoder runs on (what it fuses); decoders do not need it."""
    if graph.kind == "encoder" and graph.arch == "bert":
        return encoder_workload(graph.config, plan.tensors, backend, file_bytes)
    if graph.kind == "cnn":
        return cnn_workload(graph, plan, file_bytes)
    if graph.kind != "decoder":
        raise EdgeqError(None, f"latency prediction covers decoders, BERT encoders and CNNs for now; this is a "
                               f"{graph.arch} {graph.kind}")
    formats = {n: plan.tensors[n].format for n in graph.weights if n in plan.tensors}
    widths = llama.mlp_widths(graph)
    return decoder_workload(graph.config, formats, n_ctx, kv_dtype, file_bytes,
                            mlp_widths=None if widths == [graph.config.intermediate_size] * len(widths) else widths,
                            tokenizer_entries=tokenizer_entries(graph_tokenizer_spec(graph)))


def bundle_workload(bundle: str | Path, backend: str | None = None) -> tuple[Workload, str, dict[str, Any]]:
    """A bundle's workload for one of its backends (default: its first model artifact), that backend, and the
    manifest."""
    from edgeq.runtime import bundle_spec
    from edgeq.runtime.manifest import pick_artifact, read_manifest

    bundle = Path(bundle)
    m = read_manifest(bundle)
    art = pick_artifact(bundle, m, backend)
    backend = art["backend"]
    model = m.get("model") or {}
    plan = (m.get("plans") or {}).get(backend) or m["plan"]
    formats = {n: t["format"] for n, t in plan["tensors"].items()}
    files = sum(int(a["bytes"]) for a in m["artifacts"] if a.get("backend") == backend)
    if model.get("kind") == "encoder" and model.get("arch") == "bert":
        try:
            config = bert.BertConfig.from_json(model["config"])
            plans = {n: TensorPlan(t["format"], act_range=t.get("act_range")) for n, t in plan["tensors"].items()}
        except (KeyError, TypeError) as exc:
            raise EdgeqError(bundle / "manifest.json", f"model config or plan unreadable ({exc})") from None
        return encoder_workload(config, plans, backend, files, source=str(bundle / "manifest.json")), backend, m
    if model.get("kind") == "cnn":
        raise EdgeqError(bundle, "a CNN bundle's manifest does not give its layers' shapes: its prediction is the "
                                 "manifest's `predicted` (export with --latency-profile), or predict its plan "
                                 "(edgeq predict PLAN --model MODEL)")
    if model.get("kind") != "decoder":
        raise EdgeqError(bundle, f"latency prediction covers decoders and BERT encoders for now; this bundle holds "
                                 f"a {model.get('arch')} {model.get('kind')}")
    try:
        config = llama.LlamaConfig.from_json(model["config"])
    except (KeyError, TypeError) as exc:
        raise EdgeqError(bundle / "manifest.json", f"model config unreadable ({exc})") from None
    keeps = [(plan["tensors"].get(llama.mlp_weights(i)[0]) or {}).get("keep") for i in range(config.n_layers)]
    widths = [k if isinstance(k, int) and k > 0 else config.intermediate_size for k in keeps]
    w = decoder_workload(config, formats, int(m.get("n_ctx") or 2048), m.get("kv_cache_dtype") or "f16", files,
                         source=str(bundle / "manifest.json"),
                         mlp_widths=widths if any(k is not None for k in keeps) else None,
                         tokenizer_entries=tokenizer_entries(bundle_spec(bundle, m)))
    return w, backend, m
