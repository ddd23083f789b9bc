"""Fidelity measured in llama.cpp on held-out text, with llama-perplexity's convention."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.evaluate.bundle import evaluate_bundle
from edgeq.evaluate.decoder import evaluate, windows


def test_windows_follow_llama_perplexity():
    toks = list(range(100, 100 + 1030))
    ws = list(windows(toks, 512, bos_id=1, add_bos=True))
    assert len(ws) == 2 and ws[0][0] == 1 and ws[0][1:] == toks[1:512] and ws[1][0] == 1
    assert list(windows(toks, 512, 1, add_bos=False))[1][0] == toks[512]


def test_identical_logits_score_zero_kld():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((64, 50)).astype(np.float32)
    f = lambda ids: table[: len(ids)]
    res = evaluate(list(rng.integers(0, 50, 256)), 64, f, f, None, False)
    assert res["kld_mean"] == 0.0 and res["top1"] == 1.0 and res["n_tokens_scored"] == 4 * 31
    g = lambda ids: table[: len(ids)] * 2.0
    assert evaluate(list(rng.integers(0, 50, 256)), 64, g, f, None, False)["kld_mean"] > 0.01


def test_f32_bundle_matches_the_reference(export_bundle, reference_logits):
    res = evaluate_bundle(export_bundle("f32"), ctx=512, chunks=8, record=False, reference_logits=reference_logits)
    assert res["n_tokens_scored"] >= 2000
    assert res["kld_mean"] <= 1e-4
    assert res["top1"] >= 0.995
    assert res["ppl"] == pytest.approx(res["ppl_reference"], rel=1e-3)


def test_q8_0_bundle_fidelity(export_bundle, reference_logits):
    b = export_bundle("q8_0")
    res = evaluate_bundle(b, ctx=512, chunks=8, record=True, reference_logits=reference_logits)
    assert res["n_tokens_scored"] >= 2000
    assert res["kld_mean"] <= 6e-3
    assert res["top1"] >= 0.9
    import json

    assert json.loads((b / "measurements.json").read_text())["eval"][-1]["kld_mean"] == res["kld_mean"]
