"""Fidelity of every GGUF preset on the default model, measured in llama.cpp.

One table answers "what does each `--quant` preset cost and buy on this model":
size (true bits per weight, not the preset's nominal name, because SmolLM2's
576-wide rows push most tensors off the K-types), and fidelity against the
float source (PPL, KLD, top-1) through the bundle's own runtime, with the
same `edgeq.api.export` and `edgeq.evaluate.bundle` a user would run.

The float reference (numpy executor) is by far the slowest part, so it is
computed once per evaluation window and shared by every preset; all presets
are therefore scored against identical reference logits.

    python bench/presets.py                                  # full table
    python bench/presets.py --presets q8_0 --chunks 1        # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

DEFAULT_PRESETS: tuple[str, ...] = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# An f32 bundle's KLD is ~1e-10 (same weights, float kernels); a log axis still needs a floor for an exact 0.
KLD_FLOOR = 1e-12


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout carries only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ReferenceCache:
    """Float reference logits, computed once per window and shared across presets.

    Full-window logits are kept (evaluate() slices them itself); 8 windows of
    512 x 49152 float32 are ~800 MB, affordable here and simpler than padding.
    """

    def __init__(self, make_logits: Callable[[], Callable[[list[int]], np.ndarray]]):
        self._make = make_logits
        self._fn: Callable[[list[int]], np.ndarray] | None = None
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self.seconds = 0.0
        self.computed = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        key = tuple(int(i) for i in ids)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        if self._fn is None:
            self._fn = self._make()
        out = np.asarray(self._fn(list(key)), dtype=np.float32)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.computed += 1
        self._cache[key] = out
        log(f"  float reference window {self.computed} ({len(key)} tokens): {dt:.1f} s")
        return out


def make_reference() -> Callable[[list[int]], np.ndarray]:
    """The numpy executor on the default model: the float model every bundle is compared with."""
    from edgeq.core.executor import Executor
    from edgeq.importers.gguf import import_gguf
    from edgeq.models.recipes.default import default_model_path

    log("loading float reference (numpy executor on the default model)")
    return Executor(import_gguf(default_model_path())).logits


def window_progress(it: Iterable, desc: str = "", unit: str = "", total: int | None = None, **_: Any) -> Iterator:
    """Plain log lines instead of tqdm: the bench runs under nohup, where \\r bars garble the log."""
    t0 = time.perf_counter()
    for i, x in enumerate(it, 1):
        yield x
        log(f"  {desc} {unit} {i}/{total}: {time.perf_counter() - t0:.1f} s so far")


def versions() -> dict[str, str | None]:
    from importlib import metadata

    import edgeq

    out: dict[str, str | None] = {"edgeq": edgeq.__version__}
    for dist in ("llama-cpp-python", "gguf", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_preset(preset: str, workdir: Path, reference: ReferenceCache, args: argparse.Namespace) -> dict[str, Any]:
    from edgeq.evaluate.bundle import evaluate_bundle
    from edgeq.api import ExportOptions, export

    bundle = workdir / preset
    log(f"{preset}: export -> {bundle}")
    t0 = time.perf_counter()
    res = export(ExportOptions(target="cpu", quant=preset, out=str(bundle), force=True), progress=None)
    export_s = time.perf_counter() - t0
    manifest = res["manifest"]
    model = manifest["model"]
    art = manifest["artifacts"][0]
    file_bytes = int((bundle / art["path"]).stat().st_size)
    if file_bytes != art["bytes"]:
        raise RuntimeError(f"{preset}: manifest says {art['bytes']} bytes, file has {file_bytes}")
    n_params = int(model["n_params"])
    log(f"{preset}: exported in {export_s:.1f} s, {file_bytes / 1e6:.1f} MB, {model['bits_per_weight']:.3f} bpw, "
        f"{art['formats']}")

    ref_s0 = reference.seconds
    t0 = time.perf_counter()
    ev = evaluate_bundle(bundle, ctx=args.ctx, chunks=args.chunks, threads=args.threads, record=False,
                         progress=window_progress, reference_logits=reference)
    eval_s = time.perf_counter() - t0
    ref_s = reference.seconds - ref_s0
    log(f"{preset}: ppl {ev['ppl']:.4f} (ref {ev['ppl_reference']:.4f}), kld {ev['kld_mean']:.3g}, "
        f"top1 {ev['top1']:.4f}; eval {eval_s - ref_s:.1f} s + float reference {ref_s:.1f} s")

    if not args.keep:
        shutil.rmtree(bundle, ignore_errors=True)
    return {
        "preset": preset,
        "formats": dict(art["formats"]),
        "file_bytes": file_bytes,
        "weight_bytes": int(model["weight_bytes"]),
        "n_params": n_params,
        "bpw": float(model["bits_per_weight"]),
        "bpw_file": 8 * file_bytes / n_params,
        "ppl": ev["ppl"],
        "ppl_reference": ev["ppl_reference"],
        "kld_mean": ev["kld_mean"],
        "kld_p99": ev["kld_p99"],
        "kld_max": ev.get("kld_max"),
        "top1": ev["top1"],
        "n_tokens_scored": ev["n_tokens_scored"],
        "n_chunks": ev.get("n_chunks"),
        "backend": ev.get("backend"),
        "text": ev.get("text"),
        "export_s": export_s,
        "export_timings_s": res["measurements"].get("timings_s", {}),
        "reference_check": res["measurements"].get("reference_check"),
        "eval_s": eval_s - ref_s,
        "float_reference_s": ref_s,
        "source_sha256": manifest["source"]["sha256"],
    }


def add_f32_ratio(rows: list[dict[str, Any]]) -> str:
    """Ratio of each file to the f32 file; estimated when f32 was not run.

    Every preset keeps the 1-D norms in f32 and the same header, so the f32
    file is any file minus its tensor bytes plus 4 bytes per parameter (up to
    alignment padding, a few hundred bytes out of ~540 MB).
    """
    ok = [r for r in rows if "error" not in r]
    f32 = next((r for r in ok if r["preset"] == "f32"), None)
    if f32 is not None:
        base, how = f32["file_bytes"], "measured"
    elif ok:
        r = ok[0]
        base, how = r["file_bytes"] - r["weight_bytes"] + 4 * r["n_params"], "estimated"
    else:
        return "none"
    for r in ok:
        r["vs_f32_size"] = r["file_bytes"] / base
    return how


def fmt_types(formats: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(formats.items(), key=lambda kv: (-kv[1], kv[0])))


def table(rows: list[dict[str, Any]]) -> str:
    head = ["preset", "types (format:tensors)", "file MB", "bpw tensors", "bpw file", "vs f32 size",
            "PPL", "PPL f32 ref", "KLD mean", "KLD p99", "top-1", "tokens", "export s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | ERROR: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [
            r["preset"], fmt_types(r["formats"]), f"{r['file_bytes'] / 1e6:.2f}", f"{r['bpw']:.3f}",
            f"{r['bpw_file']:.3f}", f"{r['vs_f32_size']:.3f}", f"{r['ppl']:.4f}", f"{r['ppl_reference']:.4f}",
            f"{r['kld_mean']:.3g}", f"{r['kld_p99']:.3g}", f"{r['top1']:.4f}", str(r["n_tokens_scored"]),
            f"{r['export_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(8, 7))
    x = [r["bpw"] for r in ok]
    mean = [max(r["kld_mean"], KLD_FLOOR) for r in ok]
    p99 = [max(r["kld_p99"], KLD_FLOOR) for r in ok]
    ax.plot(x, mean, "o", color="C0", label="KLD mean")
    ax.plot(x, p99, "^", color="C1", alpha=0.6, label="KLD p99")
    # The low-bpw presets crowd within 1.5 bits: put each label on the side of
    # its point with the wider gap (in log bpw) to the next point.
    order = sorted(range(len(ok)), key=lambda j: x[j])
    lx = [math.log2(x[i]) for i in order]
    for k, i in enumerate(order):
        gap_left = lx[k] - lx[k - 1] if k > 0 else math.inf
        gap_right = lx[k + 1] - lx[k] if k + 1 < len(order) else math.inf
        left = gap_left > gap_right
        ax.annotate(ok[i]["preset"], (x[i], mean[i]), textcoords="offset points", xytext=(-6 if left else 6, -2),
                    ha="right" if left else "left", va="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (tensor bytes x 8 / parameters)")
    ax.set_ylabel("KL(float reference || llama.cpp), nats per token")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help="comma-separated GGUF presets (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=512, help="evaluation window in tokens (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=8,
                   help="windows scored; each scores ctx/2-1 tokens (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp threads for the eval; 1 because OpenMP spin-wait collapses on a busy "
                        "2-core box (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="folder for presets.json and presets.png (default: bench/results)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where bundles are exported (default: a temporary folder)")
    p.add_argument("--keep", action="store_true",
                   help="keep the exported bundles (otherwise each is deleted once measured: an f32 one is ~540 MB)")
    args = p.parse_args(argv)
    args.presets = [s.strip().lower() for s in args.presets.split(",") if s.strip()]
    if not args.presets:
        p.error("--presets is empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from edgeq.targets.gguf.presets import GGUF_PRESETS

    unknown = [s for s in args.presets if s not in GGUF_PRESETS]
    if unknown:
        log(f"unknown preset(s) {unknown}; known: {', '.join(GGUF_PRESETS)}")
        return 2

    from edgeq.core.fs import sha256_file
    from edgeq.models.recipes.default import DEFAULT_NAME, default_model_path
    from edgeq.evaluate.texts import EVALUATION_TEXT_NAME

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "presets.json", args.out / "presets.png"
    source = default_model_path()
    source_sha = sha256_file(source)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="edgeq-presets-")
        workdir = Path(tmp)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)

    record: dict[str, Any] = {
        "bench": "gguf presets on the default model",
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["presets.py", *argv]),
        "model": DEFAULT_NAME,
        "source_sha256": source_sha,
        "presets": args.presets,
        "ctx": args.ctx,
        "chunks": args.chunks,
        "threads": args.threads,
        "text": EVALUATION_TEXT_NAME,
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": versions(),
        "notes": [
            "bpw = 8 * tensor bytes / parameters (manifest model.bits_per_weight); bpw_file = 8 * file bytes / parameters",
            "float reference = edgeq numpy executor on the source model, computed once per window, shared by all presets",
            "export_s includes import, passes, writing and export's own small reference check",
        ],
        "rows": [],
    }
    reference = ReferenceCache(make_reference)
    t_all = time.perf_counter()
    try:
        for i, preset in enumerate(args.presets, 1):
            log(f"=== {preset} ({i}/{len(args.presets)})")
            try:
                row = run_preset(preset, workdir, reference, args)
                if row["source_sha256"] != source_sha:
                    raise RuntimeError("bundle was made from a different source than the float reference")
            except Exception as e:  # one broken preset must not cost the rest of a 20-minute run
                log(f"{preset}: FAILED: {type(e).__name__}: {e}")
                row = {"preset": preset, "error": f"{type(e).__name__}: {e}"}
            record["rows"].append(row)
            record["f32_size_basis"] = add_f32_ratio(record["rows"])
            record["wall_s"] = time.perf_counter() - t_all
            record["float_reference_s"] = reference.seconds
            json_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = record["rows"]
    record["host"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    record["wall_s"] = time.perf_counter() - t_all
    json_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    ok = [r for r in rows if "error" not in r]
    n_tok = ok[0]["n_tokens_scored"] if ok else 0
    plot(rows, png_path, f"{DEFAULT_NAME}: GGUF presets in llama.cpp\n"
                         f"ctx {args.ctx}, {n_tok} tokens scored, {args.threads} thread(s)")

    print(f"GGUF presets on {DEFAULT_NAME}; llama.cpp threads={args.threads}, ctx={args.ctx}, "
          f"chunks={args.chunks}; host {platform.machine()} x{os.cpu_count()}; "
          f"edgeq {record['versions']['edgeq']}, llama-cpp-python {record['versions']['llama-cpp-python']}")
    print(f"eval text: {EVALUATION_TEXT_NAME}")
    print()
    print(table(rows))
    print()
    print(f"vs f32 size: file bytes / f32 file bytes ({record.get('f32_size_basis')}). "
          f"wall {record['wall_s']:.0f} s, of which float reference {reference.seconds:.0f} s "
          f"({reference.computed} windows).")
    log(f"wrote {json_path} and {png_path}" + (f"; bundles kept in {workdir}" if args.keep else ""))
    return 1 if len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
