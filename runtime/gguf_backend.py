"""llama.cpp (through llama-cpp-python) as an edgeq runtime backend."""

from __future__ import annotations

import os

import numpy as np

from edgeq.runtime.gguf_slice import slice_mlp
from edgeq.runtime.manifest import BundleError, Pruning, artifact_path
from edgeq.runtime.pruned import pruned_file

NAME = "gguf"
RUNTIME_DIST = "llama-cpp-python"     # whose version the manifest records and a device is checked against
REMOTE = False                        # runs only on this machine (no TVM RPC)
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
SLICE_VERSION = 1                     # of runtime/gguf_slice.py's output: part of the cached file's key


def open_decoder(bundle, manifest: dict, art: dict, spec, n_ctx: int, threads: int, device: str | None,
                 pruning: Pruning | None = None):
    """llama.cpp on the artifact, with the bundle's low-rank error branches (a LoRA-adapter GGUF beside the model,
    applied at load) when it has them; at a pruning rate, on the artifact narrowed to that rate's MLP widths."""
    lora = [a for a in manifest["artifacts"] if a.get("role") == "adapter" and a["backend"] == NAME]
    model = artifact_path(bundle, art["path"])
    if pruning is None:
        return LlamaCppBackend(model, n_ctx=n_ctx, threads=threads, kv_dtype=manifest.get("kv_cache_dtype", "f16"),
                               lora_path=artifact_path(bundle, lora[0]["path"]) if lora else None)
    if lora:
        raise BundleError(bundle, "a bundle with low-rank branches cannot be loaded at a pruning rate")
    with pruned_file(art["sha256"], pruning, ".gguf", SLICE_VERSION,
                     lambda path: slice_mlp(model, path, pruning.widths, pruning.align)) as path:
        return LlamaCppBackend(path, n_ctx=n_ctx, threads=threads, kv_dtype=manifest.get("kv_cache_dtype", "f16"))


class LlamaCppBackend:
    name = "gguf"

    def __init__(self, model_path: str | os.PathLike, n_ctx: int, threads: int = 1, kv_dtype: str = "f16",
                 lora_path: str | os.PathLike | None = None):
        """`lora_path`: a LoRA-adapter GGUF llama.cpp applies at load (edgeq's low-rank error branches)."""
        import llama_cpp

        if kv_dtype not in KV_TYPES:
            raise ValueError(f"unsupported KV-cache dtype {kv_dtype!r}")
        self.n_ctx = n_ctx
        self.llm = llama_cpp.Llama(
            model_path=os.fspath(model_path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_ubatch=min(n_ctx, 512),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            type_k=KV_TYPES[kv_dtype],
            type_v=KV_TYPES[kv_dtype],
            seed=0,
            lora_path=None if lora_path is None else os.fspath(lora_path),
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def reset(self) -> None:
        self.llm.reset()

    def feed(self, ids: list[int]) -> np.ndarray:
        """Append tokens to the KV cache; logits after the last one."""
        if self.llm.n_tokens + len(ids) > self.n_ctx:
            raise ValueError(f"context overflow: {self.llm.n_tokens + len(ids)} tokens > n_ctx {self.n_ctx}")
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of a fresh sequence, shape (len(ids), n_vocab)."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed n_ctx {self.n_ctx}")
        self.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()
