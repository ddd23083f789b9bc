"""One llama.cpp context and the batch it decodes, through llama-cpp-python's C API (not its `Llama` class).

Why not `llama_cpp.Llama`: its `eval` keeps every position's logits (`logits_all`, an n_ctx x n_vocab array) and
copies them after each call, and its Python per-token path decodes at about 0.7x llama-bench (TRAPS). Here a
batch is allocated once, a decode step writes one slot of it and calls `llama_decode`, and the logits stay in
llama.cpp's buffer until a caller asks for them: the last position's, or (for evaluation) every position's of one
call, which only that call computes.

The runtime's backend (runtime/gguf_backend.py) and the per-kernel timer (runtime/gguf_ops.py) both decode
through this class, so what the timer times is what the runtime runs.
"""

from __future__ import annotations

import ctypes

import numpy as np

from edgeq.core.errors import RequestError
from edgeq.runtime.memory import release_freed_heap


class LlamaContext:
    """A context over a loaded model (`llama_model *`), its KV cache (one sequence) and a reusable batch."""

    def __init__(self, model, params, n_vocab: int):
        import llama_cpp

        self.lib = llama_cpp
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory for the KV cache?)")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_batch = int(params.n_batch)
        self.n_vocab = int(n_vocab)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        b = self.batch
        for i in range(self.n_batch):             # every token belongs to sequence 0, once and for all
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
        # numpy views of the batch's arrays: filling a prompt's batch is three slice assignments
        self._tokens = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
        self._want = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
        self.n_past = 0                            # tokens in the KV cache
        self.graph_changed = False                 # see `_decode`

    @property
    def threads(self) -> int:
        return int(self.lib.llama_n_threads(self.ctx))

    def reset(self) -> None:
        """Empty the KV cache (its cells are marked free; the next tokens overwrite them)."""
        self.lib.llama_memory_clear(self.memory, False)
        self.n_past = 0

    def step(self, token: int) -> None:
        """Append one token, its logits computed (llama-bench's decode step: a batch of one)."""
        if self.n_past >= self.n_ctx:
            self._overflow(1)
        b = self.batch
        b.token[0] = token
        b.pos[0] = self.n_past
        b.logits[0] = 1
        b.n_tokens = 1
        self._decode()
        self.n_past += 1

    def decode(self, ids, every: bool = False, on_chunk=None) -> None:
        """Append tokens in batches of at most n_batch: the last token's logits computed, or with `every`
        each token's; `on_chunk(start, n)` runs after each batch, while its logits are in the buffer."""
        n = len(ids)
        if n == 0:
            raise RequestError("no tokens to decode")
        if self.n_past + n > self.n_ctx:
            self._overflow(n)
        ids = np.asarray(ids, dtype=np.int32)
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            self._tokens[:m] = ids[start:start + m]
            self._pos[:m] = np.arange(self.n_past, self.n_past + m, dtype=np.int32)
            self._want[:m] = every
            self._want[m - 1] = every or start + m == n
            self.batch.n_tokens = m
            self._decode()
            self.n_past += m
            if on_chunk is not None:
                on_chunk(start, m)

    def last_logits(self) -> np.ndarray:
        """A copy of the last computed position's logits."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise RuntimeError("llama.cpp has no logits for the last position")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def output_logits(self, rows: int) -> np.ndarray:
        """The logits of the last decode's `rows` outputs, in batch order: a view of llama.cpp's buffer, valid
        until the next decode."""
        ptr = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rows, self.n_vocab))

    def _decode(self) -> None:
        rc = self.lib.llama_decode(self.ctx, self.batch)
        if rc == 0:
            if self.graph_changed:
                # a new set of LoRA adapters: llama.cpp reserved a new graph in this decode, freeing the old
                # compute buffers into the C heap, where glibc keeps them mapped (measured: 14 MiB more resident
                # than after returning them, 0.7x a 19 MiB adapter's file)
                self.graph_changed = False
                release_freed_heap()
            return
        if rc == 1:
            raise RequestError(f"llama.cpp found no room in the KV cache for {self.batch.n_tokens} more tokens "
                               f"(n_ctx {self.n_ctx})", code="context_length_exceeded")
        if rc == -1:
            raise RequestError(f"llama.cpp refused the batch: a token id outside the vocabulary ({self.n_vocab})?")
        raise RuntimeError(f"llama_decode failed (return code {rc})")

    def _overflow(self, n: int):
        raise RequestError(f"context overflow: {self.n_past + n} tokens > n_ctx {self.n_ctx}",
                           code="context_length_exceeded")

    def close(self) -> None:
        batch, self.batch = self.batch, None
        if batch is not None:
            self.lib.llama_batch_free(batch)
        ctx, self.ctx = self.ctx, None
        if ctx:
            self.lib.llama_free(ctx)
