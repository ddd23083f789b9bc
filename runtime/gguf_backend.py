"""llama.cpp (through llama-cpp-python) as an edgeq runtime backend."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.core.errors import RequestError
from edgeq.runtime.gguf_slice import slice_mlp
from edgeq.runtime.manifest import BundleError, Pruning, listed_path
from edgeq.runtime.pruned import pruned_file
from edgeq.runtime.sampling import SamplingParams

NAME = "gguf"
RUNTIME_DIST = "llama-cpp-python"     # whose version the manifest records and a device is checked against
REMOTE = False                        # runs only on this machine (no TVM RPC)
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
QUANTIZED_KV = {"q8_0"}
SLICE_VERSION = 1                     # of runtime/gguf_slice.py's output: part of the cached file's key


def open_decoder(bundle, manifest: dict, art: dict, spec, n_ctx: int, threads: int, device: str | None,
                 pruning: Pruning | None = None):
    """llama.cpp on the artifact, with the bundle's low-rank error branches (a LoRA-adapter GGUF beside the model,
    applied at load) when it has them; at a pruning rate, on the artifact narrowed to that rate's MLP widths."""
    lora = [a for a in manifest["artifacts"] if a.get("role") == "adapter" and a["backend"] == NAME]
    kv = manifest.get("kv_cache_dtype") or "f16"
    if kv not in KV_TYPES:
        raise BundleError(bundle / "manifest.json", f"unsupported kv_cache_dtype {kv!r}")
    model = listed_path(bundle, manifest, art["path"], "model")
    if pruning is None:
        return LlamaCppBackend(model, n_ctx=n_ctx, threads=threads, kv_dtype=kv,
                               lora_path=listed_path(bundle, manifest, lora[0]["path"], "adapter") if lora else None)
    if lora:
        raise BundleError(bundle, "a bundle with low-rank branches cannot be loaded at a pruning rate")
    if pruning.qk is not None:
        raise BundleError(bundle / "manifest.json", "attention widths in the pruning table: llama.cpp has one head "
                                                    "size for all layers (only ONNX bundles prune attention)")
    with pruned_file(art["sha256"], pruning, ".gguf", SLICE_VERSION,
                     lambda path: slice_mlp(model, path, pruning.widths, pruning.align)) as path:
        return LlamaCppBackend(path, n_ctx=n_ctx, threads=threads, kv_dtype=kv)


def op_latency(backend, args: dict, threads: int) -> dict:
    """Per-kernel timings of the calls runtime/latency.py times (runtime/gguf_ops.py)."""
    from edgeq.runtime.gguf_ops import op_latency as timed

    return timed(backend, args, threads)


def open_model(bundle, manifest: dict, art: dict, threads: int, device: str | None):
    raise BundleError(bundle, f"a gguf bundle holds a decoder, not a {manifest['model'].get('kind')}")


class LlamaCppBackend:
    name = "gguf"

    def __init__(self, model_path: str | os.PathLike, n_ctx: int, threads: int = 1, kv_dtype: str = "f16",
                 lora_path: str | os.PathLike | None = None):
        """`lora_path`: a LoRA-adapter GGUF llama.cpp applies at load (edgeq's low-rank error branches)."""
        import llama_cpp

        if kv_dtype not in KV_TYPES:
            raise BundleError(model_path, f"unsupported KV-cache dtype {kv_dtype!r}")
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
            flash_attn=kv_dtype in QUANTIZED_KV,     # llama.cpp quantizes the V cache only with flash attention
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
            raise RequestError(f"context overflow: {self.llm.n_tokens + len(ids)} tokens > n_ctx {self.n_ctx}",
                               code="context_length_exceeded")
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of a fresh sequence, shape (len(ids), n_vocab)."""
        if len(ids) > self.n_ctx:
            raise RequestError(f"{len(ids)} tokens exceed n_ctx {self.n_ctx}",
                               code="context_length_exceeded")
        self.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def sampler(self, params: SamplingParams) -> "LlamaCppSampler":
        """llama.cpp's own sampler chain, reading the logits `feed` left in the context."""
        return LlamaCppSampler(self, params)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            import llama_cpp

            loras, self._loras = self._loras, {}
            for handle in loras.values():      # before the model that owns them
                llama_cpp.llama_adapter_lora_free(handle)
            llm.close()


class LlamaCppSampler:
    """llama.cpp's sampler chain (what llama-cli and llama-server build) for these settings.

    The steps and their order are edgeq's `SamplingParams` order, which is llama.cpp's: logit bias,
    penalties, top-k, top-p, min-p, temperature, then a seeded draw (`dist`), or `greedy` at temperature 0.
    It samples from the last position of the context's logits, so the array `feed` returned is not read.
    """

    def __init__(self, backend: LlamaCppBackend, params: SamplingParams):
        import llama_cpp

        self._lib = llama_cpp
        self._ctx = backend.llm.ctx
        lib, n_vocab = llama_cpp, backend.n_vocab
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        steps = []
        if params.logit_bias:
            bias = (lib.llama_logit_bias * len(params.logit_bias))()
            for i, (tok, b) in enumerate(sorted(params.logit_bias.items())):
                bias[i].token, bias[i].bias = tok, b
            steps.append(lib.llama_sampler_init_logit_bias(n_vocab, len(bias), bias))   # copies the array
        if params.penalised:
            steps.append(lib.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty,
                                                          params.frequency_penalty, params.presence_penalty))
        if params.temperature <= 0:
            steps.append(lib.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                steps.append(lib.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                steps.append(lib.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                steps.append(lib.llama_sampler_init_min_p(params.min_p, 1))
            steps.append(lib.llama_sampler_init_temp(params.temperature))
            steps.append(lib.llama_sampler_init_dist(params.seed))
        for s in steps:
            lib.llama_sampler_chain_add(self.chain, s)        # the chain owns and frees them

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self.chain, int(token))

    def sample(self, logits: np.ndarray) -> int:
        return int(self._lib.llama_sampler_sample(self.chain, self._ctx, -1))   # also accepts the token

    def close(self) -> None:
        chain, self.chain = self.chain, None
        if chain is not None:
            self._lib.llama_sampler_free(chain)

    def __del__(self) -> None:
        self.close()
