"""The on-device runtime: open a bundle, verify it, run it. No torch, no compiler.

    s = edgeq.runtime.load("out/")
    s.generate("The capital of France is", max_tokens=16)
    for piece in s.stream([{"role": "user", "content": "Hi!"}], temperature=0.7, top_p=0.9):
        print(piece, end="", flush=True)
    s.logits(token_ids)

A bundle exported with `--adapter-mode separate` holds LoRA adapters beside its base:
`load("out/", adapters={"chat": 1.0})`, then `s.set_adapters({"sql": 0.5})` switches without reloading the base
and `s.set_adapters({})` gives the base model back.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from edgeq.core.errors import RequestError
from edgeq.runtime import gguf_backend, onnx_backend, tvm_backend
from edgeq.runtime.generation import Completion, TokenStream
from edgeq.runtime.manifest import (
    BundleError,
    check_runtime_version,
    listed_path,
    lora_adapters,
    pick_artifact,
    pick_pruning,
    read_manifest,
    verified_file,
    verify_artifacts,
)
from edgeq.runtime.memory import release_freed_heap
from edgeq.runtime.sampling import MAX_SEED, NumpySampler, Sampler, SamplingParams
from edgeq.runtime.threads import checked_threads, default_threads
from edgeq.runtime.tokenizer import chat_messages, render_chat, spec_from_json, stop_ids

__all__ = ["load", "Session", "BundleError", "Completion", "RequestError", "SamplingParams", "parse_adapter_choice"]

AdapterChoice = Mapping[str, "float | None"] | Iterable[str] | None

# the runtimes a bundle's artifacts run in, by backend name; each module imports its library (llama_cpp,
# onnxruntime, tvm) only when it opens an artifact, so a device needs only the ones its bundles use
BACKENDS = {m.NAME: m for m in (gguf_backend, onnx_backend, tvm_backend)}


def runtime_dists() -> list[str]:
    """The distributions whose versions bundles record and latency profiles depend on, one per backend."""
    return sorted({m.RUNTIME_DIST for m in BACKENDS.values()})


class Session:
    """A loaded decoder bundle: its tokenizer and one backend, and the decode loop over them.

    `stream` is the one way text is generated (`generate` and `chat` join its pieces); a prompt is a string
    (continued as it is, or sent as one user message with `chat=True`) or an OpenAI-style message list, which
    goes through the bundle's chat template. Sampling settings are those of `SamplingParams`, as keywords.
    """

    def __init__(self, bundle: Path, manifest: dict[str, Any], backend, artifact: dict[str, Any], threads: int = 1,
                 spec=None):
        self.bundle = bundle
        self.manifest = manifest
        self.backend = backend
        self.artifact = artifact
        self.threads = threads          # CPU threads the backend was opened with
        self.spec = spec if spec is not None else bundle_spec(bundle, manifest)   # the backend's, parsed once
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

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.backend.tokenize(text, add_special, parse_special)

    def detokenize(self, ids) -> str:
        return self.backend.detokenize(ids)

    def logits(self, token_ids) -> np.ndarray:
        return self.backend.logits([int(t) for t in token_ids])

    def chat_prompt(self, messages: str | list[dict]) -> str:
        """The chat template's text for a message list (a string is one user message), ready for the reply."""
        return render_chat(self.spec, chat_messages(messages), add_generation_prompt=True)

    def sampler(self, **sampling) -> Sampler:
        """The backend runtime's own sampler where it has one (llama.cpp's chain), else edgeq's; the settings
        are checked first (seed None: a random seed)."""
        if sampling.get("seed", 0) is None:
            sampling["seed"] = secrets.randbelow(MAX_SEED + 1)
        params = SamplingParams(**sampling).check(self.backend.n_vocab)
        own = getattr(self.backend, "sampler", None)
        return own(params) if own is not None else NumpySampler(params)

    def prompt_ids(self, prompt: str | list[dict] | list[int], chat: bool = False, max_tokens: int = 128,
                   truncate: bool = False) -> list[int]:
        """A prompt's token ids (a list of ints is taken as it is), checked to leave room for a reply.

        A prompt that fills the context is an error; with `truncate` a prompt is cut so that `max_tokens` (at
        most half the context) fit after it: a message list loses its oldest turns after the system message,
        then any text loses its start (its BOS is kept)."""
        if isinstance(prompt, (list, tuple)) and all(_is_token(t) for t in prompt):
            ids = [int(t) for t in prompt]
            if not all(0 <= t < self.backend.n_vocab for t in ids):
                raise RequestError(f"prompt token ids must be below {self.backend.n_vocab}", param="prompt")
        elif isinstance(prompt, str) and not chat:
            ids = self.tokenize(prompt, add_special=True, parse_special=False)
        else:
            messages = self.fit_messages(prompt, max_tokens) if truncate else prompt
            ids = self._chat_ids(messages)
        return self._fit(ids, max_tokens, truncate)

    def fit_messages(self, messages: str | list[dict], max_tokens: int = 128) -> list[dict]:
        """The messages without their oldest turns (the system message stays) until the prompt leaves room for
        `max_tokens` (at most half the context), or only the last turn is left."""
        messages = chat_messages(messages)
        while len(self._chat_ids(messages)) > self._room(max_tokens):
            shorter = _drop_oldest_turn(messages)
            if shorter is None:
                break
            messages = shorter
        return messages

    def _chat_ids(self, messages) -> list[int]:
        return self.tokenize(self.chat_prompt(messages), add_special=True, parse_special=True)

    def _room(self, max_tokens: int) -> int:
        return self.n_ctx - min(max(int(max_tokens), 1), self.n_ctx // 2)

    def _fit(self, ids: list[int], max_tokens: int, truncate: bool) -> list[int]:
        if not ids:
            raise RequestError("the prompt is empty (no tokens)", param="prompt")
        if truncate and len(ids) > self._room(max_tokens):
            head = ids[:1] if self.spec.add_bos and ids[0] == self.spec.bos_id else []
            return head + ids[len(ids) - self._room(max_tokens) + len(head):]
        if len(ids) >= self.n_ctx:
            raise RequestError(f"the prompt is {len(ids)} tokens and the context holds {self.n_ctx} (n_ctx): shorten "
                               "it, load the bundle with a larger n_ctx, or truncate it", param="prompt",
                               code="context_length_exceeded")
        return ids

    def stream(self, prompt: str | list[dict] | list[int], max_tokens: int = 128, *, chat: bool = False,
               stop: Iterable[str] = (), truncate: bool = False, **sampling) -> Completion:
        """Generate from a prompt: iterate the result for text pieces as tokens are decoded (whole UTF-8
        characters), stopping at an end-of-generation token, a `stop` string (not included), `max_tokens` or the
        context's end; afterwards it says which (`finish_reason`) and the token counts."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise RequestError(f"max_tokens {max_tokens!r} is not a non-negative integer", param="max_tokens")
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in stop):
            raise RequestError("stop strings must be strings", param="stop")
        sampler = self.sampler(**sampling)
        ids = self.prompt_ids(prompt, chat, max_tokens, truncate)
        return Completion(TokenStream(self.backend, sampler, ids, max_tokens, self.stop_ids), self.detokenize, stop)

    def generate(self, prompt: str | list[dict], max_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 chat: bool = False, top_k: int = 0, top_p: float = 1.0, **options) -> str:
        """The whole text `stream` would give (options: `stop`, `truncate`, and the other sampling settings)."""
        return self.stream(prompt, max_tokens, chat=chat, temperature=temperature, seed=seed, top_k=top_k,
                           top_p=top_p, **options).result()

    def chat(self, messages: list[dict], max_tokens: int = 128, **options) -> str:
        """The assistant's reply to an OpenAI-style message list (system, user, assistant ...)."""
        return self.stream(messages, max_tokens, chat=True, **options).result()

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                     top_k: int = 0, top_p: float = 1.0, **sampling) -> list[int]:
        """Token ids after `prompt_ids` (the end-of-generation token is not included)."""
        ids = self.prompt_ids(list(prompt_ids), max_tokens=max_tokens)
        sampler = self.sampler(temperature=temperature, seed=seed, top_k=top_k, top_p=top_p, **sampling)
        return list(TokenStream(self.backend, sampler, ids, max_tokens, self.stop_ids))

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


def _is_token(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, bool)


def _drop_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """The messages without their oldest turn after the leading system message (up to the next user message,
    so a template that wants user/assistant alternation still gets it); None when only the last turn is left."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    users = [i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"]
    if not users:
        return None
    return messages[:start] + messages[users[0]:]


def bundle_spec(bundle: Path, manifest: dict[str, Any]):
    spec_file = listed_path(bundle, manifest, (manifest.get("tokenizer") or {}).get("spec"), "tokenizer.spec")
    try:
        d = json.loads(spec_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(spec_file, f"not valid JSON ({str(exc).splitlines()[0]})") from None
    return spec_from_json(d, spec_file)


def load(path: str | os.PathLike, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
         verify: bool = True, device: str | None = None, pruning_rate: float | None = None,
         adapters: AdapterChoice = None):
    """Open a bundle: a `Session` (generate/logits) for decoders (GGUF or ONNX), an `OnnxSession` or `TvmSession`
    (embed/run) for encoders and CNNs. `device` (TVM bundles): `cpu` (default) or `rpc://HOST:PORT`, a TVM RPC
    server. `pruning_rate`: one of the rates a bundle exported with `--pruning-rates` carries (the share of the MLPs'
    channels removed); the runtime narrows the model to that rate's widths before loading it.

    Every artifact's size and SHA-256 are checked against the manifest before any backend opens a file
    (`verify=False` skips that, for a bundle just written and checked by this process); a TVM library, native
    code, is checked again as it is copied to a private folder and loaded from there, whatever `verify` says.
    A failed check is a `BundleError` naming the file.

    `adapters`: the bundle's LoRA adapters to apply from the start (names, or {name: weight}); see
    `Session.set_adapters`.

    `threads`: CPU threads the runtime computes with; None: the `EDGEQ_THREADS` environment variable, else the
    bundle's device profile's count (android: 4; `auto`: the machine's physical cores), at most the machine's
    physical cores (runtime/threads.py). The session's `threads` says which."""
    bundle = Path(path)
    manifest = read_manifest(bundle)
    threads = default_threads(bundle, manifest) if threads is None else checked_threads(threads)
    pruning = pick_pruning(bundle, manifest, pruning_rate)
    if pruning is not None and manifest["model"].get("kind") != "decoder":
        raise BundleError(bundle, "pruning rates are for decoders")
    if pruning is not None and adapters:
        raise BundleError(bundle, "adapters over a pruned model (a pruning rate) are not supported yet")
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
            raise BundleError(bundle, f"adapters apply to decoders; this bundle holds a {manifest['model']['kind']}")
        model = impl.open_model(bundle, manifest, art, threads=threads, device=device)
        release_freed_heap()
        return model
    n_ctx = int(n_ctx or manifest.get("n_ctx") or 2048)
    spec = bundle_spec(bundle, manifest)
    session = Session(bundle, manifest, impl.open_decoder(bundle, manifest, art, spec, n_ctx=n_ctx, threads=threads,
                                                          device=device, pruning=pruning), art, threads, spec)
    if adapters:
        try:
            session.set_adapters(adapters)
        except BaseException:
            session.close()
            raise
    release_freed_heap()          # what loading staged and dropped: resident memory is then the model's
    return session
