"""genai_config.json: what ORT GenAI (onnxruntime-genai) needs to open an ONNX decoder bundle as it is.

The decoder graph already uses ORT GenAI's input and output names (decoder.py); this file tells it the shapes,
the special tokens and the search defaults. The KV cache grows by concatenation (`past_present_share_buffer`
off), as edgeq's own runtime feeds it. Search defaults are greedy, as `edgeq run`'s are.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeq.core.ir import Graph
from edgeq.runtime.tokenizer import TokenizerSpec, stop_ids

GENAI_CONFIG_FILE = "genai_config.json"


def genai_config(graph: Graph, spec: TokenizerSpec, model_file: str, n_ctx: int) -> dict:
    cfg = graph.config
    eog = sorted(stop_ids(spec))
    pad = spec.pad_id if spec.pad_id is not None else eog[0]
    return {
        "model": {
            "bos_token_id": spec.bos_id if spec.bos_id is not None else pad,
            "context_length": n_ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": cfg.n_layers,
                "num_key_value_heads": cfg.n_kv_heads,
            },
            "eos_token_id": eog,
            "pad_token_id": pad,
            "type": "llama",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": n_ctx,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(graph: Graph, spec: TokenizerSpec, folder: Path, model_file: str, n_ctx: int) -> Path:
    path = folder / GENAI_CONFIG_FILE
    path.write_text(json.dumps(genai_config(graph, spec, model_file, n_ctx), indent=1) + "\n", encoding="utf-8")
    return path
