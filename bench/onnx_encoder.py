"""all-MiniLM-L6-v2 on onnxruntime: edgeq int8 vs the float model after ORT's optimisations vs ORT's own INT8.

Batch 1, sequence 128, the same thread count for every variant, spinning off
(`--spinning`: on, onnxruntime's default, as a plain session opens the file),
variants interleaved round by round (so load on a shared machine hits all of
them alike); median latency per variant. Fidelity: cosine to edgeq's float
reference executor on held-out sentences.

    python bench/onnx_encoder.py                     # 2 threads, 15 rounds
    python bench/onnx_encoder.py --threads 1 --rounds 5 --sentences 64
    python bench/onnx_encoder.py --variants          # + edgeq int8's other lowerings (why the export has its form)

`--variants` lowers the int8 bundle's own plan again in the forms the export
does not write: static int8 as QDQ pairs around float MatMuls (left to
onnxruntime's fusion), q/k/v as three MatMulIntegerToFloat + MultiHeadAttention
instead of one QAttention, and Add + LayerNormalization as
SkipLayerNormalization.

Prints a table and writes bench/results/onnx_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from shared import (
    encoder_fixture,
    fidelity,
    interleaved_times,
    isa_flags,
    latency_ms,
    optimized_ops,
    ort_float_optimized,
    ort_quantize_dynamic,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs-per-round", type=int, default=10)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--spinning", action="store_true", help="intra-op threads spin between ops (ORT's default)")
    ap.add_argument("--variants", action="store_true", help="also edgeq int8's other lowerings of the same plan")
    ap.add_argument("--out", default="bench/results/onnx_encoder.json")
    a = ap.parse_args()

    import onnxruntime as ort

    from edgeq.api import ExportOptions, export
    from edgeq.runtime.onnx_backend import session_options

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-"))
    models: dict[str, str] = {}
    export_s: dict[str, float] = {}
    for q in ("f32", "int8", "int8-dyn"):
        t0 = time.perf_counter()
        export(ExportOptions(model="all-MiniLM-L6-v2", backend="onnx", quant=q, out=str(work / q), check=False))
        export_s[q] = time.perf_counter() - t0
        models[f"edgeq {q}"] = str(work / q / "model.onnx")
    f32 = models["edgeq f32"]
    opt = ort_float_optimized(f32, work / "f32_ortopt.onnx")
    if opt:
        models["float, ORT transformer optimizer"] = opt
    models["ORT quantize_dynamic per-channel int8"] = ort_quantize_dynamic(f32, work / "ort_dyn_pc.onnx")
    if a.variants:
        models.update(lowering_variants(work / "int8", work))

    fx = encoder_fixture("all-MiniLM-L6-v2", a.seq, a.sentences)
    feed = {"input_ids": np.array([fx.long_ids], np.int64), "attention_mask": np.ones((1, a.seq), np.int64)}
    sessions = {k: ort.InferenceSession(v, session_options(a.threads, a.spinning), providers=["CPUExecutionProvider"])
                for k, v in models.items()}
    quality = {k: fidelity(fx.reference, np.stack([
        s.run(["embedding"], {"input_ids": np.array([i]), "attention_mask": np.ones((1, len(i)), np.int64)})[0][0]
        for i in fx.sentence_ids])) for k, s in sessions.items()}
    times = interleaved_times({k: (lambda s=s: s.run(["embedding"], feed)) for k, s in sessions.items()},
                              a.rounds, a.runs_per_round, warmup=3)
    ops = {k: optimized_ops(v, a.threads, work) for k, v in models.items()}
    gemm = gemm_int8_vs_f32(a.threads, a.rounds)
    base = "float, ORT transformer optimizer" if "float, ORT transformer optimizer" in times else "edgeq f32"
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    dyn = "ORT quantize_dynamic per-channel int8"
    rows = []
    for k in sessions:
        rows.append({"variant": k, "file_mb": os.path.getsize(models[k]) / 1e6, **latency_ms(times[k]),
                     "vs_float": med[k] / med[base], "speedup_vs_quantize_dynamic": med[dyn] / med[k], **quality[k],
                     "optimized_ops": ops[k]})
    print(f"MiniLM-L6-v2, batch 1, seq {a.seq}, {a.threads} threads, spinning {'on' if a.spinning else 'off'}, "
          f"{a.rounds}x{a.runs_per_round} "
          f"interleaved runs; baseline: {base}")
    print(f"{'variant':56s} {'MB':>6s} {'ms':>7s} {'x float':>8s} {'dyn/ms':>7s} {'cos mean':>9s} {'cos min':>8s}")
    for r in rows:
        print(f"{r['variant']:56s} {r['file_mb']:6.1f} {r['latency_ms_median']:7.2f} {r['vs_float']:8.3f} "
              f"{r['speedup_vs_quantize_dynamic']:7.3f} {r['cosine_mean']:9.5f} {r['cosine_min']:8.5f}")
    print(f"one 128x384x1536 GEMM alone, {a.threads} threads: int8 (QDQ -> {gemm['int8_kernel']}) "
          f"{gemm['int8_ms']:.3f} ms vs f32 MatMul {gemm['f32_ms']:.3f} ms = {gemm['int8_vs_f32']:.3f}x; "
          f"CPU integer-dot-product extensions: {', '.join(gemm['cpu_flags']) or 'none (AVX2 only)'}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": a.threads, "spinning": a.spinning, "seq": a.seq, "batch": 1,
                               "rounds": a.rounds,
                               "runs_per_round": a.runs_per_round, "baseline": base, "n_sentences": len(fx.sentence_ids),
                               "gemm_128x384x1536": gemm,
                               "export_s": export_s, "onnxruntime": ort.__version__, "rows": rows,
                               "isa_flags": isa_flags(), "load_before": load_before,
                               "load_avg": os.getloadavg()}, indent=1) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)             # ~300 MB of exports


LOWERING_VARIANTS = {"edgeq int8 as QDQ (ORT fuses)": {"int8_as_qdq": True},
                     "edgeq int8, MatMulIntegerToFloat + MultiHeadAttention": {"qattention": False},
                     "edgeq int8 + SkipLayerNormalization": {"skip_layer_norm": True}}


def lowering_variants(bundle: Path, work: Path) -> dict[str, str]:
    """The int8 bundle's plan lowered again in the forms the export does not write (same weights, same ranges)."""
    from edgeq.core.plan import plan_from_json
    from edgeq.importers.loader import import_model, resolve_model_path
    from edgeq.targets.onnx.lower import lower_onnx, save_model

    plan = plan_from_json(json.loads((bundle / "manifest.json").read_text())["plan"])
    graph = import_model(resolve_model_path("all-MiniLM-L6-v2"))
    out = {}
    for i, (name, options) in enumerate(LOWERING_VARIANTS.items()):
        path = work / f"variant{i}.onnx"
        save_model(lower_onnx(graph, plan, **options), path)
        out[name] = str(path)
    return out


def gemm_int8_vs_f32(threads: int, rounds: int) -> dict:
    """One FFN-sized GEMM alone, int8 (per-channel weights, uint8 activation, QDQ) against f32, interleaved.

    Tells apart "the lowering is not fused" from "this CPU's integer GEMM is not faster": onnxruntime's
    x86 int8 kernels are fast with VNNI (AVX-512 VNNI / AVX-VNNI) and only modestly so with plain AVX2."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.core.formats.int8 import int8_quantize_rows
    from edgeq.runtime.onnx_backend import session_options

    m, k, n = 128, 384, 1536
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    q, scale = int8_quantize_rows(w)

    def build(nodes, inits):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        return model.SerializeToString()

    f32 = build([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
    int8 = build([helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=1),
                  helper.make_node("MatMul", ["xd", "wd"], ["y"])],
                 [numpy_helper.from_array(np.array(0.03, np.float32), "xs"),
                  numpy_helper.from_array(np.array(128, np.uint8), "xz"),
                  numpy_helper.from_array(np.ascontiguousarray(q.T), "wq"), numpy_helper.from_array(scale, "ws")])
    so = session_options(threads)
    path = Path(tempfile.mkdtemp(prefix="edgeq-gemm-")) / "opt.onnx"
    so.optimized_model_filepath = str(path)
    s8 = ort.InferenceSession(int8, so, providers=["CPUExecutionProvider"])
    kernel = "+".join(nd.op_type for nd in onnx.load(str(path)).graph.node)
    shutil.rmtree(path.parent, ignore_errors=True)
    s32 = ort.InferenceSession(f32, session_options(threads), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k)).astype(np.float32)
    t = {"f32": [], "int8": []}
    for r in range(rounds * 2):
        for name, sess in (("f32", s32), ("int8", s8)) if r % 2 == 0 else (("int8", s8), ("f32", s32)):
            for _ in range(10):
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                t[name].append(time.perf_counter() - t0)
    f, i = statistics.median(t["f32"]) * 1e3, statistics.median(t["int8"]) * 1e3
    return {"f32_ms": f, "int8_ms": i, "int8_vs_f32": i / f, "int8_kernel": kernel,
            "cpu_flags": [x for x in isa_flags() if x in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw")]}


if __name__ == "__main__":
    main()
