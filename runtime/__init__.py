"""The on-device runtime: open a bundle, verify it, run it. No torch, no compiler.

    s = edgeq.runtime.load("out/")
    s.generate("The capital of France is", max_tokens=16)
    s.logits(token_ids)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.runtime import gguf_backend, onnx_backend, tvm_backend
from edgeq.runtime.manifest import (
    BundleError,
    artifact_path,
    check_runtime_version,
    pick_artifact,
    pick_pruning,
    read_manifest,
    verify_artifacts,
)
from edgeq.runtime.sampling import sample
from edgeq.runtime.tokenizer import render_chat, spec_from_json, stop_ids

__all__ = ["load", "Session", "BundleError"]

# the runtimes a bundle's artifacts run in, by backend name; each module imports its library (llama_cpp,
# onnxruntime, tvm) only when it opens an artifact, so a device needs only the ones its bundles use
BACKENDS = {m.NAME: m for m in (gguf_backend, onnx_backend, tvm_backend)}


class Session:
    """A loaded bundle: tokenizer plus one backend."""

    def __init__(self, bundle: Path, manifest: dict[str, Any], backend, artifact: dict[str, Any]):
        self.bundle = bundle
        self.manifest = manifest
        self.backend = backend
        self.artifact = artifact
        self.spec = _spec(bundle, manifest)
        self.stop_ids = stop_ids(self.spec)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.backend.tokenize(text, add_special, parse_special)

    def detokenize(self, ids) -> str:
        return self.backend.detokenize(ids)

    def logits(self, token_ids) -> np.ndarray:
        return self.backend.logits([int(t) for t in token_ids])

    def chat_prompt(self, message: str) -> str:
        return render_chat(self.spec, [{"role": "user", "content": message}], add_generation_prompt=True)

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                     top_k: int = 0, top_p: float = 1.0) -> list[int]:
        rng = np.random.default_rng(seed)
        self.backend.reset()
        logits = self.backend.feed(prompt_ids)
        out: list[int] = []
        for _ in range(max_tokens):
            tok = sample(logits, temperature, rng, top_k, top_p)
            if tok in self.stop_ids:
                break
            out.append(tok)
            if len(prompt_ids) + len(out) >= self.backend.n_ctx:
                break
            logits = self.backend.feed([tok])
        return out

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 chat: bool = False, top_k: int = 0, top_p: float = 1.0) -> str:
        text = self.chat_prompt(prompt) if chat else prompt
        ids = self.tokenize(text, add_special=True, parse_special=chat)
        return self.detokenize(self.generate_ids(ids, max_tokens, temperature, seed, top_k, top_p))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spec(bundle: Path, manifest: dict[str, Any]):
    spec_file = artifact_path(bundle, manifest["tokenizer"]["spec"])
    return spec_from_json(json.loads(spec_file.read_text(encoding="utf-8")), spec_file)


def load(path: str | os.PathLike, backend: str | None = None, threads: int = 1, n_ctx: int | None = None,
         verify: bool = True, device: str | None = None, pruning_rate: float | None = None):
    """Open a bundle: a `Session` (generate/logits) for decoders (GGUF or ONNX), an `OnnxSession` or `TvmSession`
    (embed/run) for encoders and CNNs. `device` (TVM bundles): `cpu` (default) or `rpc://HOST:PORT`, a TVM RPC
    server. `pruning_rate`: one of the rates a bundle exported with `--pruning-rates` carries (the share of the MLPs'
    channels removed); the runtime narrows the model to that rate's widths before loading it."""
    bundle = Path(path)
    manifest = read_manifest(bundle)
    pruning = pick_pruning(bundle, manifest, pruning_rate)
    if pruning is not None and manifest["model"].get("kind") != "decoder":
        raise BundleError(bundle, "pruning rates are for decoders")
    if verify:
        verify_artifacts(bundle, manifest)
    art = pick_artifact(bundle, manifest, backend)
    impl = BACKENDS.get(art["backend"])
    if impl is None:
        raise BundleError(bundle, f"backend {art['backend']!r} is not supported by this runtime")
    if device not in (None, "cpu", "local") and not impl.REMOTE:
        raise BundleError(bundle, f"device {device!r} needs a tvm bundle (this one is {art['backend']})")
    check_runtime_version(manifest, impl.RUNTIME_DIST)
    if manifest["model"].get("kind") != "decoder":
        return impl.open_model(bundle, manifest, art, threads=threads, device=device)
    n_ctx = int(n_ctx or manifest.get("n_ctx") or 2048)
    return Session(bundle, manifest, impl.open_decoder(bundle, manifest, art, _spec(bundle, manifest), n_ctx=n_ctx,
                                                       threads=threads, device=device, pruning=pruning), art)
