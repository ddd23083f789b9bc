"""llama.cpp (through llama-cpp-python) as an edgeq runtime backend."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.core.errors import RequestError
from edgeq.runtime.gguf_slice import slice_mlp
from edgeq.runtime.llama_context import LlamaContext
from edgeq.runtime.manifest import BundleError, Pruning, listed_path
from edgeq.runtime.memory import drop_pages, mapped_ranges
from edgeq.runtime.pruned import pruned_file
from edgeq.runtime.sampling import SamplingParams

MAX_BATCH = 512     # tokens per graph: a longer prompt is decoded in batches of this many (its compute buffers)

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
                     lambda path: slice_mlp(model, path, pruning.widths, pruning.align, pruning.bias)) as path:
        return LlamaCppBackend(path, n_ctx=n_ctx, threads=threads, kv_dtype=kv)


def op_latency(backend, args: dict, threads: int) -> dict:
    """Per-kernel timings of the calls runtime/latency.py times (runtime/gguf_ops.py)."""
    from edgeq.runtime.gguf_ops import op_latency as timed

    return timed(backend, args, threads)


def open_model(bundle, manifest: dict, art: dict, threads: int, device: str | None):
    raise BundleError(bundle, f"a gguf bundle holds a decoder, not a {manifest['model'].get('kind')}")


class LlamaCppBackend:
    """A GGUF model in llama.cpp: tokenization, a KV cache fed token by token, and llama.cpp's sampler chain.

    Decoding goes through llama.cpp's C API (runtime/llama_context.py): a decode step is one `llama_decode` of a
    batch of one, and the logits are copied out only when a caller asks for them (`feed(..., logits=True)`,
    `logits`); llama.cpp's own sampler reads them where they are."""

    name = "gguf"
    model = ctx = _error_branches = None       # until loaded (close() runs after a failed __init__ too)
    _loras: dict[str, object] = {}

    def __init__(self, model_path: str | os.PathLike, n_ctx: int, threads: int = 1, kv_dtype: str = "f16",
                 lora_path: str | os.PathLike | None = None):
        """`lora_path`: a LoRA-adapter GGUF llama.cpp applies at load (edgeq's low-rank error branches)."""
        import llama_cpp
        from llama_cpp._logger import set_verbose
        from llama_cpp._utils import suppress_stdout_stderr

        if kv_dtype not in KV_TYPES:
            raise BundleError(model_path, f"unsupported KV-cache dtype {kv_dtype!r}")
        self._lib = lib = llama_cpp
        self._error_branches = None                 # the bundle's low-rank error branches (llama_adapter_lora *)
        self._loras = {}                            # users' adapters read so far, by name (llama_adapter_lora *)
        set_verbose(False)                          # llama.cpp's log: errors only
        _init_backend()
        mapped: list[tuple[int, int]] = []

        def loaded_some(progress: float, _data) -> bool:
            """Between tensors: drop the file's pages read so far (runtime/memory.py), so the pages of tensors
            llama.cpp copied into repacked buffers never pile up: peak memory is the model's, not model + file."""
            mapped[:] = mapped or mapped_ranges(model_path)
            drop_pages(mapped)
            return True

        params = lib.llama_model_default_params()
        params.progress_callback = on_progress = lib.llama_progress_callback(loaded_some)
        with suppress_stdout_stderr(disable=False):  # the loader prints to stdout too
            self.model = lib.llama_model_load_from_file(os.fspath(model_path).encode("utf-8"), params)
        del on_progress
        if not self.model:
            raise BundleError(model_path, "llama.cpp cannot load this model file")
        drop_pages(mapped or mapped_ranges(model_path))
        try:
            self.vocab = lib.llama_model_get_vocab(self.model)
            self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
            self._bos = int(lib.llama_vocab_bos(self.vocab))
            p = lib.llama_context_default_params()
            p.n_ctx = n_ctx
            p.n_batch = p.n_ubatch = min(n_ctx, MAX_BATCH)
            p.n_threads = p.n_threads_batch = threads
            p.type_k = p.type_v = KV_TYPES[kv_dtype]
            # Flash attention on CPU reads the f16/q8_0 cache in place instead of converting K and V for two
            # matmuls: measured 1.34x decode at 1 thread (bench/runtime.py: llama-bench -fa 1 vs -fa 0), and
            # llama.cpp quantizes the V cache only with it. An f32 cache is the exactness path: kept unfused.
            p.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_DISABLED if kv_dtype == "f32"
                                 else lib.LLAMA_FLASH_ATTN_TYPE_ENABLED)
            self.context_params = p
            self.ctx = LlamaContext(self.model, p, self.n_vocab)
            self.n_ctx = n_ctx
            if lora_path is not None:
                self._error_branches = self._read_lora(Path(lora_path))
                self._apply_loras([])
        except BaseException:
            self.close()
            raise

    @property
    def threads(self) -> int:
        """The threads llama.cpp decodes with."""
        return self.ctx.threads

    def _read_lora(self, path: Path):
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):      # llama.cpp logs a line per tensor
            handle = self._lib.llama_adapter_lora_init(self.model, os.fspath(path).encode("utf-8"))
        if not handle:
            raise BundleError(path, "llama.cpp cannot apply this LoRA adapter to the bundle's model "
                                    "(made for another base model?)")
        return handle

    def set_adapters(self, chosen: list[tuple[str, float]], open_file: Callable[[str], Path]) -> None:
        """Apply these LoRA adapters (name, scale) over the model, with the bundle's error branches if any.

        Each adapter file is read once (`open_file` checks it against the manifest) and kept for later
        switches; switching is llama.cpp's `llama_set_adapters_lora`, no reload of the base. llama.cpp adds
        scale·B·(A·x) per adapter (alpha 0 in edgeq's files: the scale is the weight alone)."""
        for name, _ in chosen:
            if name not in self._loras:
                self._loras[name] = self._read_lora(open_file(name))
        self._apply_loras([(self._loras[name], scale) for name, scale in chosen])
        self.reset()     # the KV cache holds keys and values computed with the previous adapters

    def _apply_loras(self, pairs: list[tuple[object, float]]) -> None:
        lib = self._lib
        if self._error_branches is not None:
            pairs = [(self._error_branches, 1.0), *pairs]
        n = len(pairs)
        handles = (lib.llama_adapter_lora_p_ctypes * n)(*(h for h, _ in pairs)) if n else None
        scales = (ctypes.c_float * n)(*(s for _, s in pairs)) if n else None
        if lib.llama_set_adapters_lora(self.ctx.ctx, handles, n, scales):
            raise BundleError(None, "llama.cpp refused the adapters")
        self.ctx.graph_changed = True         # llama.cpp reserves the graph again in the next decode

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return buf[:n]
            cap = -n
        raise RequestError(f"llama.cpp could not tokenize a text of {len(data)} bytes")

    def detokenize(self, ids: list[int]) -> str:
        """The tokens' text, special tokens left out, as llama-cpp-python's `Llama.detokenize` gives it (the
        space a SentencePiece vocabulary puts before the first word is dropped after a BOS)."""
        out, buf = bytearray(), ctypes.create_string_buffer(64)
        for t in ids:
            n = self._lib.llama_token_to_piece(self.vocab, int(t), buf, len(buf), 0, False)
            if n < 0:                                   # a longer piece: its length, negated
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self.vocab, int(t), buf, len(buf), 0, False)
            out += buf.raw[:n]
        if ids and int(ids[0]) == self._bos and out[:1] == b" ":
            del out[:1]
        return out.decode("utf-8", errors="replace")

    def reset(self) -> None:
        self.ctx.reset()

    def feed(self, ids: list[int], logits: bool = True) -> np.ndarray | None:
        """Append tokens to the KV cache; the logits after the last one (a copy), or None without `logits`
        (llama.cpp's sampler reads them in place)."""
        if len(ids) == 1:
            self.ctx.step(int(ids[0]))
        else:
            self.ctx.decode(ids)
        return self.ctx.last_logits() if logits else None

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of a fresh sequence, shape (len(ids), n_vocab): only this call computes
        them all."""
        if len(ids) > self.n_ctx:
            raise RequestError(f"{len(ids)} tokens exceed n_ctx {self.n_ctx}", code="context_length_exceeded")
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
        self.reset()
        self.ctx.decode(ids, every=True,
                        on_chunk=lambda start, n: out.__setitem__(slice(start, start + n), self.ctx.output_logits(n)))
        return out

    def sampler(self, params: SamplingParams) -> "LlamaCppSampler":
        """llama.cpp's own sampler chain, reading the logits `feed` left in the context."""
        return LlamaCppSampler(self, params)

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            ctx.close()
        loras, self._loras = self._loras, {}
        for handle in [*loras.values(), *([self._error_branches] if self._error_branches is not None else [])]:
            lib.llama_adapter_lora_free(handle)      # before the model that owns them
        self._error_branches = None
        model, self.model = self.model, None
        if model:
            lib.llama_model_free(model)

    def __del__(self) -> None:
        self.close()


_BACKEND_READY = False


def _init_backend() -> None:
    """llama.cpp's one-time process setup (llama_backend_init), as `Llama` does it on its first load."""
    global _BACKEND_READY
    if not _BACKEND_READY:
        import llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):
            llama_cpp.llama_backend_init()
        _BACKEND_READY = True


class LlamaCppSampler:
    """llama.cpp's sampler chain (what llama-cli and llama-server build) for these settings.

    The steps and their order are edgeq's `SamplingParams` order, which is llama.cpp's: logit bias,
    penalties, top-k, top-p, min-p, temperature, then a seeded draw (`dist`), or `greedy` at temperature 0.
    It samples from the last position of the context's logits where llama.cpp left them: the decode loop asks
    `feed` for no copy (`needs_logits` False).
    """

    needs_logits = False

    def __init__(self, backend: LlamaCppBackend, params: SamplingParams):
        import llama_cpp

        self._lib = llama_cpp
        self._ctx = backend.ctx.ctx
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

    def sample(self, logits: np.ndarray | None = None) -> int:
        return int(self._lib.llama_sampler_sample(self.chain, self._ctx, -1))   # also accepts the token

    def close(self) -> None:
        chain, self.chain = self.chain, None
        if chain is not None:
            self._lib.llama_sampler_free(chain)

    def __del__(self) -> None:
        self.close()
