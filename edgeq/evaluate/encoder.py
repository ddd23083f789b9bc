"""`edgeq eval` for encoder bundles: cosine of the runtime's embeddings to the float reference's.

Text: one sentence per line (`--text`), or by default held-out sentences of
pydoc's topics that calibration never saw. The reference is edgeq's float
executor on the source model the manifest names (evaluate/source.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.evaluate.source import reference_graph
from edgeq.evaluate.texts import EVALUATION_SENTENCES_NAME, evaluation_sentences


def read_sentences(text_file: str | None, n: int) -> tuple[list[str], str]:
    if text_file is None:
        return evaluation_sentences(n), EVALUATION_SENTENCES_NAME
    p = Path(text_file)
    if not p.is_file():
        raise EdgeqError(p, "no such text file")
    try:
        lines = [l.strip() for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
    except UnicodeDecodeError:
        raise EdgeqError(p, "text file is not UTF-8") from None
    if not lines:
        raise EdgeqError(p, "no sentences (one per line expected)")
    return (lines[:n] if n > 0 else lines), p.name


def evaluate_encoder(session, text_file: str | None = None, n: int = 256, reference: str | None = None,
                     reference_embed: Callable[[list[int]], np.ndarray] | None = None,
                     progress: Callable | None = None) -> dict:
    sentences, name = read_sentences(text_file, n)
    ids = [session.tokenize(s) for s in sentences]
    if reference_embed is None:
        ex = Executor(reference_graph(session.manifest, reference, session.bundle))
        reference_embed = ex.embed
    it = ids if progress is None else progress(ids, desc="reference", unit="sentence")
    ref = np.stack([reference_embed(i) for i in it])
    got = np.concatenate([session.embed_ids(ids[i:i + 32]) for i in range(0, len(ids), 32)], 0)
    c = cosines(ref, got)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "cosine_p01": float(np.quantile(c, 0.01)),
            "n_sentences": int(c.size), "text": name}


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    return np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
