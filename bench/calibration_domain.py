"""Does calibrating on the user's own domain pay? Default (pydoc prose) vs domain calibration text, per preset.

The domain is Python source code, which ships with Python like pydoc does: the standard library's top-level
modules, sorted by name, alternate between a calibration set (even) and a held-out evaluation set (odd), so no
evaluated file was calibrated on. For each preset the default model is exported three ways (no importance
matrix, `--calib-text` unset, `--calib-text DIR` of the domain's calibration files) and evaluated in llama.cpp
against the float reference on the domain's held-out text and on pydoc's held-out text (KLD, top-1).

    python bench/calibration_domain.py                       # q4_k_m and q3_k_m, 8 chunks of 512 per text
    python bench/calibration_domain.py --presets q4_k_m --chunks 4
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np


def domain_split(root: Path, max_calib_bytes: int, max_eval_bytes: int) -> tuple[Path, Path]:
    """Calibration folder (even-indexed modules) and one evaluation file (odd-indexed), disjoint by module."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    mods = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith(("_", "test")))
    calib, evald = root / "calib", root / "eval.txt"
    calib.mkdir(parents=True, exist_ok=True)
    size = 0
    for p in mods[0::2]:
        text = p.read_text(encoding="utf-8", errors="replace")
        if size + len(text) > max_calib_bytes:
            break
        (calib / p.name.replace(".py", ".txt")).write_text(text, encoding="utf-8")
        size += len(text)
    parts, size = [], 0
    for p in mods[1::2]:
        text = p.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size > max_eval_bytes:
            break
    evald.write_text("\n\n".join(parts), encoding="utf-8")
    return calib, evald


def _write(out: str, rows: list, args, cpu: list[str]) -> None:
    result = {"rows": rows, "chunks": args.chunks, "ctx": 512, "calib_windows": args.calib_windows,
              "domain": "Python stdlib top-level modules: even-indexed calibrate, odd-indexed evaluate",
              "threads": 1, "load": os.getloadavg(), "cpu_flags": [f for f in cpu if f.startswith(("avx", "fma"))]}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="q4_k_m,q3_k_m")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--out", default="bench/results/calibration_domain.json")
    args = ap.parse_args()

    from edgeq import api
    from edgeq.core.executor import Executor
    from edgeq.evaluate.texts import evaluation_text
    from edgeq.importers.loader import import_model, resolve_model_path

    work = Path(tempfile.mkdtemp(prefix="edgeq-calib-domain-"))
    calib_dir, code_eval = domain_split(work, 400_000, 200_000)
    pydoc_eval = work / "pydoc_eval.txt"
    pydoc_eval.write_text(evaluation_text(), encoding="utf-8")
    ex = Executor(import_model(resolve_model_path(None)))

    @functools.lru_cache(maxsize=64)
    def ref(ids: tuple[int, ...]) -> np.ndarray:
        return ex.logits(list(ids))

    variants = {"none": dict(calibration=False), "default (pydoc)": {}, "domain (--calib-text)":
                dict(calib_text=str(calib_dir))}
    rows = []
    cpu = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    for preset in args.presets.split(","):
        for name, extra in variants.items():
            out = work / f"{preset}-{len(rows)}"
            t0 = time.perf_counter()
            res = api.export(quant=preset, out=str(out), calib_windows=args.calib_windows, check=False, **extra)
            t_export = time.perf_counter() - t0
            row = {"preset": preset, "calibration": name, "export_s": round(t_export, 1),
                   "bytes": sum(a["bytes"] for a in res["manifest"]["artifacts"] if a["role"] == "model"),
                   "calibration_record": {k: v for k, v in res["manifest"].get("calibration", {}).items()
                                          if k in ("text", "text_sha256", "tokens", "windows")}}
            for text_name, path in (("code", code_eval), ("pydoc", pydoc_eval)):
                e = api.evaluate(out, text_file=str(path), chunks=args.chunks, threads=1, record=False,
                                 reference_logits=lambda ids: ref(tuple(int(i) for i in ids)))
                row[text_name] = {"kld_mean": e["kld_mean"], "top1": e["top1"], "ppl": e["ppl"],
                                  "n_tokens_scored": e["n_tokens_scored"]}
            rows.append(row)
            _write(args.out, rows, args, cpu)         # after every row: a long run keeps what it measured
            print(f"{preset:8s} {name:22s} code KLD {row['code']['kld_mean']:.5f} top1 {row['code']['top1']:.4f} | "
                  f"pydoc KLD {row['pydoc']['kld_mean']:.5f} top1 {row['pydoc']['top1']:.4f}  ({t_export:.0f} s)",
                  flush=True)
    for preset in args.presets.split(","):
        by = {r["calibration"]: r for r in rows if r["preset"] == preset}
        if len(by) < len(variants):
            continue
        d, u = by["default (pydoc)"]["code"]["kld_mean"], by["domain (--calib-text)"]["code"]["kld_mean"]
        print(f"{preset}: domain calibration / default on held-out code KLD = {u / d:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
