"""LoRA factors read from an adapter file, checked against the weights a runtime takes them on, and combined for
the adapters a session applies.

ONNX and TVM bundles name the factors of weight W `W.lora_A`/`W.lora_B` (ONNX inputs) or `W.lora_a`/`W.lora_b`
(TVM parameters): A (in, r) and B (r, out), float32. A file from another bundle or base model is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.runtime.arrays import aligned_arrays
from edgeq.runtime.manifest import BundleError


def checked_factors(path: Path, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]],
                    names: tuple[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{weight: (A, B)} from `arrays`, whose keys are `<weight>.lora_<names[0] or names[1]>`; `shapes`: weight ->
    (in, out) of the weights that take factors."""
    a_suffix, b_suffix = (f".lora_{n}" for n in names)
    for key in arrays:
        w, sep, part = key.rpartition(".lora_")
        if not sep or part not in names:
            raise BundleError(path, f"unexpected tensor {key!r} in a LoRA adapter file")
        if w not in shapes:
            raise BundleError(path, f"adapts {w}, which this model takes no LoRA factors for (made for another base "
                                    "model or bundle?)")
    out = {}
    for w in sorted({k.rpartition(".lora_")[0] for k in arrays}):
        a, b = arrays.get(w + a_suffix), arrays.get(w + b_suffix)
        n_in, n_out = shapes[w]
        if a is None or b is None or a.dtype != np.float32 or b.dtype != np.float32 or a.ndim != 2 or \
                b.ndim != 2 or a.shape[0] != n_in or b.shape[1] != n_out or a.shape[1] != b.shape[0]:
            raise BundleError(path, f"{w}: LoRA factors {getattr(a, 'shape', None)} and {getattr(b, 'shape', None)} "
                                    f"do not fit the weight ({n_out}, {n_in}) (made for another base model?)")
        out[w] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return out


Factors = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class HeldAdapter:
    """An adapter's factors as a runtime read them; `owner`: what holds their memory where the arrays are views
    of it (onnxruntime's adapter object over the file's bytes), kept alive with them."""
    factors: Factors
    owner: object = None


@dataclass
class _Combination:
    """Factors built for a choice of several adapters (or one at another scale): per weight, A side by side along
    the rank and B·scale stacked likewise; `spans`: weight -> [(name, first rank, rank)] of each member."""
    chosen: tuple[tuple[str, float], ...]
    factors: Factors
    spans: dict[str, list[tuple[str, int, int]]]


class LoraFactorStore:
    """The LoRA factors a runtime feeds for a choice of adapters, each adapter's bytes resident once.

    An adapter applied alone at scale 1 is fed the arrays its file was read into, kept for later switches.
    Several adapters (or one at another scale) are fed per weight their A side by side along the rank and their
    B·scale stacked likewise: that combination is a copy, so its members' own arrays are dropped when it is
    built (keeping both held every combined adapter twice: the second adapter of a pair grew resident memory by
    3x its file). Leaving the combination gives the members at scale 1 their own arrays back out of it
    (exactly their bytes: A is never scaled, B·1 is B), or copies them straight into the next combination, so
    moving between an adapter and combinations with it reads no file; a member at another scale is read again
    (`open_file` checks the file once more) when next chosen, since B·scale/scale is not always B to the bit.
    """

    def __init__(self, read: Callable[[Path], HeldAdapter]):
        self._read = read
        self._held: dict[str, HeldAdapter] = {}
        self._combined: _Combination | None = None

    @property
    def held_alone(self) -> list[str]:
        """The adapters whose own arrays are held now (the rest are read again, or live in the combination)."""
        return sorted(self._held)

    def add(self, name: str, held: HeldAdapter) -> None:
        """An adapter the runtime read itself (its first read, which told it the file holds LoRA factors)."""
        self._held[name] = held

    def select(self, chosen: list[tuple[str, float]], open_file: Callable[[str], Path]) -> Factors:
        """{weight: (A, B)} for these adapters (name, scale); weights no chosen adapter changes are absent."""
        key = tuple(chosen)
        if self._combined is not None and self._combined.chosen == key:
            return self._combined.factors
        alone = len(chosen) == 1 and chosen[0][1] == 1.0
        # members of the combination left that the next one takes too are copied from it straight into the next
        members = self._leave_combination(set() if alone else {n for n, _ in chosen})

        def factors(name: str) -> Factors:
            if name in members:
                return members[name]
            if name not in self._held:
                self._held[name] = self._read(open_file(name))
            return self._held[name].factors

        if alone:
            return factors(chosen[0][0])
        if not chosen:
            return {}
        parts = [(n, factors(n), np.float32(s)) for n, s in chosen]
        layout = {}         # weight -> [(name, A, B, scale)] of the members that change it
        for w in sorted({w for _, f, _ in parts for w in f}):
            layout[w] = [(n, *f[w], s) for n, f, s in parts if w in f]
        shapes = []
        for ms in layout.values():
            rank = sum(a.shape[1] for _, a, _, _ in ms)
            shapes += [((ms[0][1].shape[0], rank), np.float32), ((rank, ms[0][2].shape[1]), np.float32)]
        arrays = iter(aligned_arrays(shapes))
        out, spans = {}, {}
        for w, ms in layout.items():
            a_all, b_all = next(arrays), next(arrays)
            spans[w], row = [], 0
            for n, a, b, s in ms:
                r = a.shape[1]
                a_all[:, row:row + r] = a
                np.multiply(b, s, out=b_all[row:row + r])
                spans[w].append((n, row, r))
                row += r
            out[w] = (a_all, b_all)
        for n, _ in chosen:
            self._held.pop(n, None)     # their bytes live in the combination from now on
        self._combined = _Combination(key, out, spans)
        return out

    def _leave_combination(self, next_members: set[str]) -> dict[str, Factors]:
        """Drop the combination. Its members at scale 1 are held alone again, copied out of it (each into one
        buffer of its own, so that dropping one frees its bytes), except those in `next_members`, whose factors
        are returned as views of it instead (a source for the next combination, no copy in between)."""
        c, self._combined = self._combined, None
        views: dict[str, Factors] = {}
        if c is None:
            return views
        for name, scale in c.chosen:
            if scale != 1.0:
                continue
            mine = [(w, row, r) for w, spans in c.spans.items() for n, row, r in spans if n == name]
            if name in next_members:
                views[name] = {w: (c.factors[w][0][:, row:row + r], c.factors[w][1][row:row + r])
                               for w, row, r in mine}
                continue
            arrays = iter(aligned_arrays([spec for w, _, r in mine for spec in (
                ((c.factors[w][0].shape[0], r), np.float32), ((r, c.factors[w][1].shape[1]), np.float32))]))
            factors = {}
            for w, row, r in mine:
                a, b = next(arrays), next(arrays)
                a[...] = c.factors[w][0][:, row:row + r]
                b[...] = c.factors[w][1][row:row + r]
                factors[w] = (a, b)
            self._held[name] = HeldAdapter(factors)
        return views
