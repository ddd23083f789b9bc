"""llama.cpp (through llama-cpp-python) as an edgeq runtime backend."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.runtime.manifest import BundleError, listed_path

NAME = "gguf"
RUNTIME_DIST = "llama-cpp-python"     # whose version the manifest records and a device is checked against
REMOTE = False                        # runs only on this machine (no TVM RPC)
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


def open_decoder(bundle, manifest: dict, art: dict, spec, n_ctx: int, threads: int, device: str | None):
    """llama.cpp on the artifact, with the bundle's low-rank error branches (a LoRA-adapter GGUF beside the model,
    applied at load) when it has them."""
    lora = [a for a in manifest["artifacts"] if a.get("role") == "adapter" and a["backend"] == NAME]
    kv = manifest.get("kv_cache_dtype") or "f16"
    if kv not in KV_TYPES:
        raise BundleError(bundle / "manifest.json", f"unsupported kv_cache_dtype {kv!r}")
    return LlamaCppBackend(listed_path(bundle, manifest, art["path"], "model"), n_ctx=n_ctx, threads=threads,
                           kv_dtype=kv,
                           lora_path=listed_path(bundle, manifest, lora[0]["path"], "adapter") if lora else None)


def open_model(bundle, manifest: dict, art: dict, threads: int, device: str | None):
    raise BundleError(bundle, f"a gguf bundle holds a decoder, not a {manifest['model'].get('kind')}")


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
        self._loras: dict[str, object] = {}     # users' adapters read so far, by name (llama_adapter_lora *)

    def set_adapters(self, chosen: list[tuple[str, float]], open_file: Callable[[str], Path]) -> None:
        """Apply these LoRA adapters (name, scale) over the model, with the bundle's error branches if any.

        Each adapter file is read once (`open_file` checks it against the manifest) and kept for later
        switches; switching is llama.cpp's `llama_set_adapters_lora`, no reload of the base. llama.cpp adds
        scale·B·(A·x) per adapter (alpha 0 in edgeq's files: the scale is the weight alone)."""
        import llama_cpp

        for name, _ in chosen:
            if name not in self._loras:
                path = open_file(name)
                from llama_cpp._utils import suppress_stdout_stderr

                with suppress_stdout_stderr(disable=self.llm.verbose):   # llama.cpp logs a line per tensor
                    handle = llama_cpp.llama_adapter_lora_init(self.llm._model.model,
                                                               os.fspath(path).encode("utf-8"))
                if not handle:
                    raise BundleError(path, "llama.cpp cannot apply this LoRA adapter to the bundle's model "
                                            "(made for another base model?)")
                self._loras[name] = handle
        pairs = [(self.llm._lora_adapter, 1.0)] if self.llm._lora_adapter is not None else []
        pairs += [(self._loras[name], scale) for name, scale in chosen]
        n = len(pairs)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*(h for h, _ in pairs)) if n else None
        scales = (ctypes.c_float * n)(*(s for _, s in pairs)) if n else None
        if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, handles, n, scales):
            raise BundleError(None, "llama.cpp refused the adapters")
        self.reset()     # the KV cache holds keys and values computed with the previous adapters

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
            import llama_cpp

            loras, self._loras = self._loras, {}
            for handle in loras.values():      # before the model that owns them
                llama_cpp.llama_adapter_lora_free(handle)
            llm.close()
