"""Bundles: complete, deterministic, verified on load, and runnable without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edgeq import runtime
from edgeq.api import ExportOptions, export
from edgeq.bundle.reference import read_reference
from edgeq.evaluate.decoder import compare_logits
from edgeq.runtime.manifest import BundleError

DETERMINISTIC = ["model.gguf", "manifest.json", "tokenizer_spec.json"]


def test_bundle_layout_and_manifest(export_bundle):
    b = export_bundle("q8_0")
    m = json.loads((b / "manifest.json").read_text())
    assert m["format"] == "edgeq-bundle" and m["version"] == 1
    model = m["artifacts"][0]
    assert model["backend"] == "gguf" and model["path"] == "model.gguf"
    assert model["bytes"] == (b / "model.gguf").stat().st_size
    assert model["formats"] == {"f32": 61, "q8_0": 211}
    assert m["source"]["license"] == "apache-2.0" and len(m["source"]["sha256"]) == 64
    assert m["n_ctx"] > 0 and m["kv_cache_dtype"] == "f16"
    assert m["plan"]["preset"] == "q8_0" and len(m["plan"]["tensors"]) == 272
    assert m["predicted"]["latency_ms_per_token"] is None and m["pruning_rates"] is None
    assert {"edgeq_version", "runtime_versions", "tokenizer", "target"} <= set(m)
    for f in ["measurements.json", "report.md", "formats_by_layer.png", "reference/inputs.json"]:
        assert (b / f).is_file(), f
    # the bits-per-weight figure is the bytes really written
    tensor_bytes = sum(t["bytes"] for t in [model])
    assert m["model"]["weight_bytes"] <= tensor_bytes
    assert 8.0 < m["model"]["bits_per_weight"] < 8.6


def test_two_exports_are_byte_identical(export_bundle, tmp_path):
    a = export_bundle("q4_0")
    b = tmp_path / "again" / "deeper"
    export(ExportOptions(target="cpu", quant="q4_0", out=str(b), calibration=False))
    for f in DETERMINISTIC:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_reference_outputs_check_the_bundle_without_the_source(export_bundle):
    b = export_bundle("q8_0")
    ids, ref = read_reference(b / "reference")
    with runtime.load(b) as s:
        got = [s.logits(i) for i in ids]
    cmp = compare_logits(ref, got)
    assert cmp["kld_mean"] < 0.05 and cmp["top1"] >= 0.9


def test_altered_byte_fails_with_checksum_error(export_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(export_bundle("q4_0"), b)
    with open(b / "model.gguf", "r+b") as f:
        f.seek(5_000_000)
        byte = f.read(1)
        f.seek(5_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(BundleError, match="checksum error"):
        runtime.load(b)


def test_missing_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        runtime.load(tmp_path)


def test_runtime_imports_and_runs_without_torch(export_bundle):
    b = export_bundle("q4_0")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edgeq import runtime\n"
        f"s = runtime.load({str(b)!r})\n"
        "ids = s.tokenize('Hello world')\n"
        "print(s.logits(ids).shape)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "assert 'transformers' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "49152" in out.stdout


def test_generation_is_seeded_and_stops_at_end_of_turn(export_bundle):
    b = export_bundle("q8_0")
    with runtime.load(b) as s:
        a = s.generate("Name a colour.", chat=True, max_tokens=64, temperature=0.8, seed=3)
        a2 = s.generate("Name a colour.", chat=True, max_tokens=64, temperature=0.8, seed=3)
        ids = s.tokenize(s.chat_prompt("Name a colour."), parse_special=True)
        out = s.generate_ids(ids, max_tokens=200)
    assert a == a2 and a.strip()
    assert len(out) < 200  # stopped by <|im_end|>, not by the limit
    assert 2 not in out
