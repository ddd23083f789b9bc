"""What the speed benchmarks share: the MiniLM fixture (the timed input and the float reference embeddings),
onnxruntime's own baselines (the float model after its transformer optimizer, `quantize_dynamic`), the ops
onnxruntime really runs, the CPU's instruction-set flags and the interleaved timing loop, so each bench differs
only in the variants it builds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.runtime.latency import interleaved_times  # noqa: F401  (the benches' timing loop lives there)


@dataclass
class EncoderFixture:
    """The timed input (one sequence of `seq` tokens) and held-out sentences with their reference embeddings."""

    long_ids: list[int]
    sentence_ids: list[list[int]]
    reference: np.ndarray        # (sentences, hidden) from edgeq's float executor


def encoder_fixture(model: str, seq: int, n_sentences: int) -> EncoderFixture:
    from edgeq.core.executor import Executor
    from edgeq.importers.hf_bert import encoder_tokenizer
    from edgeq.importers.loader import import_model, resolve_model_path
    from edgeq.evaluate.texts import calibration_text, evaluation_sentences

    graph = import_model(resolve_model_path(model))
    tok = encoder_tokenizer(graph)
    long_ids = tok.encode(calibration_text()[:4000]).ids[:seq]
    assert len(long_ids) == seq, f"calibration text gives {len(long_ids)} tokens, fewer than --seq {seq}"
    ids = [tok.encode(s).ids for s in evaluation_sentences(n_sentences)]
    ex = Executor(graph)
    return EncoderFixture(long_ids, ids, np.stack([ex.embed(i) for i in ids]))


def fidelity(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    from edgeq.evaluate.encoder import cosines

    c = cosines(reference, got)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}


def latency_ms(times: list[float]) -> dict[str, float]:
    return {"latency_ms_median": statistics.median(times) * 1e3,
            "latency_ms_p10": float(np.percentile(times, 10) * 1e3),
            "latency_ms_p90": float(np.percentile(times, 90) * 1e3)}


# the flags that decide which integer and float kernels a CPU gets: figures from machines that differ here
# (AVX2 only vs AVX-512 VNNI, say) are never compared
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_int8", "amx_bf16", "asimddp", "i8mm", "sve")


def isa_flags() -> list[str]:
    """The kernel-relevant ISA flags of this CPU (from /proc/cpuinfo)."""
    from edgeq.runtime.latency import device_facts

    return [f for f in ISA_FLAGS if f in set(device_facts()["flags"])]


def cpu_model() -> str:
    from edgeq.runtime.latency import device_facts

    return device_facts()["cpu"]


def ort_float_optimized(f32: str | Path, out: str | Path, heads: int = 12, hidden: int = 384) -> str | None:
    """The float encoder as onnxruntime's transformer optimizer leaves it (None, with a note, if it fails)."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(str(f32), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1)
        opt.save_model_to_file(str(out))
        return str(out)
    except Exception as exc:  # noqa: BLE001 - a baseline we could not build is reported, not fatal
        print(f"ORT transformer optimizer failed on the float model: {exc}")
        return None


def ort_quantize_dynamic(f32: str | Path, out: str | Path) -> str:
    """onnxruntime's own INT8: `quantize_dynamic`, per-channel signed weights, activations quantized per call."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(f32), str(out), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return str(out)


def optimized_ops(path: str | Path, threads: int, work: Path) -> dict[str, int]:
    """The ops onnxruntime really runs: the graph a plain session with default options (ORT_ENABLE_ALL) leaves."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.optimized_model_filepath = str(work / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for n in onnx.load(str(work / "optimized.onnx"), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    (work / "optimized.onnx").unlink()
    return dict(sorted(counts.items()))


def spread(values: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile of a list of rates or times."""
    return {"median": statistics.median(values), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90))}
