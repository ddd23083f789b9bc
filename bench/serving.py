"""Using a bundle: which sampling default answers best, and what the HTTP server costs over the runtime.

    python bench/serving.py                      # exports the default android bundle, or --bundle out/
    python bench/serving.py --seeds 10 --rounds 2

1. Answer rate: five factual questions ("What is the capital of France?" ...) asked through the chat template
   with several sampling settings, each with `--seeds` seeds; a reply counts when it names the right city.
   This is what `edgeq run/chat/serve` default to (greedy) and why.
2. Server overhead: decode speed of the same 128-token generation (end-of-generation tokens banned) through
   `Session.stream` in this process, and through `edgeq serve` (streamed and whole, the `openai` client),
   interleaved per round; and ten concurrent chat requests against the same ten sequentially in the runtime.

Writes bench/results/serving.json. Records the CPU flags and the load average; 1 thread everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo"}
SETTINGS = {
    "greedy (edgeq's default)": {"temperature": 0.0},
    "T 0.2, top-k 40, top-p 0.95, min-p 0.05": {"temperature": 0.2, "top_k": 40, "top_p": 0.95, "min_p": 0.05},
    "T 0.8, top-k 40, top-p 0.95, min-p 0.05 (llama.cpp's)": {"temperature": 0.8, "top_k": 40, "top_p": 0.95,
                                                               "min_p": 0.05},
    "T 1.0, no truncation (OpenAI's)": {"temperature": 1.0},
}


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx")))
    return []


def answer_rates(session, seeds: int) -> dict:
    out = {}
    for label, sampling in SETTINGS.items():
        hits, t0 = 0, time.perf_counter()
        n = 0
        for country, city in QUESTIONS.items():
            for seed in range(1 if sampling["temperature"] == 0 else seeds):
                reply = session.chat([{"role": "user", "content": f"What is the capital of {country}?"}], 48,
                                     seed=seed, **sampling)
                hits += city in reply
                n += 1
        out[label] = {"rate": hits / n, "replies": n, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  {label}: {hits}/{n} name the capital", flush=True)
    return out


def start_server(bundle: Path):
    p = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "serve", str(bundle), "--port", "0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if " at http://" in line:
            return p, line.split(" at ", 1)[1].split("/v1", 1)[0]
    raise SystemExit("the server did not start")


def overhead(session, bundle: Path, rounds: int, n_tokens: int) -> dict:
    import openai

    ban = {t: -100.0 for t in session.stop_ids}
    prompt = "Once upon a time"
    p, url = start_server(bundle)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    times: dict[str, list[float]] = {"runtime": [], "server, streamed": [], "server, whole": []}
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            c = session.stream(prompt, n_tokens, logit_bias=ban)
            c.result()
            assert c.completion_tokens == n_tokens
            times["runtime"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            chunks = client.completions.create(model=bundle.resolve().name, prompt=prompt, max_tokens=n_tokens,
                                               stream=True, logit_bias={str(k): v for k, v in ban.items()},
                                               temperature=0)
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            times["server, streamed"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = client.completions.create(model=bundle.resolve().name, prompt=prompt, max_tokens=n_tokens,
                                          logit_bias={str(k): v for k, v in ban.items()}, temperature=0)
            times["server, whole"].append(time.perf_counter() - t0)
            assert r.usage.completion_tokens == n_tokens and text == r.choices[0].text == c.text
        speed = {k: {"median_tok_s": round(n_tokens / statistics.median(v), 2),
                     "spread_tok_s": [round(n_tokens / max(v), 2), round(n_tokens / min(v), 2)]}
                 for k, v in times.items()}
        questions = [f"What is the capital of {c}?" for c in QUESTIONS] * 2
        t0 = time.perf_counter()
        for q in questions:
            session.chat([{"role": "user", "content": q}], 32)
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(questions)) as pool:
            list(pool.map(lambda q: client.chat.completions.create(
                model=bundle.resolve().name, messages=[{"role": "user", "content": q}], max_tokens=32), questions))
        concurrent = time.perf_counter() - t0
    finally:
        p.terminate()
        p.wait(timeout=60)
    for k, v in speed.items():
        print(f"  {k}: {v['median_tok_s']} tok/s (range {v['spread_tok_s']})", flush=True)
    print(f"  10 chat requests: {sequential:.2f} s one after another in the runtime, {concurrent:.2f} s concurrently "
          "through the server", flush=True)
    return {"n_tokens": n_tokens, "rounds": rounds, "decode": speed,
            "ten_requests_s": {"runtime_sequential": round(sequential, 2), "server_concurrent": round(concurrent, 2)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a decoder bundle (default: export the default model for android)")
    ap.add_argument("--seeds", type=int, default=20, help="seeds per question for each sampled setting")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed comparison")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per speed round")
    ap.add_argument("--out", default=str(ROOT / "bench/results/serving.json"))
    a = ap.parse_args(argv)
    from edgeq import runtime

    bundle = Path(a.bundle) if a.bundle else Path(tempfile.mkdtemp()) / "android"
    if not a.bundle:
        subprocess.run([sys.executable, "-m", "edgeq.cli", "export", "--target", "android", "-o", str(bundle),
                        "--quiet"], check=True)
    res = {"bundle": str(bundle), "machine": platform.machine(), "cpu_flags": cpu_flags(), "threads": 1,
           "load_before": os.getloadavg()}
    with runtime.load(bundle, threads=1) as s:
        res["backend"] = s.backend_name
        print("answer rate by sampling setting:", flush=True)
        res["answer_rate"] = answer_rates(s, a.seeds)
        print("server overhead:", flush=True)
        res["overhead"] = overhead(s, bundle, a.rounds, a.tokens)
    res["load_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
