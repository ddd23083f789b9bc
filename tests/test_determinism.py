"""Byte identity across thread counts: an export's model files and manifest do not depend on how many threads
numpy's BLAS, OpenMP (llama.cpp's quantizer), onnxruntime or TVM were given. Calibration sums and the float
reference are where thread counts could leak in (a parallel reduction adds in another order), so the exports
here are calibrated. (tests/export_matrix.py checks byte identity of 53 exports run twice with the same settings.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import crash_points
import pytest

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS",
               "NUMEXPR_NUM_THREADS")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return crash_points.make_sources(tmp_path_factory.mktemp("det-src"))


def _export(argv: list[str], out: Path, threads: int, cache: Path) -> dict[str, str]:
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}, "EDGEQ_CACHE": str(cache)}
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", *argv, "-o", str(out), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    files = {a["path"]: hashlib.sha256((out / a["path"]).read_bytes()).hexdigest() for a in m["artifacts"]}
    return {**files, "manifest.json": hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()}


@pytest.mark.parametrize("backend,quant,model", [("gguf", "q4_k_m", "llama"), ("onnx", "int4", "llama"),
                                                 ("tvm", "int4", "llama")])
def test_exports_are_byte_identical_across_thread_counts(backend, quant, model, sources, tmp_path):
    argv = ["export", "--model", str(sources[model]), "--backend", backend, "--quant", quant]
    # each export computes its own calibration (separate caches), so the statistics themselves are compared
    one = _export(argv, tmp_path / "t1", 1, tmp_path / "c1")
    four = _export(argv, tmp_path / "t4", 4, tmp_path / "c4")
    assert one == four
    m = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert m["calibration"]["enabled"]          # the thread-sensitive path was really taken
