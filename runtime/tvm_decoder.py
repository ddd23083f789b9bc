"""A TVM decoder bundle (targets/tvm/decoder.py) behind `Session`'s backend interface. No torch.

`feed` appends tokens: the cache is the previous call's returned `k_i`/`v_i`
arrays, kept on the device and handed back, so a decode step copies only the
new logits to the host. One new token runs the `decode` function (static shapes,
the tunable one), several run `prefill`. Tokenization is edgeq's own (the
bundle's tokenizer spec), so ids match the GGUF artifact of the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.runtime.arrays import read_arrays
from edgeq.runtime.manifest import BundleError
from edgeq.runtime.text_io import TokenizerText
from edgeq.runtime.tokenizer import build_tokenizer


class TvmDecoderBackend(TokenizerText):
    name = "tvm"

    def __init__(self, session, spec, n_ctx: int):
        """`session`: the bundle's tvm_backend.TvmSession (its VM, device and parameters)."""
        self.session = session
        tvm_spec = session.manifest["tvm"]
        self.max_positions = int(tvm_spec.get("max_positions") or n_ctx)
        self.n_ctx = min(int(n_ctx), self.max_positions)
        self.spec = spec
        self.tok = build_tokenizer(spec)
        self.kv = [(int(s["shape"][0]), int(s["shape"][2])) for s in session.inputs[1:]]
        self.decode_entry = tvm_spec.get("decode_entry")
        self.n_vocab = int(session.outputs[0]["shape"][-1])
        # LoRA parameters (bundles exported with --adapter-mode separate): weight -> (index of A, of B, in, out)
        index = {n: i for i, n in enumerate(session.param_names)}
        self.lora = {n[: -len(".lora_a")]: (i, index[n[:-1] + "b"], int(session.params[i].shape[0]),
                                            int(session.params[index[n[:-1] + "b"]].shape[1]))
                     for n, i in index.items() if n.endswith(".lora_a") and n[:-1] + "b" in index}
        self._base_lora = {w: (session.params[i], session.params[j]) for w, (i, j, _, _) in self.lora.items()}
        self._lora_files: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.reset()

    def set_adapters(self, chosen: list[tuple[str, float]], open_file: Callable[[str], Path]) -> None:
        """Pass these adapters (name, scale) as the library's LoRA parameters: per weight, the active adapters' A
        stacked along the rank and their B·scale likewise (their deltas add); rank 0 where none applies. The
        library is not rebuilt or reloaded. Each file is read once (`open_file` checks it)."""
        import tvm

        for name, _ in chosen:
            if name not in self._lora_files:
                self._lora_files[name] = self._read_adapter(open_file(name))
        if chosen and not self.lora:
            raise BundleError(None, "this TVM library has no LoRA parameters (not exported with --adapter-mode "
                                    "separate)")
        for w, (i, j, _, _) in self.lora.items():
            parts = [(self._lora_files[n][w][0], self._lora_files[n][w][1] * np.float32(scale))
                     for n, scale in chosen if w in self._lora_files[n]]
            if parts:
                a = np.ascontiguousarray(np.concatenate([p[0] for p in parts], 1))
                b = np.ascontiguousarray(np.concatenate([p[1] for p in parts], 0))
                self.session.params[i] = tvm.runtime.tensor(a, self.session.dev)
                self.session.params[j] = tvm.runtime.tensor(b, self.session.dev)
            else:
                self.session.params[i], self.session.params[j] = self._base_lora[w]
        self.reset()

    def _read_adapter(self, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """An adapter's safetensors, each factor checked against the library's LoRA parameters."""
        arrays = read_arrays(path)
        keys = list(arrays)
        out = {}
        for key in keys:
            w, sep, part = key.rpartition(".lora_")
            if not sep or part not in ("a", "b"):
                raise BundleError(path, f"unexpected tensor {key!r} in a LoRA adapter file")
            if w not in self.lora:
                raise BundleError(path, f"adapts {w}, which this library has no LoRA parameters for (made for "
                                        "another base model or bundle?)")
        for w in {k.rpartition(".lora_")[0] for k in keys}:
            a, b = arrays.get(w + ".lora_a"), arrays.get(w + ".lora_b")
            _, _, n_in, n_out = self.lora[w]
            if a is None or b is None or a.dtype != np.float32 or b.dtype != np.float32 or a.ndim != 2 or \
                    b.ndim != 2 or a.shape[0] != n_in or b.shape[1] != n_out or a.shape[1] != b.shape[0]:
                raise BundleError(path, f"{w}: LoRA factors {getattr(a, 'shape', None)} and "
                                        f"{getattr(b, 'shape', None)} do not fit the weight ({n_out}, {n_in}) (made "
                                        "for another base model?)")
            out[w] = (a, b)
        return out

    def reset(self) -> None:
        import tvm

        self.past = [tvm.runtime.tensor(np.zeros((h, 0, d), np.float32), self.session.dev) for h, d in self.kv]
        self.n_tokens = 0

    def _run(self, ids: list[int]) -> np.ndarray:
        import tvm

        n = len(ids)
        if n == 0:
            raise ValueError("no tokens to feed")
        if self.n_tokens + n > self.n_ctx:
            raise ValueError(f"context overflow: {self.n_tokens + n} tokens > n_ctx {self.n_ctx}")
        x = np.asarray(ids, dtype=np.int64)
        if x.min() < 0 or x.max() >= self.n_vocab:
            raise ValueError(f"token id out of range of the vocabulary ({self.n_vocab})")
        entry = self.decode_entry if n == 1 and self.decode_entry else self.session.entry
        out = self.session.vm[entry](tvm.runtime.tensor(x.astype(np.int32), self.session.dev), *self.past,
                                     *self.session.params)
        out = list(out)
        self.past = out[1:]
        self.n_tokens += n
        return out[0].numpy()

    def feed(self, ids: list[int]) -> np.ndarray:
        """Append tokens to the KV cache; logits after the last one."""
        return np.asarray(self._run(list(ids))[-1], dtype=np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of a fresh sequence, shape (len(ids), n_vocab)."""
        self.reset()
        out = self._run(list(ids))
        self.reset()
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.past = []
        self.session.close()
