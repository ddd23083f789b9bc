"""Big models within memory: the streaming executor, lazy merged weights, and the big-model bench (small)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeq.core.executor import Executor
from edgeq.models.recipes.synthetic import random_llama, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def counting(graph):
    """The same graph with every weight's loader counting its calls."""
    calls: dict[str, int] = {}

    def wrap(name, load):
        def counted():
            calls[name] = calls.get(name, 0) + 1
            return load()
        return counted

    weights = {n: replace(t, load=wrap(n, t.load)) for n, t in graph.weights.items()}
    return replace(graph, weights=weights), calls


def test_streaming_executor_gives_the_same_logits_and_keeps_no_matrix():
    cfg = tiny_config(n_layers=3, tied_embeddings=True)
    graph = random_llama(cfg, seed=4, scale=0.1)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, cfg.vocab_size, n)) for n in (5, 17, 40)]
    cached = Executor(graph)
    want = [cached.logits(s) for s in seqs]
    g, calls = counting(graph)
    ex = Executor(g, cache_weights=False)
    got = ex.logits_many(seqs)
    for a, b in zip(want, got):
        assert np.array_equal(a, b)
    # one load per node that uses the weight, for all sequences together; nothing 2-D kept afterwards
    assert calls["model.layers.1.mlp.down_proj.weight"] == 1
    assert calls["model.embed_tokens.weight"] == 2          # tied: the embedding and the output head
    assert all(w.ndim == 1 for w in ex._weights.values())
    # intermediate outputs on request, unchanged
    out = ex.run(seqs[1], outputs=("l0.h2", "logits"))
    np.testing.assert_array_equal(out["logits"], want[1])
    assert out["l0.h2"].shape == (17, cfg.hidden_size)


def test_big_model_bench_runs_small(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "big_model.py"), "--layers", "2", "--hidden", "256",
                        "--ffn", "512", "--heads", "4", "--kv-heads", "2", "--vocab", "1024", "--shard-mb", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "big_model.json").read_text())
    assert res["peak_rss_bytes"] > 20 * 2**20 and res["checkpoint_bytes"] > 0
    assert res["peak_rss_over_checkpoint"] == round(res["peak_rss_bytes"] / res["checkpoint_bytes"], 3)
    assert res["formats"] and res["reference_check"]["n_positions"] > 0
    assert "peak RSS" in r.stdout
