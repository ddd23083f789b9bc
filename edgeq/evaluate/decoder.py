"""Fidelity of an exported model, measured in its target runtime.

Convention (llama-perplexity's, so figures compare with llama.cpp's own tool):
tokenise once and give the same ids to reference and target; non-overlapping
windows of `ctx` tokens, the first replaced by BOS when the vocabulary adds
one; in each window the logits at positions ctx/2 .. ctx-2 predict tokens
ctx/2+1 .. ctx-1 and are scored; KLD = mean KL(P_ref || P_target) in float64
over the full vocabulary; top1 = how often both put the same token first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@dataclass
class WindowStats:
    nll: np.ndarray          # target's -log p(next token)
    nll_ref: np.ndarray
    kld: np.ndarray
    same_top1: np.ndarray


def score_window(ref_logits: np.ndarray, tgt_logits: np.ndarray, next_tokens: np.ndarray) -> WindowStats:
    lr = log_softmax64(ref_logits)
    lt = log_softmax64(tgt_logits)
    idx = np.arange(next_tokens.size)
    kld = np.sum(np.exp(lr) * (lr - lt), axis=-1)
    return WindowStats(
        nll=-lt[idx, next_tokens], nll_ref=-lr[idx, next_tokens], kld=np.maximum(kld, 0.0),
        same_top1=np.argmax(lr, -1) == np.argmax(lt, -1),
    )


def windows(tokens: list[int], ctx: int, bos_id: int | None, add_bos: bool, max_chunks: int = 0) -> Iterable[list[int]]:
    n = len(tokens) // ctx
    if max_chunks > 0:
        n = min(n, max_chunks)
    for i in range(n):
        w = list(tokens[i * ctx:(i + 1) * ctx])
        if add_bos and bos_id is not None:
            w[0] = bos_id
        yield w


def evaluate(
    tokens: list[int],
    ctx: int,
    target_logits: Callable[[list[int]], np.ndarray],
    reference_logits: Callable[[list[int]], np.ndarray],
    bos_id: int | None,
    add_bos: bool,
    max_chunks: int = 0,
    progress: Callable | None = None,
) -> dict:
    if ctx < 16 or ctx % 2:
        raise ValueError("ctx must be an even number >= 16")
    n_chunks = len(tokens) // ctx if max_chunks <= 0 else min(len(tokens) // ctx, max_chunks)
    if n_chunks < 1:
        raise ValueError(f"text has {len(tokens)} tokens, fewer than one window of {ctx}")
    first = ctx // 2
    parts: list[WindowStats] = []
    it = windows(tokens, ctx, bos_id, add_bos, max_chunks)
    if progress is not None:
        it = progress(it, desc="eval", unit="window", total=n_chunks)
    for w in it:
        tgt = target_logits(w)[first:ctx - 1]
        ref = reference_logits(w)[first:ctx - 1]
        parts.append(score_window(ref, tgt, np.asarray(w[first + 1:ctx])))
    nll = np.concatenate([p.nll for p in parts])
    nll_ref = np.concatenate([p.nll_ref for p in parts])
    kld = np.concatenate([p.kld for p in parts])
    top1 = np.concatenate([p.same_top1 for p in parts])
    return {
        "ppl": float(math.exp(nll.mean())),
        "ppl_reference": float(math.exp(nll_ref.mean())),
        "kld_mean": float(kld.mean()),
        "kld_p99": float(np.quantile(kld, 0.99)),
        "kld_max": float(kld.max()),
        "top1": float(top1.mean()),
        "n_tokens_scored": int(kld.size),
        "n_chunks": n_chunks,
        "ctx": ctx,
    }


def compare_logits(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    kl, same = [], []
    for r, g in zip(ref, got):
        lr, lg = log_softmax64(r), log_softmax64(g)
        kl.append(np.sum(np.exp(lr) * (lr - lg), -1))
        same.append(np.argmax(r, -1) == np.argmax(g, -1))
    kl_all = np.concatenate(kl)
    return {"kld_mean": float(kl_all.mean()), "kld_max": float(kl_all.max()),
            "top1": float(np.concatenate(same).mean()), "n_positions": int(kl_all.size)}
