"""Shared fixtures: the default model, its float reference, and bundles exported once per session."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgeq.models.recipes.default import default_model_path

# Bundles loaded without `threads` use their device profile's count (cpu: 4, at most the physical cores); tests
# time nothing and share a small machine, so they run at 1 thread (subprocesses inherit it). The tests of the
# default itself remove it.
os.environ.setdefault("EDGEQ_THREADS", "1")


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
    """Folders that live as long as the session (bundles exported once and shared by many modules), kept apart
    from the rest of the base folder, which `_drop_module_tmp` empties as each module ends."""
    root = tmp_path_factory.getbasetemp() / "session"
    root.mkdir(exist_ok=True)
    return lambda name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))


@pytest.fixture(scope="module", autouse=True)
def _drop_module_tmp(request, tmp_path_factory):
    """A module's folders go when it ends, unless one of its tests failed: a full run exports a few hundred
    models, several GB if every module's were kept to the end."""
    base = tmp_path_factory.getbasetemp()
    before = {p.name for p in base.iterdir()}
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for p in base.iterdir():
            if p.name not in before and p.name != "session":
                shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm_graph(smollm_path):
    from edgeq.importers.gguf import import_gguf

    return import_gguf(smollm_path)


@pytest.fixture(scope="session")
def smollm_executor(smollm_graph):
    """One float executor of the default model (its weights dequantized once) for every reference below."""
    from edgeq.core.executor import Executor

    return Executor(smollm_graph)


@pytest.fixture(scope="session")
def reference_logits(smollm_executor):
    """Float reference logits, cached by token window so several bundles share one computation."""

    @functools.lru_cache(maxsize=64)
    def cached(ids: tuple[int, ...]) -> np.ndarray:
        return smollm_executor.logits(list(ids))

    return lambda ids: cached(tuple(int(i) for i in ids))


@pytest.fixture(scope="session")
def smollm_greedy(smollm_executor):
    """The reference executor's greedy tokens after a prompt, computed once per (prompt, n) for every backend."""
    from decoder_checks import greedy_reference

    @functools.lru_cache(maxsize=8)
    def cached(prompt: tuple[int, ...], n: int) -> list[int]:
        return greedy_reference(smollm_executor, list(prompt), n)

    return lambda prompt, n: list(cached(tuple(int(i) for i in prompt), n))


@pytest.fixture(scope="session")
def export_bundle(session_tmp):
    """Export the default model once per (target, quant), uncalibrated, and reuse the bundle."""
    from edgeq.api import ExportOptions, export

    made: dict[tuple[str, str], Path] = {}

    def get(quant: str, target: str = "cpu") -> Path:
        key = (target, quant)
        if key not in made:
            out = session_tmp(f"bundle-{target}-{quant}") / "b"
            # llama.cpp's plain quantization: the byte-identity tests compare with llama-quantize without imatrix
            export(ExportOptions(target=target, quant=quant, out=str(out), calibration=False))
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def android(session_tmp):
    """`edgeq export --target android` as a user runs it (the default model, q4_k_m, calibrated), once per session:
    the CLI's and the server's tests use it. Returns the bundle and the finished process."""
    out = session_tmp("android") / "out"
    r = subprocess.run([sys.executable, "-m", "edgeq.cli", "export", "--target", "android", "-o", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.fixture(scope="session")
def smollm_spec(smollm_path, smollm_graph):
    from edgeq.runtime.tokenizer import spec_from_gguf_metadata

    return spec_from_gguf_metadata(smollm_graph.metadata["gguf"], smollm_path)


@pytest.fixture(scope="session")
def smollm_hf_dir(session_tmp, smollm_graph, smollm_spec) -> Path:
    """SmolLM2 as a Hugging Face folder: the default model's dequantized weights (float32, exact), its config
    and a tokenizer.json built from its GGUF tokenizer."""
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder

    return graph_to_hf_folder(smollm_graph, session_tmp("hf") / "SmolLM2-135M-Instruct", smollm_spec,
                              dtype="F32", shard_bytes=200 * 2**20)


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 (the encoder acceptance model), imported once for the ONNX and TVM encoder tests."""
    from edgeq.importers.loader import import_model, resolve_model_path

    return import_model(resolve_model_path("all-MiniLM-L6-v2"))


@pytest.fixture(scope="session")
def minilm_reference(minilm):
    """MiniLM's float reference embeddings, cached by token ids: every backend's evaluation shares them."""
    from edgeq.core.executor import Executor

    ex = Executor(minilm)

    @functools.lru_cache(maxsize=512)
    def cached(ids: tuple[int, ...]) -> np.ndarray:
        return ex.embed(list(ids))

    return lambda ids: cached(tuple(int(i) for i in ids))


@pytest.fixture(scope="session")
def tiny_decoder_dir(session_tmp) -> Path:
    """A small tied Llama as a Hugging Face folder (byte-level tokenizer, 512 positions): the synthetic model
    the ONNX and TVM decoder and budget tests export through the pipeline."""
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config

    cfg = tiny_config(vocab_size=400, tied_embeddings=True, context_length=512)
    return graph_to_hf_folder(random_llama(cfg, seed=1, scale=0.08), session_tmp("tiny-decoder") / "m",
                              byte_level_spec(400))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """An EDGEQ_CACHE folder per test module: its exports share calibration and sizes, other modules' do not."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def hil_bundles(session_tmp):
    """Small bundles per backend, exported once: a tiny random Llama (gguf) and MiniLM int8 (onnx: the
    smallest encoder the ONNX target takes). A gguf bundle for an arm64 profile carries the native runner
    (bin/edgeq-run), which a device with nothing installed (qemu-arm64-bare, a phone) runs."""
    from edgeq.api import ExportOptions, export

    made: dict[tuple[str, str], Path] = {}

    def get(backend: str, target: str = "cpu") -> Path:
        # onnx bundles and cpu gguf bundles run anywhere; arm64 gguf ones add the native runner
        key = (backend, target if backend == "tvm" or (backend == "gguf" and target != "cpu") else "any")
        if key not in made:
            root = session_tmp(f"hil-{backend}")
            if backend == "gguf":
                from edgeq.models.recipes.hf_folder import graph_to_hf_folder
                from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config

                src = graph_to_hf_folder(random_llama(tiny_config(vocab_size=384), seed=1, scale=0.08),
                                         root / "tiny-llama", byte_level_spec(384))
                export(ExportOptions(model=str(src), quant="q8_0", out=str(root / "b"), calibration=False,
                                     target=key[1] if key[1] != "any" else "cpu"))
            elif backend == "onnx":
                export(ExportOptions(model="all-MiniLM-L6-v2", backend="onnx", quant="int8", out=str(root / "b")))
            elif backend == "tvm":
                try:
                    from edgeq.models.recipes.synthetic import write_bert_folder
                except ImportError:
                    pytest.skip("this edgeq has no TVM backend yet (issue 5)")
                src = write_bert_folder(root / "tiny-bert")
                export(ExportOptions(model=str(src), backend="tvm", quant="int8", target=target, out=str(root / "b")))
            else:
                pytest.skip(f"edgeq cannot export {backend} bundles")
            made[key] = root / "b"
        return made[key]

    return get
