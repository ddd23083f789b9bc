"""Write a llama-family graph as a Hugging Face model folder.

config.json (transformers' own keys), safetensors weights (sharded with an
index when asked) and the tokenizer (tokenizer.json built from the spec,
tokenizer_config.json with the special tokens and chat template). Tensors are
produced and written one at a time, so a folder far larger than the RAM can be
made. Tests and benchmarks use it to make HF checkpoints without a model hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.importers.safetensors_io import write_safetensors
from edgeq.models import llama
from edgeq.runtime.tokenizer import build_tokenizer


def write_hf_folder(folder: str | os.PathLike, cfg: llama.LlamaConfig, tensor: Callable[[str], np.ndarray],
                    spec=None, dtype: str = "F32", shard_bytes: int | None = None,
                    names: list[str] | None = None) -> Path:
    """`tensor(name)` gives each canonical tensor (HF layout); `names` defaults to the config's full list."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**llama.hf_config_dict(cfg), "torch_dtype": _TORCH[dtype]},
                                                   indent=2) + "\n", encoding="utf-8")
    shapes = llama.expected_shapes(cfg)
    names = list(names or shapes)
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = int(np.prod(shapes[n])) * itemsize
        if shard_bytes and shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for fname, group in zip(files, shards):
        write_safetensors(folder / fname, [(n, shapes[n], dtype) for n in group], tensor, {"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += int(np.prod(shapes[n])) * itemsize
    if len(files) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
            encoding="utf-8")
    if spec is not None:
        write_tokenizer(folder, spec)
    return folder


_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def write_tokenizer(folder: Path, spec) -> None:
    """tokenizer.json from edgeq's TokenizerSpec, and the tokenizer_config.json transformers reads."""
    build_tokenizer(spec).save(str(folder / "tokenizer.json"))

    def text(i):
        return None if i is None else spec.tokens[i]

    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "model_max_length": 1 << 30, "add_bos_token": spec.add_bos, "add_eos_token": spec.add_eos}
    for key, i in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id), ("unk_token", spec.unk_id),
                   ("pad_token", spec.pad_id)):
        if i is not None:
            tc[key] = text(i)
    if spec.chat_template is not None:
        tc["chat_template"] = spec.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")


def graph_to_hf_folder(graph, folder: str | os.PathLike, spec=None, dtype: str = "F32",
                       shard_bytes: int | None = None) -> Path:
    """An existing graph (e.g. the dequantized default model) as an HF folder."""
    names = [n for n in graph.weights if n != "rope_freqs.weight"]
    return write_hf_folder(folder, graph.config, lambda n: graph.weights[n].numpy(), spec, dtype, shard_bytes, names)
