"""A bundle run on a HIL device, behind the session interface `edgeq run` and `edgeq eval` use.

`--device` takes the HIL grammar everywhere: `local` (or `cpu`) runs in this process, `rpc://HOST:PORT` is a
TVM RPC server the TVM runtime drives, and `ssh://...`, `adb:...`, `qemu-arm64` run the bundle on that device
through the on-device runner (runtime/remote.py): the bundle is pushed once, each call is one runner
request, and text is tokenized here with the bundle's own tokenizer (the same ids the device would make).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.devices import open_device

IN_PROCESS = (None, "", "cpu", "local")


def runs_remotely(device: str | None) -> bool:
    """Whether `device` names a HIL device the runner is sent to (not this process, not a TVM RPC server)."""
    return device not in IN_PROCESS and not str(device).startswith("rpc://")


class DeviceSession:
    """generate / logits / embed of a decoder or encoder bundle, computed on a HIL device."""

    def __init__(self, bundle: str | Path, device: str, backend: str | None = None, threads: int | None = 1,
                 n_ctx: int | None = None, pruning_rate: float | None = None):
        from edgeq.runtime import bundle_spec
        from edgeq.runtime.manifest import pick_artifact, read_manifest, verify_artifacts

        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle)
        verify_artifacts(self.bundle, self.manifest)
        self.backend_name = pick_artifact(self.bundle, self.manifest, backend)["backend"]
        self.kind = self.manifest["model"].get("kind")
        self.spec = bundle_spec(self.bundle, self.manifest) if self.kind == "decoder" else None
        self.threads, self.n_ctx, self.pruning_rate = threads, n_ctx, pruning_rate
        self.device = open_device(device)
        why = self.device.unreachable_reason() or self.device.missing_backend_reason(self.backend_name)
        if why:
            self.device.close()
            raise EdgeqError(None, why)
        self.remote = self.device.push(self.bundle)
        self._tok = None

    def _run(self, op: str, args: dict[str, Any]):
        res = self.device.run(self.remote, op, args, backend=self.backend_name, threads=self.threads,
                              n_ctx=self.n_ctx, pruning_rate=self.pruning_rate)
        if not res.ok:
            raise EdgeqError(self.bundle, f"{self.device.name}: {res.error}")
        return res

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        from edgeq.runtime.tokenizer import build_tokenizer, encode

        if self.spec is None:
            raise EdgeqError(self.bundle, "this bundle has no decoder tokenizer")
        if self._tok is None:
            self._tok = build_tokenizer(self.spec)
        return encode(self._tok, self.spec, text, add_special=add_special, parse_special=parse_special)

    def logits(self, token_ids) -> np.ndarray:
        res = self._run("logits", {"token_ids": [int(t) for t in token_ids]})
        return np.load(res.outputs / "logits.npy", allow_pickle=False)

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 chat: bool = False, **_) -> str:
        res = self._run("generate", {"prompt": prompt, "max_tokens": int(max_tokens), "chat": bool(chat),
                                     "temperature": float(temperature), "seed": int(seed)})
        return res.result["text"]

    def embed(self, texts) -> np.ndarray:
        single = isinstance(texts, str)
        res = self._run("embed", {"texts": [texts] if single else list(texts)})
        e = np.load(res.outputs / "embeddings.npy", allow_pickle=False)
        return e[0] if single else e

    def close(self) -> None:
        self.device.close()

    def __enter__(self) -> "DeviceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

