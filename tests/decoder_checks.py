"""What the ONNX and TVM decoder tests check the same way: greedy decoding by full recomputation in the
reference executor and through a runtime backend's KV cache, and SmolLM2's f32 acceptance checks (fidelity
on the evaluation text, 32 greedy tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SMOLLM_PROMPT = "The capital of France is"


def greedy_reference(ex, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by full recomputation in the float executor (no cache, no stop tokens)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(ex.logits(ids)[-1])))
    return ids[len(prompt):]


def greedy_cached(backend, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens through a runtime backend's KV cache (prefill once, then one token per call)."""
    backend.reset()
    logits, out = backend.feed(prompt), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = backend.feed([out[-1]])
    return out


def check_smollm_f32_fidelity(bundle: Path, backend: str, reference_logits) -> None:
    """An f32 bundle of SmolLM2 scores the evaluation text like the reference executor (8 chunks, >= 2,000
    tokens): mean KLD <= 1e-4 and top-1 agreement >= 0.999."""
    from edgeq.evaluate.bundle import evaluate_bundle

    res = evaluate_bundle(bundle, chunks=8, record=False, reference_logits=reference_logits)
    assert res["backend"] == backend and res["n_tokens_scored"] >= 2000
    assert res["kld_mean"] <= 1e-4 and res["top1"] >= 0.999


def check_smollm_f32_greedy(bundle: Path, backend: str, smollm_greedy, n: int = 32) -> None:
    """n greedy tokens through the bundle's KV cache are exactly the reference executor's."""
    from edgeq import runtime

    with runtime.load(bundle, threads=1) as s:
        assert s.backend_name == backend
        prompt = s.tokenize(SMOLLM_PROMPT, add_special=True, parse_special=False)
        got = greedy_cached(s.backend, prompt, n)
    assert got == smollm_greedy(prompt, n)
