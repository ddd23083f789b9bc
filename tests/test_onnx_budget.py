"""Budgeted plans on ONNX decoders: registry candidates bit-identical to the file, exact sizes, QERA branches.

Small synthetic models only: the reference quantizers against the initializers
onnxruntime reads, the size model against the bytes written, and a budgeted
plan with low-rank branches run in onnxruntime against the reference executor
on the plan's quantized weights plus B·A.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.formats.nbits import NBITS
from edgeq.core.formats import get_format
from edgeq.models import llama
from edgeq.models.recipes.synthetic import random_llama, tiny_config
from edgeq.core.formats import candidate_formats
from edgeq.core.plan import Plan, TensorPlan
from edgeq.targets.onnx.lower import lower_onnx

RANKS = [0, 8, 16]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _logits(sess: ort.InferenceSession, cfg: llama.LlamaConfig, ids: np.ndarray) -> np.ndarray:
    z = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    feeds = {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    for i in range(cfg.n_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = z
    return sess.run(["logits"], feeds)[0][0]


def _registry_bytes_from_file(inits: dict[str, np.ndarray], name: str, fmt: str) -> np.ndarray:
    """The registry's byte layout (rows, row bytes) rebuilt from the initializers onnxruntime reads."""
    if fmt in ("f32", "f16"):     # a linear's weight is stored (in, out), a table (rows, cols)
        return np.ascontiguousarray(inits[name] if name == "model.embed_tokens.weight" else inits[name].T).view(np.uint8)
    rows = inits[name].shape[0]
    parts = [inits[name].reshape(rows, -1), inits[name + "_scale"].astype("<f4").view(np.uint8).reshape(rows, -1)]
    if NBITS[fmt][2]:
        parts.append(inits[name + "_zero_point"])
    return np.concatenate(parts, axis=1)


def test_candidates_are_the_weight_formats_the_onnx_target_carries():
    names = [f.name for f in candidate_formats("onnx")]
    assert set(names) == {"f32", "f16", *NBITS}
    with pytest.raises(EdgeqError, match="quantizes activations"):
        candidate_formats("onnx", ["int4", "int8_dyn"])
    with pytest.raises(EdgeqError, match="not carried by backend onnx"):
        candidate_formats("onnx", ["q4_k"])


def test_onnxruntime_fuses_no_matmulnbits_so_budgets_tie_nothing(tmp_path):
    """No tie by default on ONNX rests on this: with every optimisation on, onnxruntime keeps one MatMulNBits per
    linear (no q/k/v or gate/up fusion). If a release starts fusing them, ties (llama.fused_groups) must follow."""
    graph = random_llama(tiny_config(tied_embeddings=True), seed=1)
    plan = Plan(tensors={n: TensorPlan("int4" if len(t.shape) == 2 else "f32") for n, t in graph.weights.items()})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.intra_op_num_threads = 1
    ort.InferenceSession(lower_onnx(graph, plan).SerializeToString(), so, providers=["CPUExecutionProvider"])
    nbits = [n for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * graph.config.n_layers + 1          # q k v o gate up down per layer, and the head


@pytest.mark.parametrize("tied", [True, False])
def test_every_candidates_reference_quantizer_is_the_bytes_written(tied):
    """For each ONNX candidate, with an importance matrix where the format takes one: Format.quantize gives exactly
    the bytes in the file (linears through MatMulNBits/MatMul, the table through GatherBlockQuantized/Gather)."""
    cfg = tiny_config(tied_embeddings=tied, hidden_size=256, intermediate_size=384)
    graph = random_llama(cfg, seed=9)
    rng = np.random.default_rng(3)
    imatrix = {n: rng.lognormal(0, 1.5, t.shape[-1]).astype(np.float32)
               for n, t in graph.weights.items() if len(t.shape) == 2}
    mats = [n for n, t in graph.weights.items() if len(t.shape) == 2]
    fmts = candidate_formats("onnx")
    for shift in range(2):          # every format lands on a linear and (over two plans) on the table
        tensors = {n: TensorPlan("f32") for n in graph.weights}
        for i, n in enumerate(mats):
            tensors[n] = TensorPlan(fmts[(i + shift * 5) % len(fmts)].name)
        plan = Plan(tensors=tensors)
        model = lower_onnx(graph, plan, imatrix=imatrix)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for n in mats:
            f = get_format(plan.tensors[n].format)
            w = graph.weights[n].numpy()
            want = f.quantize(w, imatrix[n] if f.takes_imatrix else None)
            assert np.array_equal(_registry_bytes_from_file(inits, n, f.name), want), (n, f.name)
            if f.takes_imatrix:      # the importance matrix really reached the writer
                assert not np.array_equal(want, f.quantize(w)), n


@pytest.mark.parametrize("tied", [True, False])
def test_onnx_layout_sizes_plans_to_the_byte(tied):
    """exact_bytes == the serialized model for random plans with branches; the additive option bytes the ILP sums
    are within a few bytes per tensor of it (node names carry running counters)."""
    from edgeq.targets.onnx.layout import onnx_layout

    cfg = tiny_config(tied_embeddings=tied)
    graph = random_llama(cfg, seed=1)
    fmts = candidate_formats("onnx")
    layout = onnx_layout(graph, fmts, [4, 8])
    rng = np.random.default_rng(0)
    for _ in range(4):
        tensors, branches, additive = {}, {}, layout.overhead
        for n, t in graph.weights.items():
            if len(t.shape) == 1:
                tensors[n] = TensorPlan("f32")
                continue
            f = fmts[rng.integers(len(fmts))]
            r = 0 if n == "model.embed_tokens.weight" else int(rng.choice([0, 4, 8]))
            tensors[n] = TensorPlan(f.name, rank=r)
            additive += layout.tensor_bytes(n, t.shape, f) + (layout.branch_bytes(n, t.shape, r) if r else 0)
            if r:
                branches[n] = (rng.standard_normal((r, t.shape[1])).astype(np.float16),
                               rng.standard_normal((t.shape[0], r)).astype(np.float16))
        plan = Plan(tensors=tensors)
        written = len(lower_onnx(graph, plan, branches=branches).SerializeToString(deterministic=True))
        assert layout.exact_bytes(plan) == written
        assert abs(additive - written) <= 4 * len(branches) + 4 * len(tensors)


# --- a budgeted plan with branches through the pipeline -------------------------------------------------------

@pytest.fixture(scope="module")
def budgeted(tiny_decoder_dir, cache, tmp_path_factory):
    """One budgeted export with --ranks 0,8,16 (the ILP buys branches here), and the decision behind it."""
    import os

    from edgeq.api import ExportOptions, export
    from edgeq.compile.pipeline import decisions

    old = os.environ.get("EDGEQ_CACHE")
    os.environ["EDGEQ_CACHE"] = str(cache)
    try:
        opts = dict(bpw=6.0, ranks=RANKS, calib_windows=2)
        out = tmp_path_factory.mktemp("b") / "bundle"
        res = export(ExportOptions(model=str(tiny_decoder_dir), backend="onnx", out=str(out), **opts))
        graph, made = decisions(ExportOptions(model=str(tiny_decoder_dir), backend="onnx", **opts))
        decision = made["onnx"]
    finally:
        if old is None:
            os.environ.pop("EDGEQ_CACHE")
        else:
            os.environ["EDGEQ_CACHE"] = old
    return out, res, graph, decision


def test_budgeted_onnx_files_meet_the_budget_exactly_as_planned(budgeted):
    out, res, graph, decision = budgeted
    m = res["manifest"]
    s = m["plan"]["search"]
    files = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    assert s["method"] == "ilp" and s["formats"] == [f.name for f in candidate_formats("onnx")]
    assert files == s["predicted_bytes"] <= s["budget_bytes"] == int(6.0 * graph.n_params / 8)
    assert files >= 0.99 * s["budget_bytes"]                      # the budget is spent, not left over
    assert [a["bytes"] for a in m["artifacts"] if a["role"] == "model"] == [files]
    assert s["branches"] > 0 and m["plan"]["tensors"] == decision.plan.to_json()["tensors"]
    used = {t["format"] for n, t in m["plan"]["tensors"].items() if len(graph.weights[n].shape) == 2}
    assert len(used) > 1
    assert res["measurements"]["reference_check"]["backend"] == "onnx"
    assert res["measurements"]["reference_check"]["kld_mean"] < 0.5


def _exact_model(path: Path) -> onnx.ModelProto:
    """The exported file with MatMulNBits computing exactly (accuracy_level 0), so that it equals the executor."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    return model


def _plan_weights(graph, plan: Plan, imatrix: dict, branches: dict) -> tuple[dict, dict]:
    """Each tensor's registry round trip in the plan's format, without and with its branch B·A."""
    arrays, plain = {}, {}
    for n, t in graph.weights.items():
        w = t.numpy()
        if len(t.shape) == 2:
            f = get_format(plan.tensors[n].format)
            w = f.roundtrip(w, imatrix.get(n) if f.takes_imatrix else None)
        plain[n] = w
        if n in branches:
            a, b = branches[n]
            w = w + b.astype(np.float32) @ a.astype(np.float32)
        arrays[n] = w
    return plain, arrays


def test_budgeted_onnx_with_branches_is_the_executor_on_the_plans_weights(budgeted):
    """The exported file, with MatMulNBits computing exactly (accuracy_level 0), equals the reference executor on
    each tensor's registry round trip plus its branch B·A; dropping the branches moves it away."""
    out, _, graph, decision = budgeted
    cfg = graph.config
    assert decision.branches
    model = _exact_model(out / "model.onnx")
    names = {i.name for i in model.graph.initializer}
    for n, (a, b) in decision.branches.items():
        assert decision.plan.tensors[n].rank == a.shape[0] == b.shape[1] > 0
        assert {n + "_lowrank_a", n + "_lowrank_b"} <= names
    plain, arrays = _plan_weights(graph, decision.plan, decision.calibration.imatrix(), decision.branches)
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, 40)
    ref = Executor(llama.graph_from_arrays(cfg, arrays)).logits(ids)
    got = _logits(_session(model), cfg, ids)
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max()
    without = Executor(llama.graph_from_arrays(cfg, plain)).logits(ids)
    assert np.abs(without - ref).max() > 100 * np.abs(got - ref).max()


def test_dynaquant_plans_onnx_to_the_exact_budget(tiny_decoder_dir, cache, tmp_path, monkeypatch):
    """--method dynaquant on ONNX: trained on the cost table's additive bytes, checked (and repaired) against the
    files' exact size; the file meets the budget to the byte as planned, spends it, mixes formats, and runs in
    onnxruntime as the executor on the plan's weights."""
    from edgeq.importers.loader import import_model
    from edgeq.passes import Context
    from edgeq.passes.calibrate import Calibrate
    from edgeq.api import ExportOptions, export
    from edgeq.core.plan import plan_from_json

    monkeypatch.setenv("EDGEQ_CACHE", str(cache))
    res = export(ExportOptions(model=str(tiny_decoder_dir), backend="onnx", out=str(tmp_path / "b"), bpw=6.0,
                               method="dynaquant", calib_windows=2))
    graph = import_model(tiny_decoder_dir)
    s = res["manifest"]["plan"]["search"]
    size = (tmp_path / "b" / "model.onnx").stat().st_size
    assert s["method"] == "dynaquant" and 1 <= s["exact_tries"] <= 4
    assert size == s["predicted_bytes"] <= s["budget_bytes"] == int(6.0 * graph.n_params / 8)
    assert size >= 0.98 * s["budget_bytes"]
    plan = plan_from_json(res["manifest"]["plan"])
    assert len({plan.tensors[n].format for n, t in graph.weights.items() if len(t.shape) == 2}) > 1
    ctx = Context(backend="onnx")           # the export's importance matrix (calibration is deterministic)
    Calibrate(n_windows=2).run(graph, None, ctx)
    plain, _ = _plan_weights(graph, plan, ctx.analysis["calibration"].imatrix(), {})
    ids = np.random.default_rng(2).integers(3, graph.config.vocab_size, 40)
    ref = Executor(llama.graph_from_arrays(graph.config, plain)).logits(ids)
    got = _logits(_session(_exact_model(tmp_path / "b" / "model.onnx")), graph.config, ids)
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max()


def _edgeq(*args, cache) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDGEQ_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_onnx_plan_file_exports_the_same_bytes(budgeted, tiny_decoder_dir, cache, tmp_path):
    """`edgeq plan --backend onnx` writes the budgeted plan; `export --plan` of it reproduces the bundle's bytes."""
    out, res, *_ = budgeted
    r = _edgeq("plan", "--model", tiny_decoder_dir, "--backend", "onnx", "--bpw", "6", "--ranks", "0,8,16", "--calib-windows",
               "2", "--quiet", "-o", tmp_path / "plan.json", cache=cache)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["backend"] == "onnx" and plan["tensors"] == res["manifest"]["plan"]["tensors"]
    r = _edgeq("export", "--model", tiny_decoder_dir, "--backend", "onnx", "--plan", tmp_path / "plan.json",
               "--calib-windows", "2", "--quiet", "-o", tmp_path / "again", cache=cache)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_impossible_onnx_budget_is_one_clear_error(tiny_decoder_dir, tmp_path):
    for cmd in (["plan", "-o", tmp_path / "p.json"], ["export", "-o", tmp_path / "out"]):
        r = _edgeq(*cmd, "--model", tiny_decoder_dir, "--backend", "onnx", "--bpw", "2", "--quiet", cache=tmp_path / "cache")
        assert r.returncode == 2, r.stderr
        assert "below the smallest feasible size" in r.stderr and "bpw" in r.stderr and "int4_b128" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "out").exists()
