"""Peak memory of exporting a model larger than comfortable: a synthetic ~1B-parameter Llama.

The bench writes a random Llama (TinyLlama-1.1B's shape by default) as a
Hugging Face folder of float16 safetensors shards, then runs
`edgeq export --model FOLDER --quant q4_0` exactly as a user would, in a
child process, and reports that child's peak resident memory next to the
checkpoint's size. The export must stream: import reads headers only;
calibration (q4_0 takes an importance matrix, so a default export calibrates)
and the float reference outputs stored in the bundle run the executor in
streaming mode (each weight loaded once for all windows or prompts, then
dropped); the GGUF writer loads, quantizes and writes one tensor at a time.
The bound checked is peak RSS < 1.5 x the float16 checkpoint. The calibration
cache is off for the child (EDGEQ_CACHE=off), so every run measures the
calibration too.

The peak is the child's ru_maxrss, taken in a small launcher process: on
Linux a child's ru_maxrss also counts the address space it was spawned from,
so the launcher (not this process, which made the checkpoint) spawns it.

    python bench/big_model.py                         # ~1.1B parameters, ~2.2 GB checkpoint
    python bench/big_model.py --layers 2 --hidden 512 --ffn 1408 --vocab 4096   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
BOUND = 1.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_checkpoint(folder: Path, args) -> tuple[int, int]:
    """Random float16 weights in shards; returns (parameters, bytes of the safetensors files)."""
    from edgeq.models import llama
    from edgeq.models.recipes.hf_folder import write_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec

    cfg = llama.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                            n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                            head_dim=args.hidden // args.heads, rope_theta=10000.0, rms_eps=1e-5,
                            tied_embeddings=False, context_length=2048)
    shapes = llama.expected_shapes(cfg)

    def tensor(name: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(name.encode()))   # name-seeded: same weights every run
        shape = shapes[name]
        if len(shape) == 1:
            return (1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(shape[1]))

    write_hf_folder(folder, cfg, tensor, spec=byte_level_spec(args.vocab), dtype="F16",
                    shard_bytes=args.shard_mb * 2**20)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return n_params, size


def launcher(cmd: list[str]) -> None:
    """Run `cmd` as this (small) process's only child; print its exit status and peak RSS as JSON."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "EDGEQ_CACHE": os.environ.get("EDGEQ_CACHE", "off")})
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss     # KiB on Linux
    print(json.dumps({"returncode": r.returncode, "peak_rss_bytes": peak_kib * 1024, "wall_s": round(wall, 2),
                      "stdout": r.stdout[-2000:], "stderr": r.stderr[-4000:]}))


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--launch", "--", *cmd], stdout=subprocess.PIPE, text=True,
                         check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=1000, help="shard size of the checkpoint (MiB)")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--bpw", type=float, help="a budgeted export at this many bits per weight instead of --quant "
                   "(the planner's default path: calibration, Fisher cost, sensitivity, ILP, GPTQ)")
    p.add_argument("--no-calibration", action="store_true", help="pass --no-calibration to the export")
    p.add_argument("--workdir", help="where the checkpoint and bundle go (default: a temporary folder, removed)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for big_model.json")
    p.add_argument("--launch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.launch:
        launcher(args.cmd)
        return 0

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edgeq-big-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt, bundle = work / "hf", work / "bundle"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)
        t0 = time.perf_counter()
        log(f"writing a synthetic Llama ({args.layers} layers, hidden {args.hidden}) as float16 shards into {ckpt}")
        n_params, ckpt_bytes = make_checkpoint(ckpt, args)
        t_write = time.perf_counter() - t0
        log(f"{n_params / 1e9:.3f} B parameters, {ckpt_bytes / 2**30:.2f} GiB of safetensors in "
            f"{len(list(ckpt.glob('*.safetensors')))} shards ({t_write:.0f} s)")
        how = ["--bpw", str(args.bpw)] if args.bpw else ["--quant", args.quant]
        cmd = [sys.executable, "-m", "edgeq.cli", "export", "--model", str(ckpt), *how,
               "-o", str(bundle), "--quiet"] + (["--no-calibration"] if args.no_calibration else [])
        log("exporting in a child process: " + " ".join(cmd[1:]))
        m = measure(cmd)
        if m["returncode"] != 0:
            log("export failed:\n" + m["stderr"])
            return 1
        manifest = json.loads((bundle / "manifest.json").read_text())
        meas = json.loads((bundle / "measurements.json").read_text())
        gguf = bundle / "model.gguf"
        ratio = m["peak_rss_bytes"] / ckpt_bytes
        result = {
            "model": {"n_params": n_params, "layers": args.layers, "hidden": args.hidden, "ffn": args.ffn,
                      "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab},
            "checkpoint_bytes": ckpt_bytes,
            "checkpoint_dtype": "float16",
            "quant": None if args.bpw else args.quant,
            "bpw": args.bpw,
            "calibration": manifest.get("calibration", {}).get("enabled"),
            "gguf_bytes": gguf.stat().st_size,
            "peak_rss_bytes": m["peak_rss_bytes"],
            "peak_rss_over_checkpoint": round(ratio, 3),
            "bound": BOUND,
            "within_bound": ratio < BOUND,
            "export_wall_s": m["wall_s"],
            "export_timings_s": meas.get("timings_s"),
            "reference_check": meas.get("reference_check"),
            "formats": manifest["artifacts"][0]["formats"],
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ("big_model.json" if not args.bpw else f"big_model_bpw{args.bpw:g}.json")).write_text(json.dumps(result, indent=1) + "\n")
        print(f"{n_params / 1e9:.3f} B params; float16 checkpoint {ckpt_bytes / 2**30:.2f} GiB; "
              f"{args.quant if not args.bpw else f'{args.bpw:g} bpw'} GGUF {result['gguf_bytes'] / 2**30:.2f} GiB; export peak RSS "
              f"{m['peak_rss_bytes'] / 2**30:.2f} GiB = {ratio:.2f}x the checkpoint "
              f"({'within' if ratio < BOUND else 'OVER'} the {BOUND}x bound); export {m['wall_s']:.0f} s")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
