"""Shared fixtures: the default model, its float reference, and bundles exported once per session."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from edgeq.models.default import default_model_path


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm_graph(smollm_path):
    from edgeq.importers.gguf import import_gguf

    return import_gguf(smollm_path)


@pytest.fixture(scope="session")
def reference_logits(smollm_graph):
    """Float reference logits, cached by token window so several bundles share one computation."""
    from edgeq.executor import Executor

    ex = Executor(smollm_graph)

    @functools.lru_cache(maxsize=64)
    def cached(ids: tuple[int, ...]) -> np.ndarray:
        return ex.logits(list(ids))

    return lambda ids: cached(tuple(int(i) for i in ids))


@pytest.fixture(scope="session")
def export_bundle(tmp_path_factory):
    """Export the default model once per (target, quant), uncalibrated, and reuse the bundle."""
    from edgeq.pipeline import ExportOptions, export

    made: dict[tuple[str, str], Path] = {}

    def get(quant: str, target: str = "cpu") -> Path:
        key = (target, quant)
        if key not in made:
            out = tmp_path_factory.mktemp(f"bundle-{target}-{quant}") / "b"
            # llama.cpp's plain quantization: the byte-identity tests compare with llama-quantize without imatrix
            export(ExportOptions(target=target, quant=quant, out=str(out), calibration=False))
            made[key] = out
        return made[key]

    return get
