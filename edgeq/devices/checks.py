"""The HIL checks: run a bundle's reference inputs on a device and judge what came back.

Outputs are judged against the float reference outputs stored in the bundle,
with the tolerances the project applies on the host, relative to what the host
measured at export (measurements.json `reference_check`): a device may lose a
little more than the host (other kernels), never much more. Latency is judged
against the bundle's prediction once the predictor writes one, until then
against the same run on the host, and never under emulation. A damaged bundle
must come back as the runtime's checksum error, never as numbers.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.bundle.reference import read_reference
from edgeq.devices.base import Device, RunResult
from edgeq.evaluate.decoder import compare_logits
from edgeq.evaluate.encoder import cosines

# logits: KL(reference || device) and top-1 agreement; embeddings: cosine to the reference
KLD_MEAN_MAX = 0.05          # tests/test_bundle.py's bound for a q8_0 bundle, used when the host measured nothing
KLD_SLACK = (1.5, 0.01)      # device kld_mean <= 1.5 x host's + 0.01
TOP1_SLACK = 0.1             # device top-1 >= host's - 0.1 (a few dozen positions: one flip is 4 %)
COSINE_MEAN_MIN, COSINE_MIN_MIN = 0.99, 0.95      # tests/test_onnx_encoder.py's int8 bounds
COSINE_SLACK = 0.005
AGREEMENT_SLACK = 0.125     # CNNs: top-1 agreement with the reference may lose one image in eight more than the host
RUNTIME_OVERHEAD_BYTES = 512 << 20                # interpreter, numpy and the runtime's own libraries


def run_reference(device: Device, bundle: str | Path, backend: str | None = None, threads: int = 1,
                  n_ctx: int | None = 256, decode_tokens: int = 8, timeout: float = 1800,
                  pruning_rate: float | None = None) -> RunResult:
    """Push the bundle (once per content) and run its reference inputs there; `pruning_rate`: at one of the rates a
    bundle exported with --pruning-rates carries (its outputs then differ from the full model's reference outputs by
    what the pruning costs: check latency and memory there, fidelity at rate 0)."""
    remote = device.push(Path(bundle))
    return device.run(remote, "reference", {"decode_tokens": decode_tokens}, backend=backend, threads=threads,
                      n_ctx=n_ctx, timeout=timeout, pruning_rate=pruning_rate)


def host_check(bundle: Path) -> dict[str, Any]:
    m = Path(bundle) / "measurements.json"
    if not m.is_file():
        return {}
    return json.loads(m.read_text(encoding="utf-8")).get("reference_check") or {}


def compare(bundle: str | Path, result: RunResult) -> dict[str, Any]:
    """The device's outputs against the bundle's reference outputs (figures as the export's own check)."""
    bundle = Path(bundle)
    if not result.ok:
        raise AssertionError(f"the device failed to run {bundle}: {result.error}")
    if result.result.get("kind") == "cnn_logits":
        ref = np.load(bundle / "reference" / "logits.npy", allow_pickle=False)
        got = np.load(result.outputs / "logits.npy", allow_pickle=False)
        return {"agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
                "max_abs_diff": float(np.abs(got - ref).max()), "n_inputs": int(len(ref))}
    if result.result.get("kind") == "embeddings":
        ref = np.load(bundle / "reference" / "embeddings.npy", allow_pickle=False)
        got = np.load(result.outputs / "embeddings.npy", allow_pickle=False)
        c = cosines(ref, got)
        return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "n_inputs": int(c.size)}
    _, ref = read_reference(bundle / "reference")
    got = [np.load(result.outputs / f, allow_pickle=False) for f in result.result["files"]]
    return compare_logits(ref, got)


def assert_outputs_match(bundle: str | Path, result: RunResult) -> dict[str, Any]:
    """Fail unless the device reproduces the reference outputs within the host's tolerances; the figures."""
    got = compare(bundle, result)
    host = host_check(Path(bundle))
    if "agreement" in got:
        agree_min = host.get("agreement", 1.0) - AGREEMENT_SLACK
        diff_max = 2 * host["max_abs_diff"] + 1e-3 if "max_abs_diff" in host else float("inf")
        assert got["agreement"] >= agree_min and got["max_abs_diff"] <= diff_max, (
            f"CNN logits differ from the reference: {got} (host measured {host}; need agreement >= {agree_min:.3f}, "
            f"max_abs_diff <= {diff_max:.4g})")
    elif "cosine_mean" in got:
        mean_min = min(COSINE_MEAN_MIN, host.get("cosine_mean", 1.0) - COSINE_SLACK)
        min_min = min(COSINE_MIN_MIN, host.get("cosine_min", 1.0) - COSINE_SLACK)
        assert got["cosine_mean"] >= mean_min and got["cosine_min"] >= min_min, (
            f"embeddings differ from the reference: {got} (host measured {host}; need mean >= {mean_min:.4f}, "
            f"min >= {min_min:.4f})")
    else:
        kld_max = (KLD_SLACK[0] * host["kld_mean"] + KLD_SLACK[1]) if "kld_mean" in host else KLD_MEAN_MAX
        top1_min = host.get("top1", 1.0) - TOP1_SLACK
        assert got["kld_mean"] <= kld_max and got["top1"] >= top1_min, (
            f"logits differ from the reference: {got} (host measured {host}; need kld_mean <= {kld_max:.4f}, "
            f"top1 >= {top1_min:.3f})")
    return got


def assert_checksum_error(result: RunResult) -> str:
    """A damaged bundle must be refused by the runtime's verification, not run."""
    assert not result.ok, f"the device ran a damaged bundle: {result.result}"
    assert result.response.get("error_type") == "BundleError" and "checksum error" in (result.error or ""), (
        f"expected a checksum error, got {result.response.get('error_type')}: {result.error}")
    return result.error or ""


def latency_skip_reason(device: Device) -> str | None:
    if device.emulated:
        return f"{device.name} is emulated: its latency says nothing about real hardware"
    return None


def typical_latency_s(result: RunResult) -> float:
    """Per-token decode time for decoders, else the median call."""
    r = result.result
    if r.get("decode_s_per_token") is not None:
        return float(r["decode_s_per_token"])
    return statistics.median(result.latency_s)


def assert_latency(bundle: str | Path, result: RunResult, host_result: RunResult | None = None,
                   factor: float = 3.0) -> dict[str, float]:
    """Device latency within `factor` of the bundle's prediction, or of the host's run when nothing is predicted."""
    predicted = (json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8")).get("predicted") or {})
    ms = predicted.get("latency_ms_per_token")
    got = typical_latency_s(result)
    if ms is not None and result.result.get("decode_s_per_token") is not None:
        ref, what = ms / 1000.0, "predicted"
    elif host_result is not None:
        ref, what = typical_latency_s(host_result), "host"
    else:
        raise AssertionError("no latency to compare with: the bundle predicts none and no host run was given")
    assert got <= factor * ref, f"latency {got * 1e3:.2f} ms is over {factor} x the {what} {ref * 1e3:.2f} ms"
    return {"device_s": got, f"{what}_s": ref}


def measure_prediction(device: Device, bundle: str | Path, backend: str | None = None, threads: int = 1,
                       rounds: int = 3) -> dict[str, Any]:
    """Time the bundle on the device the way its manifest's `predicted` was predicted (a prefill of its
    prompt_tokens, decode steps at its context_tokens; edgeq/predictor), in `rounds` separate runs, and return
    both with their ratios (measured / predicted). Raises AssertionError when the bundle predicts nothing."""
    m = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
    pred = m.get("predicted") or {}
    if pred.get("latency_ms_per_token") is None:
        raise AssertionError(f"{bundle} has no prediction: export it with --latency-profile")
    if int(pred.get("threads", threads)) != threads:
        raise AssertionError(f"{bundle} was predicted for {pred.get('threads')} threads, not {threads}")
    remote = device.push(Path(bundle))
    n, c = int(pred["prompt_tokens"]), int(pred["context_tokens"])
    # a profile timed in CPU time (one thread, `edgeq profile --clock cpu`) predicts CPU time
    clock = "cpu_s" if (pred.get("latency_profile") or {}).get("clock") == "cpu" else "wall_s"
    args = {"prefill": [n], "decode": [c], "steps": 8, "prefill_steps": 2, "warmup": 1}
    dec, pre = [], []
    for _ in range(rounds):
        res = device.run(remote, "latency", args, backend=backend or pred.get("backend"), threads=threads,
                         n_ctx=max(256, n, c + 16))
        if not res.ok:
            raise AssertionError(f"the device failed to time {bundle}: {res.error}")
        dec.append(statistics.median(res.result["decode"][str(c)][clock]) * 1e3)
        pre.append(statistics.median(res.result["prefill"][str(n)][clock]) * 1e3)
    got = {"decode_ms_per_token": statistics.median(dec), "prefill_ms": statistics.median(pre)}
    return {"measured": got, "predicted": {"decode_ms_per_token": pred["latency_ms_per_token"],
                                           "prefill_ms": pred["prefill_ms"]},
            "decode_ratio": got["decode_ms_per_token"] / pred["latency_ms_per_token"],
            "prefill_ratio": got["prefill_ms"] / pred["prefill_ms"], "rounds": rounds, "clock": clock[:-2]}


def assert_peak_memory(bundle: str | Path, result: RunResult, max_bytes: int | None = None) -> int:
    """Peak resident memory of the runner within a budget: the bundle's prediction, else its model files
    plus the runtime's own overhead."""
    m = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
    if max_bytes is None:
        predicted = (m.get("predicted") or {}).get("peak_memory_bytes")
        files = sum(int(a["bytes"]) for a in m["artifacts"])
        max_bytes = int(predicted) if predicted else files + RUNTIME_OVERHEAD_BYTES
    peak = result.peak_rss_bytes
    if peak is None:
        raise AssertionError("this device does not report its peak memory (TVM RPC); check it on the device")
    assert 0 < peak <= max_bytes, f"peak memory {peak / 2**20:.0f} MiB is over the budget {max_bytes / 2**20:.0f} MiB"
    return peak
