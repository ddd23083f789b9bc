"""The reference executor against an independent implementation: transformers' LlamaForCausalLM."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeq.evaluate.decoder import log_softmax64
from edgeq.core.executor import Executor
from edgeq.models import llama
from edgeq.models.recipes.synthetic import random_llama, tiny_config


def hf_logits(cfg: llama.LlamaConfig, graph, ids: list[int]) -> np.ndarray:
    hf_cfg = transformers.LlamaConfig(**llama.hf_config_dict(cfg))
    hf_cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {n: torch.from_numpy(t.numpy().copy()) for n, t in graph.weights.items() if n != "rope_freqs.weight"}
    if cfg.attention_bias:  # HF Llama also biases o_proj; Qwen2-style models (edgeq's bias case) do not
        for i in range(cfg.n_layers):
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.hidden_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied head
    if cfg.tied_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        out = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0].float().numpy()


def kld_mean(ref: np.ndarray, other: np.ndarray) -> float:
    lr, lo = log_softmax64(ref), log_softmax64(other)
    return float(np.mean(np.sum(np.exp(lr) * (lr - lo), -1)))


@pytest.mark.parametrize("overrides", [
    {},
    {"tied_embeddings": True},
    {"n_kv_heads": 1, "n_heads": 4},
    {"n_kv_heads": 4},
    {"rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, "rope_theta": 500000.0},
    {"attention_bias": True},
], ids=["untied", "tied", "mqa", "mha", "rope-linear", "rope-llama3", "qkv-bias"])
def test_synthetic_llama_matches_transformers(overrides):
    cfg = tiny_config(**overrides)
    graph = random_llama(cfg, seed=1, scale=0.2)
    ids = list(np.random.default_rng(0).integers(0, cfg.vocab_size, 96))
    ours = Executor(graph).logits(ids)
    theirs = hf_logits(cfg, graph, ids)
    assert kld_mean(theirs, ours) <= 1e-6
    # and the logits are not trivially flat: the check has teeth
    assert np.std(ours) > 0.1


def test_smollm2_matches_transformers(smollm_graph, smollm_executor):
    ids = list(range(500, 564))
    ours = smollm_executor.logits(ids)
    theirs = hf_logits(smollm_graph.config, smollm_graph, ids)
    assert kld_mean(theirs, ours) <= 1e-6
    assert np.argmax(ours, -1).tolist() == np.argmax(theirs, -1).tolist()
