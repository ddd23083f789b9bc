"""Static INT8 on onnxruntime's fused integer kernels, on a small synthetic BERT.

What a user's plain `onnxruntime.InferenceSession` (default options, 2 threads)
runs after its optimisations, and that those kernels compute the static scheme
the plan describes: per-channel int8 weights, one calibrated uint8 range per
activation; checked against the reference executor running that scheme in numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq.core.executor import Executor
from edgeq.core.formats.int8 import fake_quantize_activation, int8_dequantized_rows
from edgeq.core.plan import Plan, plan_from_json
from edgeq.evaluate.encoder import cosines
from edgeq.importers.hf_bert import encoder_tokenizer
from edgeq.importers.loader import import_model
from edgeq.targets.onnx.lower import lower_onnx, save_model

SENTENCES = ["the value of a function is the model", "it is capital, and that is it!", "a", "for the model in it"]


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    """(bundle, graph, plan) of a random 2-layer BERT exported `--quant int8` (calibrated on the default text)."""
    import json

    from edgeq.api import ExportOptions, export
    from edgeq.models.recipes.synthetic import write_bert_folder

    root = tmp_path_factory.mktemp("int8-kernels")
    src = write_bert_folder(root / "bert", seed=3)
    export(ExportOptions(model=str(src), backend="onnx", quant="int8", out=str(root / "b")))
    plan = plan_from_json(json.loads((root / "b" / "manifest.json").read_text())["plan"])
    return root / "b", import_model(src), plan


def _session(path: Path, optimized: Path | None = None):
    """A plain session as a user opens the file: default options, 2 intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _embed(sess, ids: list[int]) -> np.ndarray:
    return sess.run(["embedding"], {"input_ids": np.array([ids], np.int64),
                                    "attention_mask": np.ones((1, len(ids)), np.int64)})[0][0]


def _static_int8_reference(graph, plan: Plan) -> Executor:
    """The reference executor computing the plan's static scheme: int8 weights (and word table) dequantized per
    row, each linear's input quantized to uint8 over its calibrated range and back (QuantizeLinear's rounding)."""

    def linear(node, args):
        d = plan.tensors[node.inputs[1]]
        if d.format == "int8":
            args[0], args[1] = fake_quantize_activation(args[0], *d.act_range), int8_dequantized_rows(args[1])

    def embedding(node, args):
        if plan.tensors[node.inputs[1]].format == "int8":
            args[1] = int8_dequantized_rows(args[1])

    return Executor(graph, observers={"linear": linear, "embedding": embedding})


def test_plain_session_runs_fused_integer_kernels(tiny_int8, tmp_path):
    """Every linear is an integer kernel with its bias inside; q/k/v and attention are one QAttention; nothing is
    dequantized back to a float MatMul; GELU is one kernel; residual adds stay (SkipLayerNormalization is slower)."""
    bundle, graph, _ = tiny_int8
    layers = graph.config.n_layers
    _session(bundle / "model.onnx", tmp_path / "opt.onnx")
    ops: dict[str, int] = {}
    for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    assert ops.get("QAttention") == layers
    assert ops.get("MatMulIntegerToFloat") == 3 * layers           # attention output, FFN up, FFN down
    assert ops.get("QuantizeLinear") == 4 * layers
    assert ops.get("Gelu") == layers
    assert ops.get("Add") == 2 * layers + 1                         # residuals + the embedding sum: no bias adds
    for float_or_unfused in ("MatMul", "DequantizeLinear", "MultiHeadAttention", "DynamicQuantizeLinear",
                             "SkipLayerNormalization", "Erf", "FusedMatMul"):
        assert float_or_unfused not in ops, ops


def test_fused_kernels_compute_the_static_scheme(tiny_int8):
    """onnxruntime's integer kernels give what the reference executor computes for the same plan in numpy, far
    closer than the int8 model is to the float one (so a wrong scale, zero point, axis or mask would show)."""
    bundle, graph, plan = tiny_int8
    sess = _session(bundle / "model.onnx")
    tok = encoder_tokenizer(graph)
    sim, ref = _static_int8_reference(graph, plan), Executor(graph)
    ids = [tok.encode(s).ids for s in SENTENCES]
    got = np.stack([_embed(sess, i) for i in ids])
    want = np.stack([sim.embed(i) for i in ids])
    flt = np.stack([ref.embed(i) for i in ids])
    to_sim = 1.0 - cosines(want, got)
    to_float = 1.0 - cosines(flt, got)
    assert to_sim.max() < 1e-7, to_sim                              # measured ~5e-15 on AVX-512 VNNI
    assert to_float.min() > 1e-6, to_float                          # int8 is measurably not the float model
    assert cosines(flt, got).min() >= 0.98


def test_qattention_equals_the_unfused_lowering(tiny_int8, tmp_path):
    """The same plan lowered with three MatMulIntegerToFloat + MultiHeadAttention, and as QDQ pairs that
    onnxruntime fuses itself, gives the QAttention graph's embeddings, padded batches included."""
    bundle, graph, plan = tiny_int8
    tok = encoder_tokenizer(graph)
    ids = [tok.encode(s).ids for s in SENTENCES]
    width = max(map(len, ids))
    feed = {"input_ids": np.array([i + [0] * (width - len(i)) for i in ids], np.int64),
            "attention_mask": np.array([[1] * len(i) + [0] * (width - len(i)) for i in ids], np.int64)}
    main = _session(bundle / "model.onnx").run(["embedding"], feed)[0]
    singles = np.stack([_embed(_session(bundle / "model.onnx"), i) for i in ids])
    assert np.abs(main - singles).max() < 1e-5                       # padding is masked out of attention and mean
    for options in ({"qattention": False}, {"int8_as_qdq": True}):
        path = tmp_path / f"{next(iter(options))}.onnx"
        save_model(lower_onnx(graph, plan, **options), path)
        other = _session(path).run(["embedding"], feed)[0]
        assert np.abs(other - main).max() < 1e-5, options


def test_mixed_qkv_formats_fall_back_to_multihead_attention(tiny_int8, tmp_path):
    """q/k/v not all static over one range (here v per call): three integer kernels and MultiHeadAttention."""
    from dataclasses import replace

    _, graph, plan = tiny_int8
    v = "encoder.layer.0.attention.self.value.weight"
    mixed = replace(plan, tensors={**plan.tensors, v: replace(plan.tensors[v], format="int8_dyn", act_range=None)})
    path = tmp_path / "mixed.onnx"
    save_model(lower_onnx(graph, mixed), path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QAttention") == graph.config.n_layers - 1 and ops.count("MultiHeadAttention") == 1
    tok = encoder_tokenizer(graph)
    ids = tok.encode(SENTENCES[0]).ids
    ref = Executor(graph).embed(ids)
    assert cosines(ref[None], _embed(_session(path), ids)[None])[0] >= 0.98


def test_a_range_stretched_by_outliers_moves_to_per_call_ranges(tiny_int8):
    """choose_activation_ranges: a static range far wider than the inputs (what one outlier in calibration does)
    costs many dB and becomes int8_dyn, with the measured loss in its reason; the calibrated ranges stay static;
    a range a person set is not re-decided."""
    from dataclasses import replace

    from edgeq.passes.base import Context
    from edgeq.passes.calibrate_ranges import text_inputs
    from edgeq.passes.choose_activation_ranges import ChooseActivationRanges

    _, graph, plan = tiny_int8
    up, down = "encoder.layer.1.intermediate.dense.weight", "encoder.layer.0.output.dense.weight"
    stretched = {**plan.tensors, up: replace(plan.tensors[up], act_range=[-500.0, 500.0]),
                 down: replace(plan.tensors[down], act_range=[-500.0, 500.0])}
    inputs, _ = text_inputs(graph, 8)
    by_calibration = {n for n, d in plan.tensors.items() if d.act_range is not None and n != down}
    _, out = ChooseActivationRanges(inputs, by_calibration).run(graph, replace(plan, tensors=stretched),
                                                                Context("onnx"))
    assert out.tensors[up].format == "int8_dyn" and out.tensors[up].act_range is None
    assert "range per call" in out.tensors[up].reason and out.tensors[up].requested == "int8"
    assert out.tensors[down] == stretched[down]                              # set by a person: left as it is
    kept = [n for n in by_calibration if n != up and "attention" not in n]
    assert kept and all(out.tensors[n].format == "int8" and "kept static" in out.tensors[n].reason for n in kept)


def test_int8_dyn_qkv_run_as_one_qattention_too(tiny_int8, tmp_path):
    """All-int8_dyn q/k/v: one DynamicQuantizeLinear feeds one QAttention, the other linears run as
    onnxruntime's DynamicQuantizeMatMul, and the numbers are those of the unfused lowering."""
    from dataclasses import replace

    _, graph, plan = tiny_int8
    dyn = replace(plan, tensors={n: (replace(d, format="int8_dyn", act_range=None) if d.act_range else d)
                                 for n, d in plan.tensors.items()})
    paths = {}
    for name, options in (("fused", {}), ("unfused", {"qattention": False})):
        paths[name] = tmp_path / f"{name}.onnx"
        save_model(lower_onnx(graph, dyn, **options), paths[name])
    _session(paths["fused"], tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    layers = graph.config.n_layers
    assert ops.count("QAttention") == layers and ops.count("DynamicQuantizeMatMul") == 3 * layers
    assert "MatMul" not in ops and "MultiHeadAttention" not in ops
    ids = encoder_tokenizer(graph).encode(SENTENCES[1]).ids
    fused, unfused = (_embed(_session(paths[k]), ids) for k in ("fused", "unfused"))
    assert np.abs(fused - unfused).max() < 1e-5
    assert cosines(Executor(graph).embed(ids)[None], fused[None])[0] >= 0.98
