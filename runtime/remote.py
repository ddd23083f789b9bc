"""The on-device runner: `python -m edgeq.runtime.remote WORKDIR`. No torch, no compiler.

A device backend (local, ssh, adb, qemu-arm64) copies a request into WORKDIR,
starts this module there and copies WORKDIR/out back. Files, not pipes, carry
the request and the results because `adb shell` has no dependable stdin and
logits are megabytes. The response says how long each call took and the
runner's peak resident memory (VmHWM, else getrusage; under qemu-user it
includes the emulator's own memory).

Request (WORKDIR/request.json):
    {"bundle": "/device/path", "op": "reference" | "logits" | "embed" | "generate" | "run" | "latency",
     "backend": null, "threads": 1 (null: the bundle profile's), "n_ctx": null, "args": {...}}
Response (WORKDIR/out/response.json): {"ok": true, "result": {...}, "latency_s": [...], "load_s": ...,
    "peak_rss_bytes": ..., "machine": ..., "python": ..., "runtime_file": ...}
or {"ok": false, "error": "one line", "error_type": "BundleError", "user_error": true}.
Exit status 0, 2 when edgeq refused the request (a damaged or altered bundle: `runtime.load` verifies it before
anything is loaded, as on the host), 1 for anything else.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import edgeq.runtime
from edgeq import runtime
from edgeq.core.errors import EdgeqError


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM first: getrusage's ru_maxrss survives exec, so it
    would also count whatever process spawned the runner (a pytest session, an sshd)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux, bytes on macOS
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _reference(session, bundle: Path, out: Path, args: dict[str, Any]) -> tuple[dict, list[float]]:
    """The bundle's own reference inputs through the runtime; outputs saved like the bundle saves its reference."""
    ref = bundle / "reference"
    lat: list[float] = []
    if (ref / "images.npy").is_file():          # CNN bundles: images in, logits out
        images = np.load(ref / "images.npy", allow_pickle=False)
        rows = []
        for x in images:
            o, dt = _timed(session.run, {"images": x[None]})
            rows.append(o["logits"][0])
            lat.append(dt)
        np.save(out / "logits.npy", np.stack(rows).astype(np.float32))
        return {"kind": "cnn_logits", "files": ["logits.npy"], "n_inputs": len(images)}, lat
    inputs = json.loads((ref / "inputs.json").read_text(encoding="utf-8"))
    ids = inputs["token_ids"]
    if hasattr(session, "embed_ids"):
        rows = []
        for x in ids:
            e, dt = _timed(session.embed_ids, [x])
            rows.append(e[0])
            lat.append(dt)
        np.save(out / "embeddings.npy", np.stack(rows).astype(np.float32))
        return {"kind": "embeddings", "files": ["embeddings.npy"], "n_inputs": len(ids)}, lat
    files = []
    for i, x in enumerate(ids):
        lg, dt = _timed(session.logits, x)
        np.save(out / f"logits_{i}.npy", lg.astype(np.float32))
        files.append(f"logits_{i}.npy")
        lat.append(dt)
    result: dict[str, Any] = {"kind": "logits", "files": files, "n_inputs": len(ids),
                              "prefill_tokens": [len(x) for x in ids]}
    n_decode = int(args.get("decode_tokens", 8))
    if n_decode > 0:
        # greedy decoding of a few tokens: the per-token latency people compare across devices
        session.backend.reset()
        logits = session.backend.feed(ids[0])
        tok_times = []
        for _ in range(n_decode):
            tok = int(np.argmax(logits))
            t0 = time.perf_counter()
            logits = session.backend.feed([tok])
            tok_times.append(time.perf_counter() - t0)
        result["decode_s_per_token"] = float(np.median(tok_times))
    return result, lat


def _latency(session, req: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Timed prefills and decode steps of a decoder, or calls of an encoder or CNN (runtime/latency.py); with
    args['ops'] the backend's per-kernel timings of the same calls instead."""
    from edgeq import runtime
    from edgeq.runtime import latency

    result: dict[str, Any] = {"device": latency.device_facts(runtime.runtime_dists()),
                              "load_average_before": latency.load_average()}
    backend = getattr(session, "backend", None)
    if backend is None or not hasattr(backend, "feed"):          # an encoder or a CNN: one call per input
        if not hasattr(session, "run") or getattr(session, "kind", None) not in ("encoder", "cnn"):
            raise ValueError("the latency op times decoder, encoder and CNN bundles")
        impl = runtime.BACKENDS[session.backend_name]
        if args.get("ops"):
            if not hasattr(impl, "model_op_latency"):
                raise ValueError(f"the {session.backend_name} runtime has no per-kernel timer for {session.kind}s")
            result["ops"] = impl.model_op_latency(session, args, session.threads)
        else:
            result.update(latency.model_latency(session, args))
    elif args.get("ops"):
        impl = runtime.BACKENDS[backend.name]
        if not hasattr(impl, "op_latency"):
            raise ValueError(f"the {backend.name} runtime has no per-kernel timer")
        result["ops"] = impl.op_latency(backend, args, session.threads)
    else:
        result.update(latency.decoder_latency(backend, args))
    result["load_average_after"] = latency.load_average()
    return result


def _run_op(req: dict[str, Any], work: Path, out: Path) -> dict[str, Any]:
    bundle = Path(req["bundle"])
    op = req["op"]
    args = req.get("args") or {}
    t0 = time.perf_counter()
    # `device`: a TVM RPC server the TVM backend drives from here (the rpc device runs this on the host)
    extra = {"device": req["device"]} if req.get("device") else {}
    if req.get("pruning_rate") is not None:       # a rate of a bundle exported with --pruning-rates
        extra["pruning_rate"] = float(req["pruning_rate"])
    threads = req.get("threads", 1)           # null: the bundle's profile's (runtime.load)
    session = runtime.load(bundle, backend=req.get("backend"), threads=None if threads is None else int(threads),
                           n_ctx=req.get("n_ctx"), **extra)
    load_s = time.perf_counter() - t0
    lat: list[float] = []
    try:
        if op == "reference":
            result, lat = _reference(session, bundle, out, args)
        elif op == "logits":
            lg, dt = _timed(session.logits, args["token_ids"])
            np.save(out / "logits.npy", lg.astype(np.float32))
            result, lat = {"files": ["logits.npy"]}, [dt]
        elif op == "embed":
            e, dt = _timed(session.embed, list(args["texts"]))
            np.save(out / "embeddings.npy", e.astype(np.float32))
            result, lat = {"files": ["embeddings.npy"]}, [dt]
        elif op == "generate":
            text, dt = _timed(lambda: session.generate(args["prompt"], max_tokens=int(args.get("max_tokens", 32)),
                                                       chat=bool(args.get("chat", False)),
                                                       temperature=float(args.get("temperature", 0.0)),
                                                       seed=int(args.get("seed", 0))))
            result, lat = {"text": text}, [dt]
        elif op == "latency":
            result = _latency(session, req, args)
        elif op == "run":
            with np.load(work / args["inputs"], allow_pickle=False) as f:      # absolute, or in WORKDIR
                feeds = {k: f[k] for k in f.files}
            outs, dt = _timed(session.run, feeds)
            np.savez(out / "outputs.npz", **outs)
            result, lat = {"files": ["outputs.npz"]}, [dt]
        else:
            raise ValueError(f"unknown op {op!r}")
    finally:
        session.close()
    return {"result": result, "latency_s": lat, "load_s": load_s,
            "backend": getattr(session, "backend_name", None)}


def execute(work: Path) -> dict[str, Any]:
    """Run WORKDIR/request.json; write and return the response (WORKDIR/out/response.json)."""
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    try:
        req = json.loads((work / "request.json").read_text(encoding="utf-8"))
        resp: dict[str, Any] = {"ok": True, **_run_op(req, work, out)}
    except Exception as exc:       # reported to the host as one line, whatever it is
        msg = str(exc) if isinstance(exc, EdgeqError) else f"{type(exc).__name__}: {exc}"
        resp = {"ok": False, "error": msg.splitlines()[0] if msg else type(exc).__name__,
                "error_type": type(exc).__name__, "user_error": isinstance(exc, EdgeqError)}
    resp.update(peak_rss_bytes=_peak_rss_bytes(), machine=platform.machine(), python=platform.python_version(),
                runtime_file=edgeq.runtime.__file__)
    tmp = out / "response.json.tmp"
    tmp.write_text(json.dumps(resp, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "response.json")
    return resp


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m edgeq.runtime.remote WORKDIR", file=sys.stderr)
        return 2
    resp = execute(Path(argv[0]))
    if resp["ok"]:
        return 0
    print(f"edgeq: error: {resp['error']}", file=sys.stderr)
    return 2 if resp.get("user_error") else 1


if __name__ == "__main__":
    sys.exit(main())
