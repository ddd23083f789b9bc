"""Reference inputs and float outputs stored in each bundle.

They let a device check an exported model without torch or the source model:
run the prompts, compare with the stored float logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REFERENCE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)


def reference_token_ids(tokenize) -> list[list[int]]:
    return [tokenize(p) for p in REFERENCE_PROMPTS]


def write_reference(folder: Path, ids: list[list[int]], logits: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inputs.json").write_text(
        json.dumps({"prompts": list(REFERENCE_PROMPTS), "token_ids": ids}, indent=1) + "\n", encoding="utf-8")
    for i, lg in enumerate(logits):
        np.save(folder / f"logits_{i}.npy", lg.astype(np.float32))


def read_reference(folder: Path) -> tuple[list[list[int]], list[np.ndarray]]:
    d = json.loads((folder / "inputs.json").read_text(encoding="utf-8"))
    ids = d["token_ids"]
    return ids, [np.load(folder / f"logits_{i}.npy", allow_pickle=False) for i in range(len(ids))]


def compare_logits(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    from edgeq.evaluation import log_softmax64

    kl, same = [], []
    for r, g in zip(ref, got):
        lr, lg = log_softmax64(r), log_softmax64(g)
        kl.append(np.sum(np.exp(lr) * (lr - lg), -1))
        same.append(np.argmax(r, -1) == np.argmax(g, -1))
    kl_all = np.concatenate(kl)
    return {"kld_mean": float(kl_all.mean()), "kld_max": float(kl_all.max()),
            "top1": float(np.concatenate(same).mean()), "n_positions": int(kl_all.size)}
