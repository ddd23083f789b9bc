"""The latency predictor: fitting a recorded profile, predicting plans and bundles, the ILP's latency row, and
the refusals (a budget no plan meets, a profile of another device or runtime, a damaged profile).

The profile in tests/data was measured on the 2-core development machine (`edgeq profile --quick`,
llama.cpp, 1 thread); its figures are only right there, so these tests check what holds anywhere: the fit,
the orderings a latency model must respect, that the ILP's row is exact, that the runner times every kernel.
Accuracy is measured by `edgeq profile --validate`, never in a test.

The encoder half (ONNX, BERT) does the same on a recorded encoder profile (`edgeq profile --backend onnx
--model-kind encoder --quick --clock cpu`): the fit, its orderings, the runner timing every kernel of an encoder
bundle (the fused QAttention included), `edgeq predict` on an encoder bundle, and a profile of another model kind
refused in one line.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import edgeq

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.core.plan import Plan, TensorPlan
from edgeq.models import bert, llama
from edgeq.models.recipes.synthetic import random_llama, tiny_config
from edgeq.passes.allocate import ExtraRow, solve_rows
from edgeq.passes.sensitivity import CostTable, Option
from edgeq.predictor.budget import LatencyBudget
from edgeq.predictor.design import timing_plan
from edgeq.predictor.measure import noise_verdict
from edgeq.predictor.model import Predictor, other_features
from edgeq.predictor.profile import ModelRun, load_profile
from edgeq.predictor.workload import FUSED_QKV, decoder_workload, encoder_workload

PROFILE = Path(__file__).parent / "data" / "latency_profile_gguf_quick.json"
ENCODER_PROFILE = Path(__file__).parent / "data" / "latency_profile_onnx_encoder_quick.json"


@pytest.fixture(scope="module")
def fitted() -> Predictor:
    return Predictor(load_profile(PROFILE))


def smollm_like(formats: str) -> object:
    cfg = llama.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, n_layers=30, n_heads=9,
                            n_kv_heads=3, head_dim=64, tied_embeddings=True, context_length=2048)
    shapes = llama.expected_shapes(cfg)
    return decoder_workload(cfg, {n: formats for n, s in shapes.items() if len(s) == 2}, 2048)


def test_fit_on_the_recorded_profile(fitted):
    profile = fitted.profile
    report = fitted.fit_report()
    # every GGUF candidate format was timed, at several shapes and token counts
    assert set(report["formats"]) >= {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q2_k", "q6_k"}
    assert all(len(fitted.kernels.tokens[f]) == 1 + len(profile.settings["prefill"]) for f in report["formats"])
    assert report["kv_padding"] == 256           # llama.cpp pads the KV length its attention reads
    # in sample: the profile's own micro-models against their measured medians (a quick profile is one noisy
    # node-by-node round, so single points may be off; the typical one may not)
    errors = [fitted.call_ms(run.workload, kind, int(key)) / np.median(vals) - 1 for run in profile.models
              for kind, table in (("decode", run.decode_ms), ("prefill", run.prefill_ms)) for key, vals in table.items()]
    assert len(errors) == 16 and np.median(np.abs(errors)) < 0.1 and np.max(np.abs(errors)) < 0.4, errors


def test_predictions_respect_what_latency_must_do(fitted):
    q4, q8, f32 = smollm_like("q4_0"), smollm_like("q8_0"), smollm_like("f32")
    p = {k: fitted.predict(w) for k, w in (("q4", q4), ("q8", q8), ("f32", f32))}
    # decode streams the weights: 4x the bytes is several times slower, q8_0 in between
    assert p["q4"].decode_ms_per_token < p["q8"].decode_ms_per_token < p["f32"].decode_ms_per_token
    assert p["f32"].decode_ms_per_token > 2 * p["q4"].decode_ms_per_token
    # longer prompts cost more, and roughly in proportion once they are long
    pre = [fitted.predict(q4, prompt_tokens=n).prefill_ms for n in (16, 64, 128, 256, 512)]
    assert pre == sorted(pre) and 2.5 < pre[4] / pre[2] < 5.0
    # a decode step reads a longer cache at a longer context
    dec = [fitted.predict(q4, context_tokens=c).decode_ms_per_token for c in (0, 300, 1500)]
    assert dec == sorted(dec)
    # peak memory: the files and the KV cache at least
    assert p["f32"].peak_memory_bytes > f32.weight_bytes + f32.kv_bytes() > p["q4"].peak_memory_bytes / 4


def test_prediction_refuses_what_the_profile_cannot_answer(fitted):
    w = smollm_like("q4_0")
    with pytest.raises(EdgeqError, match="do not fit the bundle's context"):
        fitted.predict(w, prompt_tokens=5000)
    bad = smollm_like("int4")
    with pytest.raises(EdgeqError, match="no timings for format int4"):
        fitted.predict(bad)


def test_noise_verdict_is_the_median_run_to_run_spread():
    w = smollm_like("q4_0")
    quiet = ModelRun("a", w, {"128": [100.0, 101.0, 99.0]}, {"64": [10.0, 10.1, 9.9]}, [1, 1, 1], 200)
    noisy = ModelRun("b", w, {"128": [100.0, 130.0, 80.0]}, {"64": [10.0, 13.0, 8.0]}, [1, 1, 1], 200)
    assert not noise_verdict([quiet])["noisy"]
    v = noise_verdict([quiet, noisy, noisy])
    assert v["noisy"] and v["spread"] > 0.05 and v["worst"][0]["model"] == "b"


# --- the ILP's latency row --------------------------------------------------------------------------------------

def tiny_graph():
    cfg = tiny_config(n_layers=1, vocab_size=300, tied_embeddings=True, context_length=256)
    return random_llama(cfg, seed=3)


def tiny_table(graph, formats=("q8_0", "q4_0", "f16")) -> CostTable:
    rng = np.random.default_rng(0)
    options = {}
    for name, t in graph.weights.items():
        if len(t.shape) != 2:
            continue
        options[name] = [Option(f, get_format(f).nbytes(t.shape), float(rng.uniform(0.5, 2.0)) *
                                (8.0 / get_format(f).bits_per_weight) ** 2) for f in formats]
    return CostTable(options, 1000, graph.n_params, {"formats": list(formats)})


def test_latency_row_finds_the_brute_force_optimum(fitted):
    graph = tiny_graph()
    table = tiny_table(graph)
    lb = LatencyBudget(fitted, graph, 256, "f16", "decode", 64, 0.0)
    names = list(table.options)
    combos = []
    for pick in itertools.product(*(table.options[n] for n in names)):
        choice = {n: (o.format, o.rank) for n, o in zip(names, pick)}
        combos.append((sum(o.cost for o in pick), lb.exact(choice), sum(o.bytes for o in pick)))
    lat = sorted(c[1] for c in combos)
    budget = 10**9
    for limit in np.quantile(lat, [0.05, 0.3, 0.6, 0.95]):
        fast = {n: (min(table.options[n], key=lambda o: lb.coef(n, o.format)).format, 0) for n in names}
        row = ExtraRow("predicted_latency_ms", lambda n, o: lb.coef(n, o.format, o.rank), limit - lb.fixed_ms(fast),
                       exact=lambda ch: lb.exact({n: (o.format, o.rank) for n, o in ch.items()}), limit=float(limit))
        got = solve_rows(table, budget, extra_rows=[row])
        best = min(c[0] for c in combos if c[1] <= limit + 1e-9)
        assert got.info["predicted_latency_ms"] <= limit + 1e-9
        assert got.total_cost == pytest.approx(best, rel=1e-9), (limit, got.total_cost, best)


def test_infeasible_latency_budget_is_one_clear_error(tiny_decoder_dir, tmp_path):
    r = edgeq("plan", "--model", tiny_decoder_dir, "--backend", "gguf", "--latency-ms", "0.001", "--latency-profile",
              PROFILE, "--cost", "output", "-o", tmp_path / "p.json", "--quiet", check=False)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and "latency budget 0.001 ms is below the fastest feasible plan's predicted decode " \
                                     "step at 64 tokens of context" in line, line
    assert not (tmp_path / "p.json").exists()


def test_latency_budget_plans_and_exports_within_the_limit(tiny_decoder_dir, tmp_path, fitted):
    plan = tmp_path / "p.json"
    # the fastest and the slowest uniform plans bracket the limit
    edgeq("plan", "--model", tiny_decoder_dir, "--backend", "gguf", "--quant", "q4_0", "-o", tmp_path / "q4.json",
          "--quiet")
    edgeq("plan", "--model", tiny_decoder_dir, "--backend", "gguf", "--quant", "f32", "-o", tmp_path / "f32.json",
          "--quiet")
    fast = json.loads(edgeq("predict", tmp_path / "q4.json", "--model", tiny_decoder_dir, "--latency-profile", PROFILE,
                            "--json").stdout)
    slow = json.loads(edgeq("predict", tmp_path / "f32.json", "--model", tiny_decoder_dir, "--latency-profile",
                            PROFILE, "--json").stdout)
    assert set(fast) >= {"decode_ms_per_token", "prefill_ms", "prompt_tokens", "context_tokens", "peak_memory_bytes",
                         "backend", "threads"}
    assert fast["prompt_tokens"] == 128 and fast["context_tokens"] == 64 and fast["backend"] == "gguf"
    limit = (fast["decode_ms_per_token"] + slow["decode_ms_per_token"]) / 2
    edgeq("plan", "--model", tiny_decoder_dir, "--backend", "gguf", "--latency-ms", f"{limit:.4f}", "--latency-profile",
          PROFILE, "--cost", "output", "-o", plan, "--quiet")
    s = json.loads(plan.read_text())["search"]
    assert s["predicted_latency_ms"] <= limit and s["predicted_latency_ms_limit"] == pytest.approx(limit, abs=1e-4)
    got = json.loads(edgeq("predict", plan, "--model", tiny_decoder_dir, "--latency-profile", PROFILE,
                           "--json").stdout)
    assert got["decode_ms_per_token"] == pytest.approx(s["predicted_latency_ms"], abs=2e-4)
    # the export's manifest carries the same prediction
    out = tmp_path / "b"
    edgeq("export", "--model", tiny_decoder_dir, "--plan", plan, "--latency-profile", PROFILE, "-o", out, "--quiet")
    pred = json.loads((out / "manifest.json").read_text())["predicted"]
    assert pred["latency_ms_per_token"] == pytest.approx(got["decode_ms_per_token"], rel=1e-3)
    assert pred["peak_memory_bytes"] > 0 and pred["latency_profile"]["sha256"] == fitted.profile.digest()
    bundle = json.loads(edgeq("predict", out, "--latency-profile", PROFILE, "--json").stdout)
    assert bundle["decode_ms_per_token"] == pytest.approx(pred["latency_ms_per_token"], rel=1e-3)


def test_profile_of_another_device_or_runtime_is_refused(tiny_decoder_dir, tmp_path):
    out = tmp_path / "b"
    edgeq("export", "--model", tiny_decoder_dir, "--quant", "q8_0", "-o", out, "--quiet")
    d = json.loads(PROFILE.read_text())
    other = dict(d, device={**d["device"], "cpu": "Some Other CPU", "cores": 8})
    p = tmp_path / "other.json"
    p.write_text(json.dumps(other))
    r = edgeq("predict", out, "--latency-profile", p, "--device", "local", check=False)
    assert r.returncode == 2 and "measured on 'Some Other CPU' (8 cores), not on local" in r.stderr, r.stderr
    old = dict(d, device={**d["device"], "runtime_versions": {**d["device"]["runtime_versions"],
                                                               "llama-cpp-python": "0.2.0"}})
    p.write_text(json.dumps(old))
    r = edgeq("predict", out, "--latency-profile", p, check=False)
    assert r.returncode == 2 and "timed llama-cpp-python 0.2.0, but bundle" in r.stderr, r.stderr
    p.write_text(json.dumps(dict(d, version=99)))
    r = edgeq("predict", out, "--latency-profile", p, check=False)
    assert r.returncode == 2 and "latency profile version 99" in r.stderr
    p.write_text("{not json")
    r = edgeq("predict", out, "--latency-profile", p, check=False)
    assert r.returncode == 2 and "not a latency profile" in r.stderr
    r = edgeq("predict", out, "--latency-profile", PROFILE, "--threads", "2", check=False)
    assert r.returncode == 2 and "measured with 1 thread" in r.stderr


def test_the_runner_times_every_kernel_of_a_bundle(tiny_decoder_dir, tmp_path):
    """The profile's measurement path on the `local` device: whole calls, and node by node every weight's
    matmul inside llama.cpp."""
    from edgeq.devices import open_device

    out = tmp_path / "b"
    edgeq("export", "--model", tiny_decoder_dir, "--quant", "q4_0", "--no-calibration", "-o", out, "--quiet")
    dev = open_device("local")
    try:
        remote = dev.push(out)
        args = {"prefill": [16], "decode": [40], "steps": 3, "prefill_steps": 1}
        whole = dev.run(remote, "latency", args, threads=1, n_ctx=256)
        ops = dev.run(remote, "latency", {**args, "ops": True}, threads=1, n_ctx=256)
    finally:
        dev.close()
    assert whole.ok and ops.ok, (whole.error, ops.error)
    assert len(whole.result["decode"]["40"]["wall_s"]) == 3 and whole.peak_rss_bytes > 0
    dec = ops.result["ops"]["decode"]["40"]
    weights = json.loads((out / "manifest.json").read_text())["plan"]["tensors"]
    n_mat = sum(1 for n in weights if n.startswith("model.layers.") and n.endswith("proj.weight")) + 1
    assert len(dec["weights_us"]) == n_mat and all(v > 0 for v in dec["weights_us"].values())
    assert "token_embd.weight" in dec["weights_us"]          # the tied head
    assert dec["kv_len"] == 256 and "FLASH_ATTN_EXT" in dec["ops_us"]     # flash attention on the f16 cache
    pre = ops.result["ops"]["prefill"]["16"]
    assert pre["total_us"] > dec["total_us"]
    # the rows each product computed: llama.cpp runs the last layer's MLP and the head for the asked-for token only
    last = max(int(n.split(".")[1]) for n in pre["weights_rows"] if n.startswith("blk."))
    one_row = {n for n, r in pre["weights_rows"].items() if r == 1}
    assert one_row == {f"blk.{last}.ffn_{p}.weight" for p in ("gate", "up", "down")} | {"token_embd.weight"}
    assert all(r == 16 for n, r in pre["weights_rows"].items() if n not in one_row)
    assert set(dec["weights_rows"].values()) == {1}


def test_prefill_prices_products_the_runtime_computes_for_one_row(fitted):
    """A profile that saw the last MLP and the head computed for one row prices them so in any prefill."""
    import copy

    from edgeq.predictor.model import Predictor
    from edgeq.predictor.workload import layer_role

    prof = copy.deepcopy(fitted.profile)
    full = Predictor(prof)
    run = prof.models[0]
    w = run.workload
    rt = {canon: rt for rt, canon in w.aliases.items()}
    only = [m.weight for m in w.matmuls if m.weight.startswith(f"model.layers.{w.n_layers - 1}.mlp.")]
    key = next(iter(run.ops["prefill"]))
    run.ops["prefill"][key]["weights_rows"] = {rt[n]: 1 for n in only}
    fixed = Predictor(prof)
    assert fixed.output_rows_only == {layer_role(n, w.n_layers) for n in only}
    assert layer_role(only[0], w.n_layers).startswith("model.layers.last.")
    n, kv = fixed._call(w, "prefill", 128)
    saved = sum(fixed.kernel_us(m.format, m.rows, m.cols, 128) - fixed.kernel_us(m.format, m.rows, m.cols, 1)
                for m in w.matmuls if m.weight in only)
    assert saved > 0
    assert fixed.graph_ms(w, n, kv, "prefill") < full.graph_ms(w, n, kv, "prefill")


def test_op_kinds_are_priced_per_layer_or_per_call_as_the_profile_counted_them(fitted):
    """An op kind whose nodes the profile counted once per layer is priced per layer only (a 30-layer model's
    softmax costs twice a 15-layer one's), one counted once per call (the embedding's GET_ROWS) not per layer:
    a fit over every feature traded per-layer work for its once-per-call correlate, and deep models were priced low."""
    from edgeq.predictor.model import op_scaling

    assert op_scaling([(12, 24), (14, 28), (12, 24)]) == "layer"
    assert op_scaling([(12, 25), (14, 29)]) == "layer"            # 2 per layer and a final norm
    assert op_scaling([(12, 3), (14, 3)]) == "once"
    assert op_scaling([(12, 3), (12, 5), (14, 3)]) == "any"       # the count depends on more than the depth
    assert op_scaling([(12, 24), (12, 24)]) == "any"              # one depth timed
    other = fitted.other["prefill"]
    assert other.scaling["SOFT_MAX"] == other.scaling["RMS_NORM"] == "layer" and other.scaling["GET_ROWS"] == "once"
    cfg = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, n_heads=9, n_kv_heads=3, head_dim=64,
               tied_embeddings=True, context_length=2048)
    per_kind = []
    for layers in (15, 30):
        c = llama.LlamaConfig(n_layers=layers, **cfg)
        w = decoder_workload(c, {n: "q4_0" for n, s in llama.expected_shapes(c).items() if len(s) == 2}, 2048)
        f = other_features(w, 128, 128)
        per_kind.append({k: icpt + coef @ f for k, (coef, icpt) in other.fits.items()})
    assert per_kind[0]["SOFT_MAX"] > 0
    assert per_kind[1]["SOFT_MAX"] == pytest.approx(2 * per_kind[0]["SOFT_MAX"], rel=1e-9)
    assert per_kind[1]["GET_ROWS"] == pytest.approx(per_kind[0]["GET_ROWS"], rel=1e-9)


def test_kernel_fit_prices_an_inner_width_that_is_not_a_multiple_of_128():
    """onnxruntime's MatMulNBits computes the last cols mod 128 inner columns ~3x slower per multiply-add: a table
    that timed such widths prices an unseen one (SmolLM2's 576) by its tail; one that timed only multiples of 128
    (every profile before) keeps its old fit."""
    from edgeq.predictor.model import KernelTable

    def us(r, c):
        return 5.0 + 0.002 * r * c + 0.006 * r * (c % 128)

    tails = [(r, c) for r in (256, 1024, 1536) for c in (512, 640, 704, 1888, 2080)]
    table = KernelTable({("int4", 128): [(r, c, us(r, c)) for r, c in tails]})
    assert table.cost_us("int4", 1536, 576, 128) == pytest.approx(us(1536, 576), rel=1e-3)
    assert table.cost_us("int4", 1536, 576, 128) > 1.15 * table.cost_us("int4", 1536, 512, 128) * 576 / 512
    plain = KernelTable({("int4", 128): [(r, c, us(r, c)) for r, c in tails if c % 128 == 0]})
    assert plain.fits[("int4", 128)][0][3] == 0.0


def test_cpu_node_times_keep_short_nodes_and_add_up_to_the_calls_cpu_time():
    """Node-by-node CPU times (runtime/onnx_ops.py): a short node is its least wall time over the calls (a wait of
    the OS missed it once), long nodes share the rest of the nodes' CPU time, never scaled up; without a length
    (encoders) every node is scaled."""
    from edgeq.runtime.onnx_ops import _summary

    calls = [[("norm", "SimplifiedLayerNormalization", 100.0), ("w", "MatMulNBits", 9000.0)],
             [("norm", "SimplifiedLayerNormalization", 4100.0), ("w", "MatMulNBits", 6000.0)]]
    s = _summary(calls, {"w"}, np.min, total=5100.0, long_us=2000.0)
    assert s["ops_us"]["SimplifiedLayerNormalization"] == [1, 100.0] and s["weights_us"]["w"] == 5000.0
    assert _summary(calls, {"w"}, np.min, total=9000.0, long_us=2000.0)["weights_us"]["w"] == 6000.0
    s = _summary(calls, {"w"}, np.min, total=3050.0)
    assert s["ops_us"]["SimplifiedLayerNormalization"] == [1, 50.0] and s["weights_us"]["w"] == 3000.0


def test_the_onnx_runner_times_every_kernel_of_a_decoder_by_cpu_time(tiny_decoder_dir, tmp_path):
    """The ONNX decoder profile's measurement path on the `local` device, CPU clock: every weight's kernel timed
    in prefill and decode, the nodes' CPU time no more than the call's."""
    from edgeq.devices import open_device
    from edgeq.predictor.workload import bundle_workload
    from edgeq.targets.registry import get_target

    out = tmp_path / "b"
    edgeq("export", "--model", tiny_decoder_dir, "--backend", "onnx", "--quant", "int4", "--no-calibration", "-o",
          out, "--quiet")
    w, _, _ = bundle_workload(out, "onnx")
    names = get_target("onnx").kernel_names(out, {m.weight: llama.gguf_name(m.weight) for m in w.matmuls})
    dev = open_device("local")
    try:
        remote = dev.push(out)
        ops = dev.run(remote, "latency", {"prefill": [32], "decode": [16], "steps": 4, "prefill_steps": 3,
                                          "clock": "cpu", "ops": True, "kernels": sorted(names)},
                      backend="onnx", threads=1, n_ctx=128)
    finally:
        dev.close()
    assert ops.ok, ops.error
    for kind, key in (("prefill", "32"), ("decode", "16")):
        call = ops.result["ops"][kind][key]
        assert sorted(call["weights_us"]) == sorted(names) and all(v > 0 for v in call["weights_us"].values())
        assert "Softmax" in call["ops_us"] and 0 < call["total_us"] <= 1.5 * call["call_us"]


# --- encoders (ONNX) ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted_encoder() -> Predictor:
    return Predictor(load_profile(ENCODER_PROFILE))


def minilm_like(fmt: str, n_layers: int = 6, hidden: int = 384, ffn: int = 1536):
    cfg = bert.BertConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=ffn, n_layers=n_layers,
                          n_heads=hidden // 32, context_length=512)
    return encoder_workload(cfg, {n: timing_plan(fmt, "") for n, s in bert.expected_shapes(cfg).items()
                                  if len(s) == 2}, "onnx")


def test_fit_on_the_recorded_encoder_profile(fitted_encoder):
    profile = fitted_encoder.profile
    assert profile.kind == "encoder" and profile.backend == "onnx"
    formats = set(fitted_encoder.fit_report()["formats"])
    # float, static and dynamic int8, weight-only blocks, and the fused q/k/v + attention kernels were all timed
    assert {"f32", "int8", "int8_dyn", "int8_b32", FUSED_QKV + "int8", FUSED_QKV + "int8_dyn"} <= formats
    assert any(f.startswith("int4") for f in formats)
    # in sample: the micro-models' calls against their measured medians (a quick profile: two micro-models, one
    # node-by-node round at load 5, so the whole-call fit has 8 points; the full profile's validation is the check)
    errors = [fitted_encoder.call_ms(run.workload, "prefill", int(key)) / np.median(vals) - 1
              for run in profile.models for key, vals in run.prefill_ms.items()]
    assert len(errors) == 4 * len(profile.models) and np.median(np.abs(errors)) < 0.15, errors
    assert np.max(np.abs(errors)) < 0.4, errors


def test_encoder_micro_models_time_each_kernel_among_others_and_among_its_own():
    """The full profile's micro-encoders: two per width cycle every format through every role (and fuse q, k, v
    in an int8 format), a third per width is three quarters one weight-only format, as a preset's plan is
    (onnxruntime's 8-bit MatMulNBits costs less after a node like it); no width is MiniLM's."""
    from edgeq.predictor.design import ENCODER_SHAPES, encoder_formats, encoder_micro_models

    models = encoder_micro_models(encoder_formats("onnx"), variants=2, dominated=True)
    assert len(models) == 3 * len(ENCODER_SHAPES) and all(m.config.hidden_size != 384 for m in models)
    linear = [[f for n, f in m.formats.items() if n.startswith("encoder.layer.") and n.endswith("dense.weight")
               or ".attention.self." in n and n.endswith(".weight")] for m in models]
    def cycling(m) -> bool:
        return m.name.rsplit("-", 1)[1] in ("0", "1")

    cycled = {f for m, fs in zip(models, linear) if cycling(m) for f in fs}
    assert cycled == {f.name for f in encoder_formats("onnx")}
    mains = [m.name.rsplit("-", 1)[1] for m in models if not cycling(m)]
    assert mains.count("int8_b32") == 2 and all(f.startswith(("int4", "int8_b")) for f in mains)
    for m, fs in zip(models, linear):
        if not cycling(m):
            assert fs.count(m.name.rsplit("-", 1)[1]) >= 0.7 * len(fs)
    assert [m.name for m in encoder_micro_models(encoder_formats("onnx"), 1, quick=True)] == \
        [f"enc-d{d}-f{f}-h{h}-l{n}-0" for d, f, h, n, _ in ENCODER_SHAPES[:2]]


def test_an_encoder_profile_times_the_validated_models_own_widths():
    """`model_shapes` (the widths of the model whose plans a profile is for, MiniLM by default) adds micro-encoders
    at exactly those widths: two cycling every format, and one dominated by an 8-bit and one by a 4-bit weight-only
    format; the other micro-encoders are unchanged (their names and seeds: cached bundles stay valid)."""
    from edgeq.predictor.design import ENCODER_SHAPES, encoder_formats, encoder_micro_models

    formats = encoder_formats("onnx")
    base = encoder_micro_models(formats, variants=2, dominated=True)
    models = encoder_micro_models(formats, variants=2, dominated=True, model_shapes=((384, 1536, 12),) * 2)
    assert [(m.name, m.seed) for m in models[:len(base)]] == [(m.name, m.seed) for m in base]
    own = models[len(base):]
    assert [m.name.rsplit("-", 1)[1] for m in own] == ["0", "1", "int8_b32", "int4"]
    assert all((m.config.hidden_size, m.config.intermediate_size, m.config.n_heads) == (384, 1536, 12) for m in own)
    assert len(ENCODER_SHAPES) * 3 == len(base)


def test_encoder_predictions_respect_what_latency_must_do(fitted_encoder):
    w = minilm_like("f32")
    # longer sequences cost more; four times the tokens at least twice the time (attention grows faster)
    seq = [fitted_encoder.predict(w, prompt_tokens=n).prefill_ms for n in (16, 32, 64, 128, 256, 512)]
    assert seq == sorted(seq) and seq[4] / seq[2] > 2.0, seq
    # deeper and wider models cost more, format for format
    for fmt in ("f32", "int8", "int8_dyn"):
        base = fitted_encoder.predict(minilm_like(fmt)).prefill_ms
        assert fitted_encoder.predict(minilm_like(fmt, n_layers=12)).prefill_ms > 1.5 * base
        assert fitted_encoder.predict(minilm_like(fmt, hidden=512, ffn=2048)).prefill_ms > base
    # q, k and v in one int8 format run as one fused kernel: the workload says so, and prices it
    fused = minilm_like("int8_dyn")
    assert sum(m.format == FUSED_QKV + "int8_dyn" for m in fused.matmuls) == 6 and len(fused.matmuls) == 24
    p = fitted_encoder.predict(fused)
    assert p.decode_ms_per_token is None and p.to_json()["latency_ms"] == round(p.prefill_ms, 3)
    # peak memory grows with the files
    f32, int4 = (fitted_encoder.predict(minilm_like(f)).peak_memory_bytes for f in ("f32", "int4"))
    assert f32 > int4


def test_a_profile_of_another_model_kind_or_backend_is_refused(fitted_encoder):
    from edgeq.predictor.predict import open_profile

    decoder_profile = Predictor(load_profile(PROFILE))
    with pytest.raises(EdgeqError, match="times decoders, not encoders"):
        decoder_profile.predict(minilm_like("f32"))
    # the backend is checked first, then the model kind
    with pytest.raises(EdgeqError, match="for the onnx backend, not gguf"):
        open_profile(ENCODER_PROFILE, "gguf", 1)
    with pytest.raises(EdgeqError, match="times encoders, not decoders: profile with `edgeq profile --backend onnx"):
        open_profile(ENCODER_PROFILE, "onnx", 1, "decoder")
    r = edgeq("profile", "--backend", "gguf", "--model-kind", "encoder", check=False)
    assert r.returncode == 2 and "encoders cover the onnx backend" in r.stderr and len(r.stderr.splitlines()) == 1
    r = edgeq("profile", "--latency-profile", ENCODER_PROFILE, "--backend", "onnx", "--model-kind", "decoder",
              check=False)
    assert r.returncode == 2 and "times encoders, not decoders" in r.stderr


@pytest.fixture(scope="module")
def tiny_encoder_bundle(tmp_path_factory) -> Path:
    """A small BERT exported with a plan that mixes formats: layer 0 fuses q, k, v (int8_dyn) into QAttention,
    layer 1 has float, static int8, weight-only int4 and int8_b32 linears."""
    from edgeq.api import ExportOptions, export
    from edgeq.models.recipes.synthetic import tiny_bert_config, write_bert_folder

    root = tmp_path_factory.mktemp("enc")
    cfg = tiny_bert_config(n_layers=2, max_positions=128, context_length=128)
    src = write_bert_folder(root / "src", cfg)
    layer1 = {"attention.self.query": "f32", "attention.self.key": "int8", "attention.self.value": "int4",
              "attention.output.dense": "int8_dyn", "intermediate.dense": "int8_b32", "output.dense": "f16"}
    tensors = {}
    for name, shape in bert.expected_shapes(cfg).items():
        fmt = "f32"
        if name.startswith("encoder.layer.0.attention.self."):
            fmt = "int8_dyn" if len(shape) == 2 else "f32"
        elif name.startswith("encoder.layer.1.") and len(shape) == 2:
            fmt = layer1[name.removeprefix("encoder.layer.1.").removesuffix(".weight")]
        tensors[name] = timing_plan(fmt, "test") if len(shape) == 2 else TensorPlan(fmt)
    Plan(tensors=tensors, preset=None).save(root / "plan.json")
    export(ExportOptions(model=str(src), backend="onnx", plan=str(root / "plan.json"), out=str(root / "b"),
                         calibration=False, check=False))
    return root / "b"


def test_the_runner_times_every_kernel_of_an_encoder_bundle(tiny_encoder_bundle):
    """The profile's measurement path on the `local` device: whole calls, and node by node every linear's kernel
    inside onnxruntime, the fused QAttention under its query's name."""
    from edgeq.devices import open_device
    from edgeq.predictor.workload import bundle_workload
    from edgeq.targets.registry import get_target

    w, _, _ = bundle_workload(tiny_encoder_bundle, "onnx")
    plan = json.loads((tiny_encoder_bundle / "manifest.json").read_text())["plan"]["tensors"]
    names = get_target("onnx").kernel_names(tiny_encoder_bundle, {n: n for n in plan})
    assert sorted(set(names.values())) == sorted(m.weight for m in w.matmuls) and len(w.matmuls) == 4 + 6
    assert [m.format for m in w.matmuls][:1] == [FUSED_QKV + "int8_dyn"]
    dev = open_device("local")
    try:
        remote = dev.push(tiny_encoder_bundle)
        args = {"prefill": [16, 48], "prefill_steps": 2}
        whole = dev.run(remote, "latency", args, threads=1)
        ops = dev.run(remote, "latency", {**args, "ops": True, "kernels": sorted(names)}, threads=1)
    finally:
        dev.close()
    assert whole.ok and ops.ok, (whole.error, ops.error)
    assert len(whole.result["prefill"]["48"]["wall_s"]) == 2 and whole.result["decode"] == {}
    call = ops.result["ops"]["prefill"]["48"]
    assert sorted(call["weights_us"]) == sorted(names) and all(v > 0 for v in call["weights_us"].values())
    assert "MultiHeadAttention" in call["ops_us"] and call["call_us"] > 0


def test_predict_prices_an_encoder_bundle(tiny_encoder_bundle):
    r = edgeq("predict", tiny_encoder_bundle, "--latency-profile", ENCODER_PROFILE, "--prompt-tokens", "64", "--json")
    out = json.loads(r.stdout)
    assert out["kind"] == "encoder" and out["prompt_tokens"] == 64 and out["decode_ms_per_token"] is None
    assert out["latency_ms"] > 0 and out["peak_memory_bytes"] > 0 and out["backend"] == "onnx"
    r = edgeq("predict", tiny_encoder_bundle, "--latency-profile", ENCODER_PROFILE, "--prompt-tokens", "1000",
              check=False)
    assert r.returncode == 2 and "do not fit the encoder's 128 positions" in r.stderr


def test_an_encoder_profile_without_the_kernels_is_refused(tiny_encoder_bundle, tmp_path):
    """A profile whose node-by-node timings lack a format the bundle uses (here int8_b32), or hold no kernel at
    all, is refused in one line naming what is missing, not priced from a fit that never saw it."""
    doc = json.loads(ENCODER_PROFILE.read_text())
    for m in doc["models"]:
        b32 = {w for w, _, _, fmt in m["workload"]["matmuls"] if fmt == "int8_b32"}
        for call in m["ops"]["prefill"].values():
            call["weights_us"] = {k: v for k, v in call["weights_us"].items()
                                  if m["workload"]["aliases"].get(k, k) not in b32}
    (tmp_path / "no_b32.json").write_text(json.dumps(doc))
    r = edgeq("predict", tiny_encoder_bundle, "--latency-profile", tmp_path / "no_b32.json", check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "no_b32.json: the latency profile's micro-models run int8_b32 but it holds no per-kernel timings" \
        in r.stderr
    for m in doc["models"]:
        for call in m["ops"]["prefill"].values():
            call["weights_us"] = {}
    (tmp_path / "no_kernels.json").write_text(json.dumps(doc))
    r = edgeq("predict", tiny_encoder_bundle, "--latency-profile", tmp_path / "no_kernels.json", check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "no_kernels.json" in r.stderr and "has no per-kernel timings" in r.stderr


# --- peak memory: the terms of a llama.cpp session ---------------------------------------------------------------

def test_memory_terms_of_a_llama_cpp_session():
    """Each term from the plan and the runtime's facts: the file once, the KV cache of the context padded to 256,
    one graph's activations for the largest batch (at most n_ubatch = 512 tokens), the last position's logits,
    the tokenizer's entries; a profile fits the base alone."""
    from edgeq.predictor.memory import MemoryModel, resident_terms
    from edgeq.targets.registry import get_target

    facts = get_target("gguf").resident
    w = smollm_like("q4_0")
    w.n_ctx, w.file_bytes, w.tokenizer_entries = 300, 90_000_000, 98_052
    t = resident_terms(w, facts, 128)
    assert t["file"] == 90_000_000
    assert t["kv_cache"] == 2 * 30 * 3 * 64 * 512 * 2                  # 300 tokens: 512 cells of f16
    per_token = 4 * (4 * 576 + 3 * 1536) + 34 / 32 * 1536
    assert t["activations"] == pytest.approx(128 * per_token)           # a prompt of 128: batches of 128
    assert resident_terms(w, facts, 5000)["activations"] == pytest.approx(300 * per_token)   # the context bounds it
    w.n_ctx = 4096
    assert resident_terms(w, facts, 5000)["activations"] == pytest.approx(512 * per_token)   # so does n_ubatch
    assert t["logits"] == 2 * 4 * 49152 and t["tokenizer"] == pytest.approx(265 * 98_052)
    # the base is what measured peaks leave over the terms; the prediction adds it back
    runs = [(w, 1007, 50e6 + sum(resident_terms(w, facts, 1007).values()))
            for w in (smollm_like(f) for f in ("q4_0", "q8_0", "f16"))]
    m = MemoryModel.fit(get_target("gguf"), frozenset(), runs)
    assert m.base == pytest.approx(50e6) and m.report["micro_model_mape"] == pytest.approx(0.0, abs=1e-9)
    assert m.peak_bytes(runs[0][0], 1007) == pytest.approx(runs[0][2], rel=1e-9)
    # on an AVX2 CPU llama.cpp repacks a q4_0 head: the tied embedding's lookups read its rows from the file again
    avx2 = MemoryModel.fit(get_target("gguf"), frozenset({"avx2", "fma"}), runs)
    assert avx2.terms(w, 128)["embedding_lookups"] == get_format("q4_0").nbytes((49152, 576))
    assert avx2.terms(smollm_like("q8_0"), 128)["embedding_lookups"] == 0 == m.terms(w, 128)["embedding_lookups"]
    # a runtime whose terms are not measured (ONNX) keeps the older per-feature fit
    assert MemoryModel.fit(get_target("onnx"), frozenset(), runs).coef is not None


def test_memory_terms_against_the_real_runtime(tmp_path):
    """What the runner's peak does when only the context or only the prompt changes is what the KV-cache and
    activation terms say (fresh runner processes on the `local` device)."""
    from edgeq.devices import open_device
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec
    from edgeq.predictor.memory import resident_terms
    from edgeq.predictor.workload import bundle_workload
    from edgeq.targets.registry import get_target

    cfg = tiny_config(vocab_size=400, n_layers=4, n_kv_heads=4, tied_embeddings=True, context_length=8192)
    src = graph_to_hf_folder(random_llama(cfg, seed=3, scale=0.08), tmp_path / "m", byte_level_spec(400))
    out = tmp_path / "b"
    edgeq("export", "--model", src, "--quant", "q4_0", "--no-calibration", "-o", out, "--quiet")
    dev = open_device("local")
    try:
        remote = dev.push(out)
        peak = {}
        for n_ctx, prompt in ((256, 32), (8192, 32), (8192, 512)):
            r = dev.run(remote, "latency", {"prefill": [prompt], "decode": [], "steps": 1, "prefill_steps": 1},
                        threads=1, n_ctx=n_ctx)
            assert r.ok, r.error
            peak[n_ctx, prompt] = r.peak_rss_bytes
    finally:
        dev.close()
    w = bundle_workload(out)[0]
    facts = get_target("gguf").resident

    def term(name: str, n_ctx: int, prompt: int) -> float:
        w.n_ctx = n_ctx
        return resident_terms(w, facts, prompt)[name]

    kv = term("kv_cache", 8192, 32) - term("kv_cache", 256, 32)                       # 31 MiB
    act = term("activations", 8192, 512) - term("activations", 8192, 32)            # 5 MiB
    assert abs(peak[8192, 32] - peak[256, 32] - kv) < 0.05 * kv + 2**20, (peak, kv)
    assert abs(peak[8192, 512] - peak[8192, 32] - act) < 0.2 * act + 2**20, (peak, act)
