"""Fuzz edgeq's readers of untrusted files and print a summary table.

    python fuzz/run.py --cases 10000                      # every target, seeded mutations (the long run)
    python fuzz/run.py --cases 300 --targets gguf,plan    # a few targets
    python fuzz/run.py --engine hypothesis --cases 2000   # structured: hypothesis draws the edits (JSON trees,
                                                          # GGUF/safetensors length and count fields)
    python fuzz/run.py --engine atheris --targets gguf --cases 50000   # coverage-guided (libFuzzer)

Each case is one input file put in an otherwise valid folder (fuzz/targets.py) and read by what `edgeq inspect`
or `edgeq export` would run. Allowed outcomes: a result (`parsed`) or edgeq's `EdgeqError` with a one-line
message (`refused`; the CLI's exit status 2). Anything else is counted and its input saved under
fuzz/crashes/TARGET/: another exception (`crash`), a case over 5 s (`hang`; a watchdog process kills the
worker), or peak resident memory above 2 x the input's size + 200 MB (`memory`; measured per case from the
kernel's high-water mark, reset before each case). Cases run in a worker process per target; the parent
watches it (a hang: 5 s of the worker's CPU time in one case, or 60 s of wall time). The summary goes to stdout and bench/results/fuzz.json (or --out).

The files in fuzz/corpus/TARGET/ (inputs that once failed, kept as regressions) are run before the mutations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

CASE_TIMEOUT_S = 5.0
WALL_TIMEOUT_S = 60.0
MEMORY_SLACK = 200 << 20
INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 63, 64, 255, 256, 1023, 4096, 65535, 65536, 2**31 - 1, 2**31,
                    2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


# --- mutations (seeded, no coverage feedback) --------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4, 8))):
        op = rng.randrange(9)
        n = len(b)
        if op == 0 and n:                                  # flip bits
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                                # a random byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op in (2, 3) and n >= 8:                      # an interesting integer over a field
            width = rng.choice((4, 8)) if op == 2 else rng.choice((1, 2, 4, 8))
            i = rng.randrange(0, max(1, n - width))
            if op == 2 and rng.random() < 0.7:
                i -= i % width
            v = rng.choice(INTERESTING_INTS + [n, n - i, rng.randrange(2**32)]) % (1 << 8 * width)
            if rng.random() < 0.3:
                v = (v + rng.choice((-1, 1))) % (1 << 8 * width)
            b[i:i + width] = v.to_bytes(width, "little")
        elif op == 4 and n:                                # truncate
            del b[rng.randrange(n):]
        elif op == 5 and n:                                # delete a chunk
            i = rng.randrange(n)
            del b[i:i + rng.randrange(1, 64)]
        elif op == 6 and n:                                # duplicate a chunk
            i = rng.randrange(n)
            chunk = b[i:i + rng.randrange(1, 256)]
            j = rng.randrange(n)
            b[j:j] = chunk * rng.choice((1, 1, 2, 16))
        elif op == 7 and others:                           # splice another seed
            o = rng.choice(others)
            if o:
                i, j = rng.randrange(max(1, n)), rng.randrange(len(o))
                b = b[:i] + o[j:j + rng.randrange(1, 4096)] + b[i + rng.randrange(0, 64):]
        elif op == 8:                                      # insert random bytes
            i = rng.randrange(n + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(b)


def _json_paths(v, path=()):
    yield path
    if len(path) > 40:
        return
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _json_paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v[:64]):
            yield from _json_paths(x, path + (i,))


def _interesting_json(rng: random.Random, old):
    choices = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 2**64 + 1, 10**30, 1e308, -1e308, 0.5, 1e-320,
               "", "x", "\x00", "../../etc/passwd", "/abs/path", "a" * rng.choice((1, 100, 100_000)), "%s%n{0}",
               [], [1] * rng.choice((1, 2, 1000)), {}, {"": None}, [[]] * 3, "*", "q4_0", "f32", "nan",
               float("inf"), float("nan")]
    if isinstance(old, str):
        choices += [old + "x", old[: len(old) // 2], old.upper(), old * 3]
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        choices += [old + 1, old - 1, -old, old * 1000, float(old), str(old)]
    if isinstance(old, list):
        choices += [old * 2, old[:1], old[::-1], [old], old + [None]]
    if isinstance(old, dict):
        choices += [list(old.values()), {k: None for k in old}, {**old, "unexpected": 1}]
    v = rng.choice(choices)
    if rng.random() < 0.05:          # deep nesting
        for _ in range(rng.choice((100, 5000))):
            v = [v]
    return v


def mutate_json(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return mutate_bytes(data, rng, others)
    if rng.random() < 0.15:
        return mutate_bytes(data, rng, others)
    for _ in range(rng.choice((1, 1, 2, 3))):
        paths = list(_json_paths(doc))
        path = rng.choice(paths)
        if not path:
            doc = _interesting_json(rng, doc)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        k = path[-1]
        r = rng.random()
        if r < 0.2 and isinstance(parent, dict):
            del parent[k]
        elif r < 0.3 and isinstance(parent, list):
            parent.insert(k, parent[k])
        else:
            parent[k] = _interesting_json(rng, parent[k])
    try:
        return json.dumps(doc, indent=rng.choice((None, 1))).encode()
    except (ValueError, RecursionError):
        return data


# --- the worker: runs cases, reports each over a pipe ---------------------------------------------------------

def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_case(target, case_file: Path, case_dir: Path, data: bytes) -> tuple[str, str]:
    """(outcome, detail) of one input."""
    from edgeq.core.errors import EdgeqError

    case_file.write_bytes(data)
    try:
        target.read(case_dir)
        return "parsed", ""
    except EdgeqError as exc:
        msg = str(exc)
        if "\n" in msg or not msg.strip():
            return "crash", f"EdgeqError message is not one line: {msg[:300]!r}"
        return "refused", msg[:200]
    except RecursionError:
        return "crash", "RecursionError\n" + traceback.format_exc(limit=-8)
    except Exception as exc:  # noqa: BLE001 - any other exception is the finding
        return "crash", f"{type(exc).__name__}: {str(exc)[:300]}\n" + traceback.format_exc(limit=-8)


def worker(name: str, seeds_root: Path, case_root: Path, cases: int, seed: int, start: int, engine: str,
           out_fd: int) -> None:
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("EDGEQ_CACHE", "off")
    # OpenMP's idle threads spin: their CPU time would count towards a case's hang budget
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import targets as T

    target = T.TARGETS[name]
    layout = T._layout(seeds_root)
    case_dir = case_root / name
    T.prepare_case_folder(target, layout, case_dir)
    case_file = T.case_path(target, case_dir)
    seeds = [p.read_bytes() for p in sorted((layout["seeds"] / name).glob("*"))]
    regress = [p.read_bytes() for p in sorted((HERE / "corpus" / name).glob("*"))] if (HERE / "corpus" / name).is_dir() \
        else []
    mutate = mutate_json if target.kind == "json" else mutate_bytes
    out = os.fdopen(out_fd, "w", buffering=1)
    for data in seeds + regress:     # warm-up, unmeasured: lazy imports (torch's, say) are not a case's memory
        run_case(target, case_file, case_dir, data)
    inputs = iter_inputs(seeds, regress, cases, seed, start, mutate, engine, target.kind)
    for i, data in inputs:
        (case_root / f"{name}.current").write_bytes(data)
        out.write(f"START {i} {len(data)}\n")
        rss0, _ = _rss()
        _reset_peak()
        t0 = time.perf_counter()
        outcome, detail = run_case(target, case_file, case_dir, data)
        dt = time.perf_counter() - t0
        _, peak = _rss()
        grew = max(0, peak - rss0)
        if outcome in ("parsed", "refused") and grew > 2 * len(data) + MEMORY_SLACK:
            outcome, detail = "memory", f"peak grew by {grew} bytes for a {len(data)}-byte input"
        out.write(json.dumps({"i": i, "outcome": outcome, "detail": detail, "s": round(dt, 4), "grew": grew,
                              "size": len(data)}) + "\n")
    out.write("DONE\n")


def iter_inputs(seeds, regress, cases, seed, start, mutate, engine, kind):
    """(index, bytes): the seeds and regression inputs first, then `cases` mutations, from index `start`."""
    fixed = seeds + regress
    rng = random.Random(seed)
    drawn = []
    if engine == "hypothesis":
        drawn = hypothesis_inputs(fixed, cases, seed, kind)
    for i in range(len(fixed) + cases):
        if i < len(fixed):
            data = fixed[i]
        elif engine == "hypothesis":
            data = drawn[i - len(fixed)]
        else:
            data = mutate(rng.choice(seeds), rng, seeds)
        if i >= start:
            yield i, data


def hypothesis_inputs(seeds: list[bytes], n: int, seed: int, kind: str) -> list[bytes]:
    """`n` inputs whose edits hypothesis draws: for JSON a path and a replacement from its JSON strategy; for binary
    files a field offset and a value from the boundary integers, a cut, or a splice."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=40),
        lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=12), c, max_size=6), max_leaves=30)
    out: list[bytes] = []

    @settings(max_examples=n, database=None, derandomize=False, deadline=None, phases=["generate"],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def draw(data):
        base = data.draw(st.sampled_from(seeds))
        if kind == "json":
            try:
                doc = json.loads(base)
            except ValueError:
                doc = None
            for _ in range(data.draw(st.integers(1, 3))):
                paths = list(_json_paths(doc))
                path = data.draw(st.sampled_from(paths))
                new = data.draw(json_values)
                if not path:
                    doc = new
                    continue
                parent = doc
                for k in path[:-1]:
                    parent = parent[k]
                parent[path[-1]] = new
            try:
                out.append(json.dumps(doc).encode())
            except (ValueError, RecursionError):
                out.append(base)
        else:
            b = bytearray(base)
            for _ in range(data.draw(st.integers(1, 4))):
                if not b:
                    break
                what = data.draw(st.sampled_from(["int", "cut", "byte"]))
                i = data.draw(st.integers(0, len(b) - 1))
                if what == "int":
                    w = data.draw(st.sampled_from([1, 2, 4, 8]))
                    v = data.draw(st.sampled_from(INTERESTING_INTS) | st.integers(0, 2**64 - 1)) % (1 << 8 * w)
                    b[i:i + w] = v.to_bytes(w, "little")
                elif what == "cut":
                    del b[i:]
                else:
                    b[i] = data.draw(st.integers(0, 255))
            out.append(bytes(b))

    import hypothesis

    hypothesis.seed(seed)(draw)()
    return (out + seeds * n)[:n]


# --- the parent: watchdog and summary ---------------------------------------------------------------------------

def fuzz_target(name: str, seeds_root: Path, cases: int, seed: int, engine: str, crashes: Path,
                quiet: bool = False) -> dict:
    counts = {"parsed": 0, "refused": 0, "crash": 0, "hang": 0, "memory": 0}
    slowest = 0.0
    max_grew = 0
    findings: list[dict] = []
    case_root = Path(tempfile.mkdtemp(prefix=f"edgeq-fuzz-{name}-"))
    start = 0
    t0 = time.perf_counter()
    errlog = open(case_root / "worker.stderr", "w+b")    # a file: a pipe nobody reads would block the worker
    while True:
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--seeds-root",
                                 str(seeds_root), "--case-root", str(case_root), "--cases", str(cases), "--seed",
                                 str(seed), "--start", str(start), "--engine", engine, "--fd", str(w)],
                                pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=errlog)
        os.close(w)
        f = os.fdopen(r)
        current, last = None, time.monotonic()
        done = hung = False
        while True:
            ready, _, _ = select.select([f], [], [], 0.5)
            if ready:
                line = f.readline()
                if not line:
                    break
                line = line.strip()
                if line.startswith("START"):
                    current, last, cpu0 = int(line.split()[1]), time.monotonic(), _cpu_s(proc.pid)
                elif line == "DONE":
                    done = True
                    break
                else:
                    rec = json.loads(line)
                    counts[rec["outcome"]] += 1
                    slowest = max(slowest, rec["s"])
                    max_grew = max(max_grew, rec["grew"])
                    if rec["outcome"] not in ("parsed", "refused"):
                        findings.append(_save(name, case_root, crashes, rec))
                    current = None
                    start = rec["i"] + 1
            # a hang is 5 s of the worker's CPU time in one case (wall time on a shared 2-core machine also
            # counts other jobs), or a minute of wall time without progress (a case blocked, not computing)
            if current is not None and (_cpu_s(proc.pid) - cpu0 > CASE_TIMEOUT_S
                                        or time.monotonic() - last > WALL_TIMEOUT_S):
                proc.kill()
                hung = True
                counts["hang"] += 1
                findings.append(_save(name, case_root, crashes, {"i": current, "outcome": "hang",
                                                                 "detail": f"over {CASE_TIMEOUT_S} s of CPU"}))
                start = current + 1
                break
        f.close()
        proc.wait()
        errlog.seek(0)
        err = errlog.read()[-4000:].decode(errors="replace")
        errlog.seek(0)
        errlog.truncate()
        if done:
            break
        if hung:
            continue
        if current is None:
            raise RuntimeError(f"{name}: the worker stopped outside a case: {err[-2000:]}")
        counts["crash"] += 1        # the worker died inside a case (a segfault, an abort, the OOM killer)
        findings.append(_save(name, case_root, crashes, {"i": current, "outcome": "crash",
                                                         "detail": f"worker died ({proc.returncode}): {err[-300:]}"}))
        start = current + 1
    total = sum(counts.values())
    return {"target": name, "cases": total, **counts, "slowest_s": round(slowest, 3),
            "peak_growth_mb": round(max_grew / 2**20, 1), "seconds": round(time.perf_counter() - t0, 1),
            "findings": findings}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _save(name: str, case_root: Path, crashes: Path, rec: dict) -> dict:
    data = (case_root / f"{name}.current").read_bytes()
    digest = hashlib.sha1(data).hexdigest()[:16]
    folder = crashes / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{rec['outcome']}-{digest}").write_bytes(data)
    (folder / f"{rec['outcome']}-{digest}.txt").write_text(rec.get("detail", "") + "\n")
    return {"outcome": rec["outcome"], "input": str(folder / f"{rec['outcome']}-{digest}"),
            "detail": rec.get("detail", "").splitlines()[0][:200] if rec.get("detail") else ""}


def table(rows: list[dict]) -> str:
    head = "| target | cases | parsed | refused | crash | hang | memory | slowest s | peak growth MB |\n" \
           "|---|---|---|---|---|---|---|---|---|\n"
    return head + "".join(f"| {r['target']} | {r['cases']} | {r['parsed']} | {r['refused']} | {r['crash']} | "
                          f"{r['hang']} | {r['memory']} | {r['slowest_s']} | {r['peak_growth_mb']} |\n" for r in rows)


def seeds_root_default() -> Path:
    return Path(os.environ.get("EDGEQ_FUZZ_SEEDS") or Path.home() / ".cache" / "edgeq" / "fuzz-seeds")


def run_atheris(name: str, seeds_root: Path, cases: int) -> int:
    """libFuzzer through atheris, coverage-guided, on one target (its seeds as the starting corpus)."""
    import atheris

    with atheris.instrument_imports(include=["edgeq"]):
        import targets as T

        T.import_readers()

    target = T.TARGETS[name]
    case_dir = Path(tempfile.mkdtemp(prefix=f"edgeq-atheris-{name}-"))
    T.prepare_case_folder(target, T._layout(seeds_root), case_dir)
    case_file = T.case_path(target, case_dir)
    corpus = Path(tempfile.mkdtemp(prefix=f"edgeq-atheris-corpus-{name}-"))
    for p in (seeds_root / "seeds" / name).glob("*"):
        (corpus / p.name).write_bytes(p.read_bytes())

    def one(data: bytes) -> None:
        outcome, detail = run_case(target, case_file, case_dir, data)
        if outcome == "crash":
            raise RuntimeError(detail)

    rss0 = _rss()[0] >> 20
    atheris.Setup([sys.argv[0], f"-runs={cases}", f"-timeout={int(CASE_TIMEOUT_S)}",
                   f"-rss_limit_mb={rss0 + 2 * 64 + MEMORY_SLACK // 2**20}", "-max_len=1048576",
                   f"-artifact_prefix={HERE / 'crashes' / name}/", str(corpus)], one)
    (HERE / "crashes" / name).mkdir(parents=True, exist_ok=True)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fuzz edgeq's readers of untrusted files")
    ap.add_argument("--cases", type=int, default=300, help="mutated cases per target (after seeds and corpus)")
    ap.add_argument("--targets", help="comma-separated targets (default: all): " + ", ".join(_target_names()))
    ap.add_argument("--engine", default="mutate", choices=["mutate", "hypothesis", "atheris"],
                    help="mutate: seeded byte/JSON-tree mutations; hypothesis: structured edits drawn by "
                         "hypothesis; atheris: coverage-guided libFuzzer (one target)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds-root", type=Path, default=None, help="where seed files are built (default "
                                                                 "~/.cache/edgeq/fuzz-seeds)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    ap.add_argument("--crashes", type=Path, default=HERE / "crashes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case-root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    seeds_root = a.seeds_root or seeds_root_default()
    if a.worker:
        worker(a.worker, seeds_root, a.case_root, a.cases, a.seed, a.start, a.engine, a.fd)
        return 0
    import targets as T

    T.build_seeds(seeds_root)
    names = a.targets.split(",") if a.targets else list(T.TARGETS)
    unknown = [n for n in names if n not in T.TARGETS]
    if unknown:
        ap.error(f"unknown target {unknown[0]!r}")
    if a.engine == "atheris":
        if len(names) != 1:
            ap.error("--engine atheris fuzzes one target at a time (--targets NAME)")
        return run_atheris(names[0], seeds_root, a.cases)
    rows = []
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for n in names:
        r = fuzz_target(n, seeds_root, a.cases, a.seed, a.engine, a.crashes)
        rows.append(r)
        print(f"{n}: {r['cases']} cases, {r['crash']} crash, {r['hang']} hang, {r['memory']} memory "
              f"({r['seconds']} s)", flush=True)
        Path(a.out).write_text(json.dumps({"engine": a.engine, "seed": a.seed, "cases_per_target": a.cases,
                                           "targets": rows}, indent=1) + "\n")      # after each target
    print(table(rows))
    return 1 if any(r["crash"] or r["hang"] or r["memory"] for r in rows) else 0


def _target_names() -> list[str]:
    return ["gguf", "imatrix", "safetensors", "hf_config", "hf_tokenizer", "hf_tokenizer_config", "bert_config",
            "adapter_config", "adapter_weights", "pt2", "plan", "manifest", "images"]


if __name__ == "__main__":
    sys.exit(main())
