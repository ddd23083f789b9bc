"""The on-device runtime: open a bundle, verify it, run it. No torch, no compiler.

    s = edgeq.runtime.load("out/")
    s.generate("The capital of France is", max_tokens=16)
    s.logits(token_ids)

A bundle exported with `--adapter-mode separate` holds LoRA adapters beside its base:
`load("out/", adapters={"chat": 1.0})`, then `s.set_adapters({"sql": 0.5})` switches without reloading the base
and `s.set_adapters({})` gives the base model back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from edgeq.runtime import gguf_backend, onnx_backend, tvm_backend
from edgeq.runtime.manifest import (
    BundleError,
    check_runtime_version,
    listed_path,
    lora_adapters,
    pick_artifact,
    read_manifest,
    verified_file,
    verify_artifacts,
)
from edgeq.runtime.sampling import sample
from edgeq.runtime.tokenizer import render_chat, spec_from_json, stop_ids

__all__ = ["load", "Session", "BundleError", "parse_adapter_choice"]

AdapterChoice = Mapping[str, "float | None"] | Iterable[str] | None

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
        self._adapters: dict[str, float] = {}

    # --- adapters kept apart from the base -----------------------------------------------------------------

    @property
    def available_adapters(self) -> dict[str, dict[str, Any]]:
        """The bundle's LoRA adapters for this backend, by name (their manifest entries: rank, scale, modules)."""
        return lora_adapters(self.manifest, self.backend.name)

    @property
    def adapters(self) -> dict[str, float]:
        """The adapters applied now, with their weights."""
        return dict(self._adapters)

    def set_adapters(self, adapters: AdapterChoice) -> None:
        """Apply exactly these adapters over the base, switching without reloading it: names (each with its
        default scale, or `NAME:WEIGHT`) or {name: weight} (None: the default scale); several add their deltas,
        as PEFT and llama.cpp do; `{}` or None gives the base model. Each adapter file is checked against the
        manifest's SHA-256 when it is first read. The KV cache starts afresh."""
        chosen = self._resolve_adapters(adapters)
        if chosen == self._adapters:
            return
        switch = getattr(self.backend, "set_adapters", None)
        if switch is None:
            raise BundleError(self.bundle, f"the {self.backend.name} runtime cannot apply separate adapters yet")
        avail = self.available_adapters
        switch(list(chosen.items()),
               lambda name: verified_file(self.bundle, self.manifest, avail[name]["path"], f"adapter {name}"))
        self._adapters = chosen

    def _resolve_adapters(self, adapters: AdapterChoice) -> dict[str, float]:
        avail = self.available_adapters
        if adapters is None:
            return {}
        if isinstance(adapters, str):
            adapters = [adapters]
        items = adapters.items() if isinstance(adapters, Mapping) else parse_adapter_choice(adapters).items()
        out: dict[str, float] = {}
        for name, weight in items:
            if name not in avail:
                have = ", ".join(sorted(avail)) or "none"
                raise BundleError(self.bundle, f"no adapter named {name!r} for {self.backend.name} in this bundle "
                                               f"(it has: {have})")
            w = avail[name]["scale"] if weight is None else weight
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise BundleError(self.bundle, f"adapter {name}: weight {weight!r} is not a finite number")
            out[name] = float(w)
        return out

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


def parse_adapter_choice(items: Iterable[str]) -> dict[str, float | None]:
    """`NAME` or `NAME:WEIGHT` items (`--use-adapter`), in order; a name given twice is refused."""
    out: dict[str, float | None] = {}
    for item in items:
        name, sep, tail = str(item).rpartition(":")
        if not sep:
            name, weight = str(item), None
        else:
            try:
                weight = float(tail)
            except ValueError:
                raise BundleError(None, f"adapter {item!r}: weight {tail!r} is not a number (NAME or "
                                        "NAME:WEIGHT)") from None
            if not math.isfinite(weight):
                raise BundleError(None, f"adapter {item!r}: weight {tail!r} is not a finite number")
        if name in out:
            raise BundleError(None, f"adapter {name!r} is given twice")
        out[name] = weight
    return out


def _spec(bundle: Path, manifest: dict[str, Any]):
    spec_file = listed_path(bundle, manifest, (manifest.get("tokenizer") or {}).get("spec"), "tokenizer.spec")
    try:
        d = json.loads(spec_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(spec_file, f"not valid JSON ({str(exc).splitlines()[0]})") from None
    return spec_from_json(d, spec_file)


def load(path: str | os.PathLike, backend: str | None = None, threads: int = 1, n_ctx: int | None = None,
         verify: bool = True, device: str | None = None, adapters: AdapterChoice = None):
    """Open a bundle: a `Session` (generate/logits) for decoders (GGUF or ONNX), an `OnnxSession` or `TvmSession`
    (embed/run) for encoders and CNNs. `device` (TVM bundles): `cpu` (default) or `rpc://HOST:PORT`, a TVM RPC
    server.

    Every artifact's size and SHA-256 are checked against the manifest before any backend opens a file
    (`verify=False` skips that, for a bundle just written and checked by this process); a TVM library, native
    code, is checked again as it is copied to a private folder and loaded from there, whatever `verify` says.
    A failed check is a `BundleError` naming the file.

    `adapters`: the bundle's LoRA adapters to apply from the start (names, or {name: weight}); see
    `Session.set_adapters`."""
    bundle = Path(path)
    manifest = read_manifest(bundle)
    if verify:
        verify_artifacts(bundle, manifest)
    art = pick_artifact(bundle, manifest, backend)
    impl = BACKENDS.get(art["backend"])
    if impl is None:
        raise BundleError(bundle, f"backend {art['backend']!r} is not supported by this runtime")
    if device not in (None, "cpu", "local") and not impl.REMOTE:
        raise BundleError(bundle, f"device {device!r} needs a tvm bundle (this one is {art['backend']})")
    check_runtime_version(manifest, impl.RUNTIME_DIST)
    if manifest["model"]["kind"] != "decoder":
        if adapters:
            raise BundleError(bundle, f"LoRA adapters apply to decoders; this bundle holds a {manifest['model']['kind']}")
        return impl.open_model(bundle, manifest, art, threads=threads, device=device)
    n_ctx = int(n_ctx or manifest.get("n_ctx") or 2048)
    session = Session(bundle, manifest, impl.open_decoder(bundle, manifest, art, _spec(bundle, manifest), n_ctx=n_ctx,
                                                          threads=threads, device=device), art)
    if adapters:
        try:
            session.set_adapters(adapters)
        except BaseException:
            session.close()
            raise
    return session
