"""What the encoder benchmarks share: the MiniLM fixture (the timed input and the float reference
embeddings) and the interleaved timing loop, so each bench differs only in the variants it builds."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class EncoderFixture:
    """The timed input (one sequence of `seq` tokens) and held-out sentences with their reference embeddings."""

    long_ids: list[int]
    sentence_ids: list[list[int]]
    reference: np.ndarray        # (sentences, hidden) from edgeq's float executor


def encoder_fixture(model: str, seq: int, n_sentences: int) -> EncoderFixture:
    from edgeq.core.executor import Executor
    from edgeq.importers.hf_bert import encoder_tokenizer
    from edgeq.importers.loader import import_model, resolve_model_path
    from edgeq.evaluate.texts import calibration_text, evaluation_sentences

    graph = import_model(resolve_model_path(model))
    tok = encoder_tokenizer(graph)
    long_ids = tok.encode(calibration_text()[:4000]).ids[:seq]
    assert len(long_ids) == seq, f"calibration text gives {len(long_ids)} tokens, fewer than --seq {seq}"
    ids = [tok.encode(s).ids for s in evaluation_sentences(n_sentences)]
    ex = Executor(graph)
    return EncoderFixture(long_ids, ids, np.stack([ex.embed(i) for i in ids]))


def fidelity(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    from edgeq.evaluate.encoder import cosines

    c = cosines(reference, got)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}


def interleaved_times(runs: dict[str, Callable[[], object]], rounds: int, per_round: int,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call for each variant; variants alternate order round by round, so load on a shared
    machine hits all of them alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for k in (list(runs) if r % 2 == 0 else list(reversed(list(runs)))):
            for _ in range(per_round):
                t0 = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t0)
    return times


def latency_ms(times: list[float]) -> dict[str, float]:
    return {"latency_ms_median": statistics.median(times) * 1e3,
            "latency_ms_p10": float(np.percentile(times, 10) * 1e3),
            "latency_ms_p90": float(np.percentile(times, 90) * 1e3)}
