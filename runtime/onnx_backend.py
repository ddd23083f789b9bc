"""onnxruntime as an edgeq runtime backend: encoders (`embed`) and any ONNX bundle (`run`). No torch.

Sessions use ORT_ENABLE_ALL, so QDQ pairs become integer kernels at load time;
`allow_spinning` is off by default because idle spinning threads steal cores on
small devices (and make timings bimodal).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def session_options(threads: int = 1, spinning: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def open_session(model_path: str | os.PathLike, threads: int = 1, spinning: bool = False):
    import onnxruntime as ort

    return ort.InferenceSession(os.fspath(model_path), session_options(threads, spinning),
                                providers=["CPUExecutionProvider"])


class OnnxSession:
    """A loaded ONNX bundle. Encoders: `embed(texts)`; every kind: `run(inputs)` (raw onnxruntime feeds)."""

    backend_name = "onnx"

    def __init__(self, bundle: Path, manifest: dict[str, Any], artifact: dict[str, Any], threads: int = 1,
                 spinning: bool = False):
        from edgeq.runtime.manifest import artifact_path

        self.bundle = bundle
        self.manifest = manifest
        self.artifact = artifact
        self.kind = manifest["model"]["kind"]
        self.session = open_session(artifact_path(bundle, artifact["path"]), threads, spinning)
        self.tokenizer = None
        tok = manifest.get("tokenizer") or {}
        if tok.get("tokenizer_json"):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(artifact_path(bundle, tok["tokenizer_json"])))
            self.tokenizer.no_padding()
            self.tokenizer.enable_truncation(int(tok.get("max_length", 512)))
            self.pad_id = int(tok.get("pad_id", 0))

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this bundle has no tokenizer")
        return self.tokenizer.encode(text).ids

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, inputs)))

    def embed_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Embeddings of tokenised sentences, padded to the longest in the batch."""
        n = max(len(x) for x in batch)
        ids = np.full((len(batch), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), n), dtype=np.int64)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        return self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]

    def embed(self, texts: str | list[str], batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings, shape (n, hidden) (or (hidden,) for one string), as the source model computes them."""
        if self.kind != "encoder":
            raise ValueError(f"embed() needs an encoder bundle; this one is a {self.kind}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ids = [self.tokenize(t) for t in texts]
        out = [self.embed_ids(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
        res = np.concatenate(out, 0) if out else np.zeros((0, self.manifest["model"]["config"]["hidden_size"]), np.float32)
        return res[0] if single else res

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OnnxSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
