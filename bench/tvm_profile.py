"""Where a TVM bundle's call spends its time: each kernel's wall time per call, summed by kernel.

The Relax VM of TVM 0.27 has no profiler; its instrument hook runs before and after every call the VM makes, so the
time between the two is that kernel's (CPU kernels run synchronously, their parallel loops included). Batch 1, one
sentence of `--seq` tokens, `--calls` calls after two warm-ups; the whole call is timed too (the runtime's time
evaluator), so the hook's overhead shows as the difference.

    python bench/tvm_profile.py --bundle out-minilm-int8-dyn/ --threads 1
    python bench/tvm_profile.py --bundle out-tvm-int4/ --threads 2     # a decoder: one decode step after --seq tokens

A decoder bundle is profiled on its decode step (one token after a `--seq`-token prompt, the cache as `feed` leaves
it), or on the prefill of `--seq` tokens with `--prefill` (the entry `feed` runs: `prefill_last` where the bundle
has one, the last token's logits only).

Prints the table and writes bench/results/tvm_profile.json (machine flags and load included).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import cpu_model, isa_flags  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a TVM bundle (edgeq export --backend tvm)")
    ap.add_argument("--prefill", action="store_true", help="a decoder: profile the prefill of --seq tokens")
    ap.add_argument("--seq", type=int, default=128, help="tokens in the one sentence")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=7, help="profiled calls (after two warm-ups)")
    ap.add_argument("--top", type=int, default=15, help="kernels printed")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "tvm_profile.json")
    a = ap.parse_args()
    from edgeq import runtime

    load_before = os.getloadavg()
    with runtime.load(a.bundle, threads=a.threads) as s:
        encoder = getattr(s, "backend_name", None) == "tvm" and getattr(s, "kind", None) == "encoder"
        if not encoder and getattr(getattr(s, "backend", None), "name", None) != "tvm":
            raise SystemExit(f"{a.bundle}: not a TVM encoder or decoder bundle")
        if encoder:
            call, whole = _encoder_call(s, a)
        else:
            call, whole = _decoder_call(s, a)
        vm = call.vm
        spent: dict[str, list[float]] = collections.defaultdict(list)
        started: dict[str, float] = {}

        def instrument(_func, symbol, before, _ret, *_args) -> int:
            if before:
                started[symbol] = time.perf_counter()
            else:
                spent[symbol].append(time.perf_counter() - started[symbol])
            return 0                       # VMInstrumentReturnKind.kNoOp

        for _ in range(2):
            call()
        vm.set_instrument(instrument)
        for _ in range(a.calls):
            call()
        vm.set_instrument(None)
    # best_ms_per_call: each instance's fastest of the calls, summed (on a shared machine the mean carries the
    # other processes' time; the fastest is closer to the kernel's own)
    rows = sorted(({"kernel": k, "ms_per_call": float(np.sum(v)) / a.calls * 1e3, "calls": len(v) // a.calls,
                    "best_ms_per_call": float(np.sum(np.min(np.reshape(v, (a.calls, -1)), axis=0))) * 1e3}
                   for k, v in spent.items()), key=lambda r: -r["ms_per_call"])
    total = sum(r["ms_per_call"] for r in rows)
    result = {"bundle": str(a.bundle), "call": call.what, "seq": a.seq, "threads": a.threads, "cpu": cpu_model(), "cpu_flags": isa_flags(),
              "load_before": load_before, "load_after": os.getloadavg(), "whole_call": whole,
              "instrumented_ms_per_call": total, "kernels": rows}
    print(f"{cpu_model()}; flags {' '.join(isa_flags())}")
    print(f"{a.bundle}: {call.what}, {a.threads} thread(s), load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; "
          f"whole call median {whole['median_ms']:.2f} ms, kernels summed {total:.2f} ms")
    for r in rows[:a.top]:
        print(f"{r['ms_per_call']:9.3f} ms  {100 * r['ms_per_call'] / total:5.1f} %  best {r['best_ms_per_call']:8.3f} ms  "
              f"x{r['calls']:<3d} {r['kernel']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


class _Call:
    """One profiled call: `vm` whose instrument hook sees its kernels, `what` it is (for the table)."""

    def __init__(self, vm, fn, what: str):
        self.vm, self.fn, self.what = vm, fn, what

    def __call__(self):
        return self.fn()


def _encoder_call(s, a) -> tuple[_Call, dict]:
    ids = [101] + [1000] * (a.seq - 2) + [102]
    inputs = s.encoder_inputs([ids])
    whole = s.time(inputs, number=5, repeat=max(3, a.calls))
    args = s._args(inputs)            # the VM's argument list: inputs then parameters
    return _Call(s.vm, lambda: s.vm[s.entry](*args), f"b1 s{a.seq}"), whole


def _decoder_call(s, a) -> tuple[_Call, dict]:
    """The decode step after a --seq-token prompt (the same cache each call), or the prefill of --seq tokens."""
    be = s.backend
    prompt = [1000 + (7 * i) % 3000 for i in range(a.seq)]
    if a.prefill:
        fn, what = (lambda: (be.reset(), be._run(prompt))), f"prefill of {a.seq} tokens"
    else:
        be.reset()
        be._run(prompt)
        past, n = list(be.past), be.n_tokens

        def fn():
            be.past, be.n_tokens = list(past), n
            return be._run([1234])
        what = f"decode step after {a.seq} tokens"
    times = []
    for _ in range(max(3, a.calls) * 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    whole = {"median_ms": float(np.median(times)) * 1e3, "min_ms": float(np.min(times)) * 1e3}
    return _Call(be.session.vm, fn, what), whole


if __name__ == "__main__":
    main()
