"""Write IR + plan as a GGUF file for llama.cpp, one tensor at a time.

Tensor infos are declared first (their byte sizes come from the format
registry), then each tensor is loaded, quantized with ggml's own code and
streamed out, so peak memory is about one float copy of the largest tensor.
Nothing host- or time-dependent goes into the file: same inputs, same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph, Tensor
from edgeq.core.plan import Plan, TensorPlan
from edgeq.models import llama
from edgeq.targets.gguf.presets import preset_file_type

# llama_ftype for a "mostly <type>" file: what general.file_type says when no preset names it.
MOSTLY_FTYPE = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
    "q3_k": 12, "q4_k": 15, "q5_k": 17, "q6_k": 18, "bf16": 32,
}


def file_type(plan: Plan, graph: Graph) -> int:
    if plan.preset:
        return preset_file_type(plan.preset)
    counts: dict[str, int] = {}
    for name, tp in plan.tensors.items():
        if len(graph.weights[name].shape) == 2:
            counts[tp.format] = counts.get(tp.format, 0) + graph.weights[name].n_elements
    dominant = max(sorted(counts), key=lambda k: counts[k]) if counts else "f32"
    return MOSTLY_FTYPE.get(dominant, 0)


def _add_tokenizer(w, tok: dict[str, Any]) -> None:
    """Tokenizer keys with the value types llama.cpp's loader expects."""
    w.add_string("tokenizer.ggml.model", tok["model"])
    if tok.get("pre"):
        w.add_string("tokenizer.ggml.pre", tok["pre"])
    w.add_array("tokenizer.ggml.tokens", list(tok["tokens"]))
    if tok.get("scores") is not None:
        w.add_array("tokenizer.ggml.scores", [float(s) for s in tok["scores"]])
    w.add_array("tokenizer.ggml.token_type", [int(t) for t in tok["token_types"]])
    if tok.get("merges"):
        w.add_array("tokenizer.ggml.merges", list(tok["merges"]))
    for key, field in (("bos", "bos_id"), ("eos", "eos_id"), ("eot", "eot_id"), ("unknown", "unk_id"),
                       ("padding", "pad_id")):
        if tok.get(field) is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", int(tok[field]))
    w.add_bool("tokenizer.ggml.add_bos_token", bool(tok.get("add_bos", False)))
    w.add_bool("tokenizer.ggml.add_eos_token", bool(tok.get("add_eos", False)))
    if tok["model"] == "llama":        # SentencePiece: whether text gets a leading space (llama.cpp's default: yes)
        w.add_bool("tokenizer.ggml.add_space_prefix", bool(tok.get("add_space_prefix", True)))
    if tok.get("chat_template"):
        w.add_string("tokenizer.chat_template", tok["chat_template"])


ALIGNMENT = 32  # GGUF's default data alignment (gguf-py and llama.cpp)


def padded(nbytes: int) -> int:
    """Bytes a tensor of `nbytes` occupies in the file: data is aligned to 32 bytes."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _declare(graph: Graph, plan: Plan, path: Path, tokenizer: dict[str, Any]):
    """A GGUFWriter with all metadata and tensor infos declared, and the (name, tensor, format, bytes) list."""
    from gguf import GGMLQuantizationType, GGUFWriter

    if graph.arch != "llama":
        raise EdgeqError(None, f"the GGUF target lowers llama-family decoders, not {graph.arch}")
    cfg: llama.LlamaConfig = graph.config
    widths = llama.mlp_widths(graph)
    # llama.cpp's `llama` architecture builds every layer with one FFN width; `deci` (its Llama with per-layer widths)
    # computes the same graph with each layer's own (runtime/gguf_slice.py says more)
    arch = "llama" if len(set(widths)) == 1 else "deci"
    w = GGUFWriter(path, arch=arch)
    w.add_string("general.type", "model")
    w.add_string("general.name", str(graph.metadata.get("name") or "model"))
    if graph.metadata.get("license"):
        w.add_string("general.license", str(graph.metadata["license"]))
    for key, value in llama.gguf_hparams(cfg, widths).items():
        key = arch + key[len("llama"):]
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, int(value))
    w.add_uint32("general.file_type", file_type(plan, graph))
    w.add_uint32("general.quantization_version", 2)
    _add_tokenizer(w, tokenizer)

    entries = []
    for name, tensor in graph.weights.items():
        decision = plan.tensors.get(name)
        if decision is None:
            raise EdgeqError(None, f"plan has no decision for tensor {name}")
        fmt = get_format(decision.format)
        if "gguf" not in fmt.backends:
            raise EdgeqError(None, f"format {fmt.name} of {name} cannot be written to GGUF")
        if len(tensor.shape) == 1 and fmt.name != "f32":
            raise EdgeqError(None, f"1-D tensor {name} must stay f32 in GGUF (plan says {fmt.name})")
        if not fmt.can_carry(tensor.shape):
            raise EdgeqError(None, f"format {fmt.name} cannot carry {name} of shape {tensor.shape}")
        nbytes = fmt.nbytes(tensor.shape)
        gname = tensor.alias or llama.gguf_name(name)
        rows = int(np.prod(tensor.shape[:-1])) if len(tensor.shape) > 1 else 1
        w.add_tensor_info(gname, (rows, nbytes // rows) if len(tensor.shape) > 1 else (nbytes,), np.dtype(np.uint8),
                          nbytes, raw_dtype=GGMLQuantizationType(fmt.ggml_type))
        entries.append((name, tensor, fmt, nbytes))
    if cfg.rope_scaling and cfg.rope_scaling.get("type") == "llama3" and "rope_freqs.weight" not in graph.weights:
        # llama.cpp applies llama3 scaling through this tensor (convert_hf_to_gguf writes it the same way)
        freqs = llama.llama3_rope_freqs(cfg)
        f32 = get_format("f32")
        rope = Tensor("rope_freqs.weight", freqs.shape, load=lambda: freqs, alias="rope_freqs.weight")
        w.add_tensor_info("rope_freqs.weight", (freqs.nbytes,), np.dtype(np.uint8), freqs.nbytes,
                          raw_dtype=GGMLQuantizationType.F32)
        entries.append(("rope_freqs.weight", rope, f32, freqs.nbytes))
    return w, entries


def layout_overhead(graph: Graph, tokenizer: dict[str, Any]) -> int:
    """Bytes of the file before the first tensor (header, metadata, tensor infos, alignment).

    It does not depend on the formats chosen (every field is fixed-width), so the
    size of any plan's file is this plus `padded(bytes)` of each tensor.
    """
    import tempfile

    plan = Plan(tensors={n: TensorPlan("f32") for n in graph.weights})
    with tempfile.TemporaryDirectory(prefix="edgeq-layout-") as d:
        w, entries = _declare(graph, plan, Path(d) / "layout.gguf", tokenizer)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            size = w.fout[0].tell()
        finally:
            w.close()
        extra = sum(padded(nb) for name, _, _, nb in entries if name not in graph.weights)   # e.g. rope_freqs
    return padded(size) + extra


def write_gguf(
    graph: Graph,
    plan: Plan,
    path: str | os.PathLike,
    tokenizer: dict[str, Any],
    imatrix: dict[str, np.ndarray] | None = None,
    progress: Callable | None = None,
) -> dict[str, int]:
    """Write the file; returns {format: tensor count} actually written.

    `imatrix`: importance per canonical weight name (E[x²] of its input), passed
    to ggml's quantizer for the types that take one, as llama-quantize --imatrix does.
    """
    cfg: llama.LlamaConfig = graph.config
    path = Path(path)
    w, entries = _declare(graph, plan, path, tokenizer)

    counts: dict[str, int] = {}
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        it = entries if progress is None else progress(entries, desc="quantize+write", unit="tensor")
        for name, tensor, fmt, nbytes in it:
            if tensor.source_bytes is not None and tensor.source_format == fmt.name:
                # the source's own bytes in the format the plan keeps: no dequantize/quantize round trip
                data = tensor.source_bytes()
                if data.nbytes != nbytes:
                    raise RuntimeError(f"{name}: the source holds {data.nbytes} bytes, the registry says {nbytes}")
                w.write_tensor_data(data)
                counts[fmt.name] = counts.get(fmt.name, 0) + 1
                continue
            arr = tensor.numpy()
            heads = llama.qk_heads(cfg, name)
            if heads is not None:
                arr = llama.permute_for_gguf(arr, heads)
            if arr.ndim == 1:
                data = np.ascontiguousarray(arr, dtype="<f4").view(np.uint8)
            else:
                im = None if imatrix is None else imatrix.get(name)
                data = fmt.quantize(arr, im)
            if data.nbytes != nbytes:
                raise RuntimeError(f"{name}: quantizer wrote {data.nbytes} bytes, registry says {nbytes}")
            w.write_tensor_data(data)
            counts[fmt.name] = counts.get(fmt.name, 0) + 1
    finally:
        w.close()
    return dict(sorted(counts.items()))
