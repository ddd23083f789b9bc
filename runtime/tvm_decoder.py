"""A TVM decoder bundle (targets/tvm/decoder.py) behind `Session`'s backend interface. No torch.

`feed` appends tokens: the cache is the previous call's returned `k_i`/`v_i`
arrays, kept on the device and handed back, so a decode step copies only the
new logits to the host. One new token runs the `decode` function (static shapes,
the tunable one), several run `prefill`. Tokenization is edgeq's own (the
bundle's tokenizer spec), so ids match the GGUF artifact of the same model.
"""

from __future__ import annotations

import numpy as np

from edgeq.core.errors import RequestError
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
        self.reset()

    def reset(self) -> None:
        import tvm

        self.past = [tvm.runtime.tensor(np.zeros((h, 0, d), np.float32), self.session.dev) for h, d in self.kv]
        self.n_tokens = 0

    def _run(self, ids: list[int]) -> np.ndarray:
        import tvm

        n = len(ids)
        if n == 0:
            raise RequestError("no tokens to feed")
        if self.n_tokens + n > self.n_ctx:
            raise RequestError(f"context overflow: {self.n_tokens + n} tokens > n_ctx {self.n_ctx}",
                               code="context_length_exceeded")
        x = np.asarray(ids, dtype=np.int64)
        if x.min() < 0 or x.max() >= self.n_vocab:
            raise RequestError(f"token id out of range of the vocabulary ({self.n_vocab})")
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
