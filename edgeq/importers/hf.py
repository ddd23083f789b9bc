"""Import a Hugging Face model folder (Llama, Qwen2, SmolLM families) into the IR.

The folder holds config.json, the weights as safetensors (one file, or shards
listed by model.safetensors.index.json) and the tokenizer (tokenizer.json and
tokenizer_config.json). Canonical tensor names are HF's own; GGUF names become
aliases. Every safetensors header is validated up front; tensor data is read
only when a pass, the executor or the writer asks for it, one tensor at a
time, in float32 (float16 and bfloat16 are converted in numpy, no torch).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph, Tensor
from edgeq.importers.hf_tokenizer import _read_json, spec_from_hf_folder
from edgeq.importers.safetensors_io import FLOAT_DTYPES, SafetensorsFile, STensor
from edgeq.models import llama, names

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Buffers some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_O_BIAS = re.compile(r"^model\.layers\.\d+\.self_attn\.o_proj\.bias$")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        if (folder / "adapter_config.json").is_file():
            raise EdgeqError(folder, "is a PEFT adapter folder, not a model: pass it with --adapter and the base "
                                     "model with --model")
        raise EdgeqError(folder, "no config.json (expected a Hugging Face model folder or a GGUF file)")
    c = _read_json(path, "config.json")
    if not isinstance(c, dict):
        raise EdgeqError(path, "config.json is not a JSON object")
    return c


def config_from_folder(folder: Path, c: dict[str, Any]) -> llama.LlamaConfig:
    path = folder / "config.json"
    mt = c.get("model_type")
    if mt not in ("llama", "qwen2", "smollm", "smollm2", "mistral"):
        raise EdgeqError(path, f"model_type {mt!r} is not supported (llama, qwen2 and SmolLM-family models are)")
    if c.get("hidden_act", "silu") != "silu":
        raise EdgeqError(path, f"hidden_act {c.get('hidden_act')!r} is not supported (silu)")
    if c.get("mlp_bias"):
        raise EdgeqError(path, "mlp_bias is not supported")
    if c.get("use_sliding_window") or (mt == "mistral" and c.get("sliding_window") is not None):
        raise EdgeqError(path, "sliding-window attention is not supported")
    try:
        if mt == "qwen2":       # Qwen2 always has q/k/v biases and no o_proj bias; its config does not say so
            c = {**c, "attention_bias": True}
        return llama.config_from_hf(c, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgeqError(path, f"config.json lacks or mangles a field ({exc})") from None


def _shard_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = folder / INDEX
    if index.is_file():
        d = _read_json(index, INDEX)
        wm = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise EdgeqError(index, "weight_map is missing or not a map of tensor name -> file")
        files = []
        for name in sorted(set(wm.values())):
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise EdgeqError(index, f"shard {name!r} is not a .safetensors file name in the folder")
            if not (folder / name).is_file():
                raise EdgeqError(folder / name, "shard listed in model.safetensors.index.json is missing")
            files.append(folder / name)
        return files, wm
    if (folder / SINGLE).is_file():
        return [folder / SINGLE], None
    found = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if found:
        return found, None
    other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf")]
    hint = f" (found {', '.join(sorted(other))}: edgeq reads safetensors checkpoints only)" if other else ""
    raise EdgeqError(folder, f"no safetensors weights{hint}")


def hf_tensors(folder: Path) -> dict[str, STensor]:
    """Every tensor of the checkpoint by name, headers validated, nothing loaded."""
    files, weight_map = _shard_files(folder)
    out: dict[str, STensor] = {}
    for f in files:
        st = SafetensorsFile(f)
        for name, t in st.tensors.items():
            if weight_map is not None and weight_map.get(name) != f.name:
                if name in weight_map:
                    raise EdgeqError(f, f"tensor {name} is in this shard, the index says {weight_map[name]}")
                raise EdgeqError(f, f"tensor {name} is not listed in {INDEX}")
            if name in out:
                raise EdgeqError(f, f"tensor {name} is also in {out[name].path.name}")
            out[name] = t
    if weight_map is not None:
        missing = [n for n in weight_map if n not in out]
        if missing:
            raise EdgeqError(folder / weight_map[missing[0]], f"has no tensor {missing[0]}, which {INDEX} lists there")
    return out


def _metadata(folder: Path, c: dict[str, Any]) -> dict[str, Any]:
    name = c.get("_name_or_path") or folder.resolve().name
    license_ = None
    readme = folder / "README.md"
    if readme.is_file() and readme.stat().st_size < 1 << 20:
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            head = text[3:].split("\n---", 1)[0]
            m = re.search(r"^license:\s*['\"]?([^'\"\n]+)", head, re.M)
            license_ = m.group(1).strip() if m else None
    return {"source_path": str(folder), "name": Path(str(name)).name or str(name), "license": license_,
            "hf_config": c}


def import_hf(path: str | os.PathLike) -> Graph:
    folder = Path(path)
    c = read_config(folder)
    cfg = config_from_folder(folder, c)
    tensors = hf_tensors(folder)
    expected = llama.expected_shapes(cfg)
    weights: dict[str, Tensor] = {}
    for name, t in tensors.items():
        want = expected.get(name)
        if want is None:
            if _IGNORED.match(name) or (name == names.LM_HEAD and cfg.tied_embeddings):
                continue        # recomputed, or tied to the embedding (transformers ignores it too)
            if _O_BIAS.match(name) and not np.any(t.load()):
                continue        # an all-zero o_proj bias (Llama with attention_bias) changes nothing
            if _O_BIAS.match(name):
                raise EdgeqError(t.path, f"tensor {name}: a non-zero o_proj bias is not supported (Qwen2-style "
                                         "q/k/v biases are)")
            raise EdgeqError(t.path, f"unexpected tensor {name} for a {c.get('model_type')} model with this config.json")
        if t.dtype not in FLOAT_DTYPES:
            raise EdgeqError(t.path, f"tensor {name} has dtype {t.dtype}, expected F32, F16 or BF16")
        if t.shape != want:
            raise EdgeqError(t.path, f"tensor {name} has shape {t.shape}, config.json implies {want}")
        weights[name] = Tensor(name=name, shape=t.shape, load=t.load, alias=llama.gguf_name(name),
                               source_format=t.dtype.lower())
    missing = [n for n in expected if n not in weights]
    if missing:
        raise EdgeqError(folder, f"checkpoint has no tensor {missing[0]} ({len(missing)} missing)")
    meta = _metadata(folder, c)
    meta["tokenizer_spec"] = spec_from_hf_folder(folder, cfg.vocab_size, c)
    return llama.build_graph(cfg, weights, meta)
