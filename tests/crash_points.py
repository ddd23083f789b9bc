"""`kill -9` at random points of edgeq's writing commands; what is left at the output path must be nothing or a
complete output, and the next run must succeed over whatever the killed one left.

    python tests/crash_points.py --points 20            # every command, 20 kill points each (a few minutes)
    python tests/crash_points.py --points 5 --commands export-gguf,plan

A command is first run once without a kill (its duration D); then each point starts it again (same output path,
with --force where it takes it) and kills it with SIGKILL after a delay drawn uniformly from [0, D] (seeded).
After each kill the output is classified: `absent`, `complete` (a bundle: the manifest reads and every artifact's
size and SHA-256 verify; a plan: it loads; an imatrix: it reads) or `torn` (anything else: the failure this
guards against). Every cache entry under the run's EDGEQ_CACHE must read back whole or be absent. A last run
without a kill must succeed and leave no temporary folders or lock files beside the output. Results go to
bench/results/crash_safety.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeq.core.cache import read_entry
from edgeq.core.errors import EdgeqError

ROOT = Path(__file__).resolve().parents[1]


def make_sources(folder: Path) -> dict[str, Path]:
    """A tiny Llama HF folder and a tiny BERT folder (fast to export on every backend)."""
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config, write_bert_folder

    llama_dir, bert_dir = folder / "tiny-llama", folder / "tiny-bert"
    if not llama_dir.exists():
        graph_to_hf_folder(random_llama(tiny_config(vocab_size=384, tied_embeddings=True), seed=1, scale=0.08),
                           llama_dir, byte_level_spec(384))
    if not bert_dir.exists():
        write_bert_folder(bert_dir)
    return {"llama": llama_dir, "bert": bert_dir}


def commands(src: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """name -> argv (after `edgeq`); each writes `out` (a folder for exports, a file otherwise)."""
    llama, bert = str(src["llama"]), str(src["bert"])
    return {
        "export-gguf": ["export", "--model", llama, "--quant", "q4_0", "-o", str(out), "--force", "--quiet"],
        "export-onnx": ["export", "--model", llama, "--backend", "onnx", "--quant", "int4", "-o", str(out),
                        "--force", "--quiet"],
        "export-tvm": ["export", "--model", bert, "--backend", "tvm", "--quant", "int8", "-o", str(out), "--force",
                       "--quiet"],
        "calibrate": ["calibrate", "--model", llama, "--calib-windows", "1", "-o", str(out), "--quiet"],
        "plan": ["plan", "--model", llama, "--bpw", "6", "--cost", "output", "--calib-windows", "1", "-o", str(out),
                 "--quiet"],
    }


def classify(name: str, out: Path) -> str:
    """absent, complete or torn."""
    if not out.exists():
        return "absent"
    try:
        if name.startswith("export"):
            from edgeq.runtime.manifest import read_manifest, verify_artifacts

            verify_artifacts(out, read_manifest(out))
        elif name == "plan":
            from edgeq.core.plan import load_plan

            load_plan(out)
        else:
            from edgeq.importers.imatrix import read_imatrix

            read_imatrix(out)
    except (EdgeqError, OSError, ValueError) as exc:
        return f"torn: {exc}"
    return "complete"


def torn_cache_entries(cache: Path) -> list[str]:
    """Cache entries that do not read back whole (read_entry removes them; any here is a failure)."""
    bad = []
    for p in sorted(cache.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".npz") and "tvm-tune" not in p.parts and not p.name.startswith("."):
            if read_entry(p) is None:
                bad.append(str(p.relative_to(cache)))
    return bad


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@dataclass
class Result:
    command: str
    duration_s: float
    points: list[dict] = field(default_factory=list)
    final_ok: bool = False
    final_leftovers: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(p["state"].startswith("torn") or bool(p["torn_cache"]) for p in self.points) + (not self.final_ok)


def run(argv: list[str], env: dict[str, str], kill_after: float | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess | None:
    cmd = [sys.executable, "-m", "edgeq.cli", *argv]
    if kill_after is None:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    return None


def campaign(name: str, argv: list[str], out: Path, cache: Path, points: int, rng: random.Random) -> Result:
    env = {**os.environ, "EDGEQ_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    first = run(argv, env)
    duration = time.perf_counter() - t0
    if first.returncode != 0:
        raise RuntimeError(f"{name} failed without a kill: {first.stderr.strip()[-500:]}")
    res = Result(name, round(duration, 2))
    for i in range(points):
        delay = rng.uniform(0.0, duration)
        run(argv, env, kill_after=delay)
        res.points.append({"delay_s": round(delay, 3), "state": classify(name, out),
                           "torn_cache": torn_cache_entries(cache)})
        if i % 2 == 0 and out.exists():      # half the points start from nothing, half replace a finished output
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    final = run(argv, env)
    res.final_ok = final.returncode == 0 and classify(name, out) == "complete"
    res.final_leftovers = leftovers(out)
    res.final_ok = res.final_ok and not res.final_leftovers
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=20, help="kill points per command (default 20)")
    ap.add_argument("--commands", help="comma-separated subset of: export-gguf, export-onnx, export-tvm, "
                                       "calibrate, plan (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "crash_safety.json"))
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edgeq-crash-"))
    src = make_sources(work)
    rng = random.Random(a.seed)
    results = []
    for name, cmd in commands(src, work / "OUT").items():
        if a.commands and name not in a.commands.split(","):
            continue
        out = work / f"out-{name}" / ("b" if name.startswith("export") else
                                     ("plan.json" if name == "plan" else "imatrix.gguf"))
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(out) if c == str(work / "OUT") else c for c in cmd]
        r = campaign(name, cmd, out, work / f"cache-{name}", a.points, rng)
        states = [p["state"].split(":")[0] for p in r.points]
        print(f"{name:12s} {r.duration_s:6.1f} s  points {len(states):3d}  absent {states.count('absent'):3d}  "
              f"complete {states.count('complete'):3d}  torn {states.count('torn'):3d}  torn cache "
              f"{sum(bool(p['torn_cache']) for p in r.points):3d}  final {'ok' if r.final_ok else 'FAILED'}",
              flush=True)
        results.append(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"seed": a.seed, "points": a.points,
                                       "results": [{**asdict(r), "failures": r.failures} for r in results]},
                                      indent=1) + "\n")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
