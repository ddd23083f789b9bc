"""One fuzz target per reader of untrusted files, and the real files their seeds come from.

A target puts the fuzzed bytes at one file of a small, otherwise valid input (a GGUF file; config.json in a
Hugging Face folder whose other files are fixed; a manifest.json in a bundle whose artifacts are real; ...) and
runs what `edgeq inspect` / `edgeq export` would run on it, up to the point where the reader's result is used.
The only allowed outcomes are a result or edgeq's own `EdgeqError` (one line; the CLI's exit status 2).

Seeds are real files: what edgeq writes for tiny synthetic models (a GGUF, an imatrix, a plan, bundles of all
three backends), a PEFT-layout adapter, a torch.export program, the default encoder's own config.json and
tokenizer_config.json, and the default decoder's GGUF metadata (its keys and values, with a 300-token vocabulary
so that a case stays a few kilobytes; mutations of the real 98 MB file would almost all land in tensor data).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

MICRO = dict(vocab_size=300, hidden_size=32, intermediate_size=64, n_layers=1, n_heads=2, n_kv_heads=1,
             head_dim=16, context_length=64)


@dataclass
class Target:
    name: str
    file: str                                   # where the fuzzed bytes go in the case folder
    kind: str                                   # "binary" or "json" (how the mutators treat the bytes)
    read: Callable[[Path], object]              # the reader(s), on the case folder
    doc: str


# --- seeds --------------------------------------------------------------------------------------------------

def _micro_llama():
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config

    cfg = tiny_config(**MICRO, tied_embeddings=False)
    return random_llama(cfg, seed=3, scale=0.1), byte_level_spec(MICRO["vocab_size"])


def build_seeds(root: Path) -> dict[str, Path]:
    """Make every seed and fixed companion file under `root` (once; reused when present). Returns the folders
    each target's cases start from (its companions) keyed by target name, plus `seeds/<target>/` corpora."""
    done = root / ".complete"
    if done.is_file():
        return _layout(root)
    import os

    from edgeq.api import ExportOptions, calibrate, export, plan
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import tiny_bert_config, write_bert_folder

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.environ.setdefault("EDGEQ_CACHE", str(root / "cache"))
    graph, spec = _micro_llama()
    hf = graph_to_hf_folder(graph, root / "hf", spec)
    bert = write_bert_folder(root / "bert", tiny_bert_config(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                             n_layers=1, n_heads=2, max_positions=32,
                                                             context_length=32))
    seeds = root / "seeds"

    def seed(target: str, name: str, data: bytes) -> None:
        (seeds / target).mkdir(parents=True, exist_ok=True)
        (seeds / target / name).write_bytes(data)

    export(ExportOptions(model=str(hf), quant="q8_0", out=str(root / "b-gguf"), calibration=False))
    export(ExportOptions(model=str(hf), backend="onnx", quant="int4", out=str(root / "b-onnx")))
    export(ExportOptions(model=str(bert), backend="tvm", quant="int8", out=str(root / "b-tvm")))
    seed("gguf", "micro-q8_0.gguf", (root / "b-gguf" / "model.gguf").read_bytes())
    seed("gguf", "smollm2-metadata.gguf", _smollm2_metadata_gguf())
    calibrate(root / "imatrix.gguf", model=str(hf), calib_windows=1)
    seed("imatrix", "micro.imatrix.gguf", (root / "imatrix.gguf").read_bytes())
    seed("imatrix", "micro.imatrix.dat", _legacy_imatrix(root / "imatrix.gguf"))
    for f in ("model.safetensors",):
        seed("safetensors", "hf-" + f, (hf / f).read_bytes())
    seed("safetensors", "tvm-params.safetensors", (root / "b-tvm" / "params.safetensors").read_bytes())
    seed("safetensors", "bert.safetensors", (bert / "model.safetensors").read_bytes())
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        seed("hf_" + f.removesuffix(".json"), "micro-" + f, (hf / f).read_bytes())
    minilm = _minilm_folder()
    seed("bert_config", "micro-config.json", (bert / "config.json").read_bytes())
    seed("bert_config", "all-MiniLM-L6-v2-config.json", (minilm / "config.json").read_bytes())
    seed("hf_tokenizer_config", "all-MiniLM-L6-v2-tokenizer_config.json",
         (minilm / "tokenizer_config.json").read_bytes())
    adapter = _write_adapter(root / "adapter", graph)
    seed("adapter_config", "micro-adapter_config.json", (adapter / "adapter_config.json").read_bytes())
    seed("adapter_weights", "micro-adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes())
    plan(model=str(hf), quant="q4_k_m", calibration=False, out=root / "plan.json")
    seed("plan", "micro-q4_k_m.json", (root / "plan.json").read_bytes())
    plan(model=str(hf), bpw=8.0, cost="output", calib_windows=1, out=root / "plan-budget.json")
    seed("plan", "micro-budget.json", (root / "plan-budget.json").read_bytes())
    seed("plan", "readme-example.json", json.dumps(
        {"version": 1, "preset": "q4_0", "rules": [{"match": "*.ffn_down", "format": "q8_0"}],
         "tensors": {"blk.0.attn_v.weight": {"format": "q6_k"}}}).encode())
    for b in ("gguf", "onnx", "tvm"):
        seed("manifest", f"{b}-manifest.json", (root / f"b-{b}" / "manifest.json").read_bytes())
    pt2 = _write_pt2(root / "cnn.pt2")
    seed("pt2", "cnn.pt2", pt2.read_bytes())
    rng = np.random.default_rng(0)
    import io

    buf = io.BytesIO()
    np.savez(buf, images=rng.random((4, 1, 8, 8), dtype=np.float32), labels=np.arange(4))
    seed("images", "images.npz", buf.getvalue())
    done.write_text("ok\n")
    return _layout(root)


def _layout(root: Path) -> dict[str, Path]:
    return {"root": root, "hf": root / "hf", "bert": root / "bert", "adapter": root / "adapter",
            "b-gguf": root / "b-gguf", "seeds": root / "seeds"}


def _minilm_folder() -> Path:
    from edgeq.models.recipes.minilm import minilm_path

    return Path(minilm_path())


def _smollm2_metadata_gguf() -> bytes:
    """The default model's GGUF metadata (every key and value as the file has them) with its vocabulary cut to
    its first 300 tokens and merges to the first 200, and no tensors."""
    from edgeq.importers.gguf_metadata import open_gguf
    from edgeq.models.recipes.default import default_model_path

    meta = open_gguf(default_model_path()).metadata
    meta = dict(meta)
    for key, n in (("tokenizer.ggml.tokens", 300), ("tokenizer.ggml.token_type", 300),
                   ("tokenizer.ggml.merges", 200)):
        meta[key] = meta[key][:n]
    return write_gguf_bytes(meta, [])


def write_gguf_bytes(meta: dict, tensors: list[tuple[str, list[int], int, bytes]], version: int = 3) -> bytes:
    """A GGUF file from metadata and (name, ggml dims, type, data) tensors, with gguf's value types inferred
    (ints as u32/i32/u64 as they fit, floats f32, bools, strings, lists of one type)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta)))

    def s(x: str) -> bytes:
        b = x.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def typed(v) -> tuple[int, bytes]:
        if isinstance(v, bool):
            return 7, struct.pack("<?", v)
        if isinstance(v, int):
            return (4, struct.pack("<I", v)) if 0 <= v < 2**32 else (11, struct.pack("<q", v))
        if isinstance(v, float):
            return 6, struct.pack("<f", v)
        if isinstance(v, str):
            return 8, s(v)
        if isinstance(v, list):
            sub = typed(v[0])[0] if v else 4
            return 9, struct.pack("<IQ", sub, len(v)) + b"".join(typed(x)[1] for x in v)
        raise TypeError(type(v))

    for k, v in meta.items():
        t, b = typed(v)
        out += s(k) + struct.pack("<I", t) + b
    offset = 0
    for name, dims, gtype, data in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", gtype, offset)
        offset += (len(data) + 31) // 32 * 32
    out += bytes(-len(out) % 32)
    for _, _, _, data in tensors:
        out += data + bytes(-len(data) % 32)
    return bytes(out)


def _legacy_imatrix(gguf_imatrix: Path) -> bytes:
    """The same importance matrix in llama.cpp's legacy .dat layout."""
    from edgeq.importers.imatrix import read_imatrix

    im = read_imatrix(gguf_imatrix)
    out = bytearray(struct.pack("<i", len(im.entries)))
    for name, e in im.entries.items():
        b = name.encode()
        vals = e.importance() * float(e.counts[0])
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", int(e.counts[0]), vals.size)
        out += np.asarray(vals, "<f4").tobytes()
    ds = b"edgeq calibration text"
    out += struct.pack("<ii", im.chunk_count, len(ds)) + ds
    return bytes(out)


def _write_adapter(folder: Path, graph) -> Path:
    """A LoRA adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors) for the micro model."""
    from edgeq.importers.safetensors_io import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    r = 4
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
           "bias": "none", "base_model_name_or_path": "micro", "task_type": "CAUSAL_LM", "lora_dropout": 0.0}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(5)
    arrays = {}
    for m in ("q_proj", "v_proj"):
        w = graph.weights[f"model.layers.0.self_attn.{m}.weight"].shape
        key = f"base_model.model.model.layers.0.self_attn.{m}"
        arrays[f"{key}.lora_A.weight"] = rng.standard_normal((r, w[1])).astype(np.float32) * 0.05
        arrays[f"{key}.lora_B.weight"] = rng.standard_normal((w[0], r)).astype(np.float32) * 0.05
    write_safetensors(folder / "adapter_model.safetensors", [(k, v.shape, "F32") for k, v in arrays.items()],
                      arrays.__getitem__)
    return folder


def _write_pt2(path: Path) -> Path:
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    ep = torch.export.export(net, (torch.zeros(1, 1, 8, 8),))
    torch.export.save(ep, str(path))
    return path


# --- the readers ----------------------------------------------------------------------------------------------

def import_readers() -> None:
    """Import every module the readers use (atheris instruments what is imported inside its context)."""
    import edgeq.api  # noqa: F401
    import edgeq.bundle.inspect  # noqa: F401
    import edgeq.importers.gguf  # noqa: F401
    import edgeq.importers.hf  # noqa: F401
    import edgeq.importers.hf_bert  # noqa: F401
    import edgeq.importers.images  # noqa: F401
    import edgeq.importers.imatrix  # noqa: F401
    import edgeq.importers.loader  # noqa: F401
    import edgeq.importers.torch_export  # noqa: F401
    import edgeq.passes.merge_adapters  # noqa: F401
    import edgeq.runtime  # noqa: F401


def _read_gguf(case: Path):
    from edgeq.bundle.inspect import inspect_gguf
    from edgeq.importers.gguf import import_gguf
    from edgeq.importers.loader import graph_tokenizer_spec

    p = case / "model.gguf"
    inspect_gguf(p)
    g = import_gguf(p)
    graph_tokenizer_spec(g)
    for t in list(g.weights.values())[:4]:
        t.numpy()


def _read_imatrix(case: Path):
    from edgeq.importers.imatrix import read_imatrix

    for e in read_imatrix(case / "imatrix").entries.values():
        e.importance()


def _read_safetensors(case: Path):
    """The compiler's reader, then the runtime's (TVM adapters and SHiRA files: runtime/arrays.py), on the same
    bytes: the runtime's runs first so that every case reaches it."""
    from edgeq.core.errors import EdgeqError
    from edgeq.importers.safetensors_io import FLOAT_DTYPES, SafetensorsFile
    from edgeq.runtime.arrays import read_aligned_arrays

    try:
        read_aligned_arrays(case / "model.safetensors")
    except EdgeqError:
        pass
    f = SafetensorsFile(case / "model.safetensors")
    for t in f.tensors.values():
        if t.dtype in FLOAT_DTYPES:
            t.load()


def _read_hf(case: Path):
    from edgeq.bundle.inspect import inspect_path
    from edgeq.importers.loader import graph_tokenizer_spec, import_model

    inspect_path(case)
    g = import_model(case)
    if g.kind == "decoder":
        graph_tokenizer_spec(g)


def _read_adapter(case: Path):
    from edgeq.core.plan import Plan
    from edgeq.importers.hf import import_hf
    from edgeq.passes import Context
    from edgeq.passes.merge_adapters import MergeAdapters

    from edgeq.bundle.inspect import inspect_path

    inspect_path(case / "adapter")
    graph, _ = MergeAdapters([str(case / "adapter")]).run(import_hf(case / "hf"), Plan(), Context(backend="gguf"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        graph.weights[name].numpy()


def _read_pt2(case: Path):
    from edgeq.bundle.inspect import inspect_path

    inspect_path(case / "model.pt2")


def _read_plan(case: Path):
    from edgeq.api import plan
    from edgeq.core.plan import load_plan

    from edgeq.bundle.inspect import inspect_path

    inspect_path(case / "plan.json")
    load_plan(case / "plan.json")
    plan(model=str(case / "hf"), plan=str(case / "plan.json"), calibration=False)


def _read_manifest(case: Path):
    from edgeq import runtime
    from edgeq.bundle.inspect import inspect_path

    inspect_path(case / "bundle")
    with runtime.load(case / "bundle") as s:
        s.logits(s.tokenize("hi")[: s.backend.n_ctx])     # a manifest may ask for any context length


def _read_images(case: Path):
    from edgeq.importers.images import read_images

    read_images(case / "images.npz", (1, 8, 8))


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("gguf", "model.gguf", "binary", _read_gguf, "GGUF model: header, metadata values and arrays, tensor "
           "infos and offsets, then import (config, tokenizer, first tensors)"),
    Target("imatrix", "imatrix", "binary", _read_imatrix, "llama.cpp importance matrix: GGUF or legacy .dat"),
    Target("safetensors", "model.safetensors", "binary", _read_safetensors,
           "safetensors header and tensors (the compiler's reader and the runtime's aligned one)"),
    Target("hf_config", "hf/config.json", "json", _read_hf, "config.json of a Llama HF folder"),
    Target("hf_tokenizer", "hf/tokenizer.json", "json", _read_hf, "tokenizer.json of a Llama HF folder"),
    Target("hf_tokenizer_config", "hf/tokenizer_config.json", "json", _read_hf,
           "tokenizer_config.json of a Llama HF folder"),
    Target("bert_config", "bert/config.json", "json", _read_hf, "config.json of a BERT encoder folder"),
    Target("adapter_config", "adapter/adapter_config.json", "json", _read_adapter,
           "PEFT adapter_config.json, merged into the micro model"),
    Target("adapter_weights", "adapter/adapter_model.safetensors", "binary", _read_adapter,
           "PEFT adapter_model.safetensors, merged into the micro model"),
    Target("pt2", "model.pt2", "binary", _read_pt2, "torch.export archive (.pt2): checks, then torch.export.load"),
    Target("plan", "plan.json", "json", _read_plan, "plan JSON, loaded and resolved against the micro model"),
    Target("manifest", "bundle/manifest.json", "json", _read_manifest,
           "bundle manifest: read, verified, inspected, loaded and run (a gguf bundle)"),
    Target("images", "images.npz", "binary", _read_images, "CNN image set (.npz)"),
]}


def prepare_case_folder(target: Target, layout: dict[str, Path], case: Path) -> None:
    """The fixed companions of a target's input, copied once into its case folder."""
    case.mkdir(parents=True, exist_ok=True)
    if target.name in ("hf_config", "hf_tokenizer", "hf_tokenizer_config"):
        shutil.copytree(layout["hf"], case, dirs_exist_ok=True)
    elif target.name == "bert_config":
        shutil.copytree(layout["bert"], case, dirs_exist_ok=True)
    elif target.name.startswith("adapter"):
        shutil.copytree(layout["hf"], case / "hf", dirs_exist_ok=True)
        shutil.copytree(layout["adapter"], case / "adapter", dirs_exist_ok=True)
    elif target.name == "plan":
        shutil.copytree(layout["hf"], case / "hf", dirs_exist_ok=True)
    elif target.name == "manifest":
        shutil.copytree(layout["b-gguf"], case / "bundle", dirs_exist_ok=True)


def case_path(target: Target, case: Path) -> Path:
    """Where the fuzzed bytes go: the HF targets' folder is the case folder itself."""
    if target.name in ("hf_config", "hf_tokenizer", "hf_tokenizer_config", "bert_config"):
        return case / target.file.split("/", 1)[1]
    return case / target.file
