"""A TVM decoder bundle (targets/tvm/decoder.py) behind `Session`'s backend interface. No torch.

`feed` appends tokens: the caches are n_ctx-row arrays allocated once on the
device and written in place by each call at the rows after the `past` it is
given (bundles from before `tvm.kv_cache` return grown copies, handed back on
the next call), so a decode step copies only the new logits to the host. One new token runs the `decode` function (static shapes,
the tunable one), several run `prefill_last` (the manifest's `feed_entry`: the
last token's logits only; bundles without one run `prefill`), and `logits` runs
`prefill` (every position's). Tokenization is edgeq's own (the
bundle's tokenizer spec), so ids match the GGUF artifact of the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.core.errors import RequestError
from edgeq.runtime.arrays import read_aligned_arrays
from edgeq.runtime.lora import HeldAdapter, LoraFactorStore, checked_factors
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
        # `kv_cache: in_place`: caches of n_ctx rows allocated once, the rows filled so far passed as the shape
        # input `past` and written in place by each call; older bundles take caches of exactly the rows filled and
        # return them grown (a copy per call)
        self.in_place = tvm_spec.get("kv_cache") == "in_place"
        self.kv = [(int(s["shape"][0]), int(s["shape"][2])) for s in session.inputs[2 if self.in_place else 1:]]
        self.decode_entry = tvm_spec.get("decode_entry")
        self.feed_entry = tvm_spec.get("feed_entry")
        self.n_vocab = int(session.outputs[0]["shape"][-1])
        # LoRA parameters (bundles exported with --adapter-mode separate): weight -> (index of A, of B, in, out)
        index = {n: i for i, n in enumerate(session.param_names)}
        self.lora = {n[: -len(".lora_a")]: (i, index[n[:-1] + "b"], int(session.params[i].shape[0]),
                                            int(session.params[index[n[:-1] + "b"]].shape[1]))
                     for n, i in index.items() if n.endswith(".lora_a") and n[:-1] + "b" in index}
        self._base_lora = {w: (session.params[i], session.params[j]) for w, (i, j, _, _) in self.lora.items()}
        self._lora = LoraFactorStore(lambda path: self._read_lora(path, read_aligned_arrays(path)))
        self._sparse: dict[str, dict[str, tuple[np.ndarray, ...]]] = {}   # SHiRA adapters read so far (in place)
        self._read_names: set[str] = set()          # every adapter read so far (SHiRA or LoRA)
        self._applied: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # (flat view, positions, old values)
        self.reset()

    def set_adapters(self, chosen: list[tuple[str, float]], open_file: Callable[[str], Path]) -> None:
        """Pass these adapters (name, scale) as the library's LoRA parameters (runtime/lora.py's LoraFactorStore:
        one adapter its file's arrays, several their factors side by side, so their deltas add); the params
        file's zeros where none applies. SHiRA adapters are added in place to their weights (the values they
        overwrite kept, and put back first). The library is not rebuilt or reloaded. `open_file` checks a file
        against the manifest each time it is read."""
        for name, _ in chosen:
            if name not in self._read_names:
                self._read_adapter(open_file(name), name)
        sparse = [(n, s) for n, s in chosen if n in self._sparse]
        chosen = [(n, s) for n, s in chosen if n not in self._sparse]
        plan = [self._sparse_plan(self._sparse[n], s) for n, s in sparse]   # every check before any write
        if chosen and not self.lora:
            raise BundleError(None, "this TVM library has no LoRA parameters (not exported with --adapter-mode "
                                    "separate)")
        factors = self._lora.select(chosen, open_file)
        for flat, pos, old in reversed(self._applied):      # the base's own values back, exactly
            flat[pos] = old
        self._applied = []
        for steps in plan:
            for flat, pos, add in steps:
                old = flat[pos].copy()
                flat[pos] = (old.astype(np.float32) + add).astype(flat.dtype)
                self._applied.append((flat, pos, old))
        for w, (i, j, _, _) in self.lora.items():
            a, b = factors.get(w, (None, None))
            if a is None:
                self.session.params[i], self.session.params[j] = self._base_lora[w]
            else:       # on this machine's CPU the arrays themselves (aligned), shared with the VM: no copy
                self.session.params[i], self.session.params[j] = self._device(a), self._device(b)
        self.reset()

    def _device(self, arr: np.ndarray):
        """A parameter tensor for `arr`: on this machine's CPU the same memory (an adapter resident once),
        elsewhere a copy on the device."""
        import tvm

        if self.session.remote is None and self.session.dev.dlpack_device_type() == tvm.cpu(0).dlpack_device_type():
            return tvm.runtime.from_dlpack(arr)
        return tvm.runtime.tensor(arr, self.session.dev)

    def _sparse_plan(self, entries: dict[str, tuple[np.ndarray, ...]], scale: float) -> list:
        """A SHiRA adapter's writes at this scale: per weight, the flat view of its parameter (shared with the VM:
        an in-place change), the positions and the values to add."""
        return [(flat, pos, add * np.float32(scale)) for flat, pos, add in entries.values()]

    def _read_adapter(self, path: Path, name: str) -> None:
        """An adapter's safetensors, read the first time it is chosen: a SHiRA adapter's entries checked against
        the weights they change (f32 or f16 parameters, on this machine's memory), kept; LoRA factors checked
        against the library's LoRA parameters, handed to the factor store."""
        arrays = read_aligned_arrays(path)
        keys = list(arrays)
        if keys and all(".shira_" in k for k in keys):
            self._sparse[name] = self._read_sparse(path, arrays)
        else:
            self._lora.add(name, self._read_lora(path, arrays))
        self._read_names.add(name)

    def _read_lora(self, path: Path, arrays: dict[str, np.ndarray]) -> HeldAdapter:
        """The factors as read (aligned arrays, shared with the VM as they are)."""
        shapes = {w: (n_in, n_out) for w, (_, _, n_in, n_out) in self.lora.items()}
        return HeldAdapter(checked_factors(path, arrays, shapes, ("a", "b")))

    def reset(self) -> None:
        import tvm

        rows = self.n_ctx if self.in_place else 0
        if not (self.in_place and getattr(self, "past", None)):       # in place: the arrays allocated once
            self.past = [tvm.runtime.tensor(np.zeros((h, rows, d), np.float32), self.session.dev) for h, d in self.kv]
        self.n_tokens = 0

    def _run(self, ids: list[int], every_position: bool = False):
        """The graph on the new tokens: the cache stays on the device; the logits come back as a device tensor,
        of every position with `every_position`, else at least of the last one."""
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
        if n == 1 and self.decode_entry:
            entry = self.decode_entry
        else:
            entry = self.feed_entry if self.feed_entry and not every_position else self.session.entry
        past = (tvm.runtime.ShapeTuple([self.n_tokens]),) if self.in_place else ()
        out = self.session.vm[entry](tvm.runtime.tensor(x.astype(np.int32), self.session.dev), *past, *self.past,
                                     *self.session.params)
        out = list(out)
        self.past = out[1:]
        self.n_tokens += n
        return out[0]

    def feed(self, ids: list[int], logits: bool = True) -> np.ndarray | None:
        """Append tokens to the KV cache; logits after the last one (copied to the host; None without
        `logits`)."""
        out = self._run(list(ids))
        return np.asarray(out.numpy()[-1], dtype=np.float32) if logits else None

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of a fresh sequence, shape (len(ids), n_vocab)."""
        self.reset()
        out = self._run(list(ids), every_position=True).numpy()
        self.reset()
        return np.asarray(out, dtype=np.float32)

    def _read_sparse(self, path: Path, arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, ...]]:
        import tvm

        if self.session.remote is not None or self.session.dev.dlpack_device_type() != tvm.cpu(0).dlpack_device_type():
            raise BundleError(path, "SHiRA adapters are applied in place in this process's CPU memory; not over RPC "
                                    "or on a GPU yet")
        index = {n: i for i, n in enumerate(self.session.param_names)}
        out = {}
        for w in sorted({k.rpartition(".shira_")[0] for k in arrays}):
            idx, vals = arrays.get(w + ".shira_indices"), arrays.get(w + ".shira_weight")
            if idx is None or vals is None:
                raise BundleError(path, f"{w}: a SHiRA adapter needs shira_indices and shira_weight")
            if w not in index:
                raise BundleError(path, f"changes {w}, which this library does not have (made for another base?)")
            p = self.session.params[index[w]]
            if str(p.dtype) not in ("float32", "float16") or len(p.shape) != 3:
                raise BundleError(path, f"SHiRA is applied in place to f32 or f16 weights; {w} is stored as "
                                        f"{p.dtype} (export it f16 or f32)")
            n_out, n_in = int(p.shape[0]) * int(p.shape[2]), int(p.shape[1])
            if idx.ndim != 2 or idx.shape[0] != 2 or vals.ndim != 1 or idx.shape[1] != vals.shape[0] or \
                    not np.issubdtype(idx.dtype, np.integer) or vals.dtype != np.float32:
                raise BundleError(path, f"{w}: SHiRA indices {idx.shape} {idx.dtype} and values {vals.shape} "
                                        f"{vals.dtype} do not fit")
            rows, cols = idx[0].astype(np.int64), idx[1].astype(np.int64)
            if rows.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= n_out or cols.max() >= n_in):
                raise BundleError(path, f"{w}: SHiRA indices outside the weight ({n_out}, {n_in}) (made for another "
                                        "base model?)")
            # where (out, in) entries live in the panelled parameter (ops.panels: (out/P, in, P)), each position
            # once with its values summed (repeated pairs add), computed once so that a switch only scatters
            view = np.from_dlpack(p)
            panel = view.shape[2]
            pos, inv = np.unique(np.ravel_multi_index((rows // panel, cols, rows % panel), view.shape),
                                 return_inverse=True)
            out[w] = (view.reshape(-1), pos, np.bincount(inv, weights=vals.astype(np.float64)).astype(np.float32))
        return out

    def close(self) -> None:
        self.past = []
        self.session.close()
