"""GPTQ-style compensation (passes/gptq.py): lower output error than the plain round trip, in the file llama.cpp
reads, and refused where it cannot apply."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from edgeq import runtime
from edgeq.api import ExportOptions, export
from edgeq.compile.options import GPTQ_WINDOWS
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.importers.gguf import import_gguf
from edgeq.importers.loader import import_model
from edgeq.core.executor import Executor
from edgeq.evaluate.decoder import log_softmax64
from edgeq.models import llama
from edgeq.passes.calibrate import DEFAULT_CTX, calibrate, calibration_tokens, calibration_windows
from edgeq.passes.fisher import token_weights
from edgeq.passes.gptq import (Hessian, aimed_at_reference, compensate, damped, input_drift, input_hessian,
                               inverse_cholesky, partly_weighted_hessian, weighted_windows, written, written_values)


def _inputs(seed: int, width: int):
    """Correlated inputs with channels of very different scales, as a transformer's are: draw(tokens, rng)."""
    law = np.random.default_rng(seed)
    mix = law.standard_normal((width, width)) * 0.3 + np.eye(width)
    scale = np.exp(law.standard_normal(width))
    return lambda tokens, rng: (rng.standard_normal((tokens, width)) @ mix) * scale


def _error(dw: np.ndarray, h: np.ndarray) -> float:
    d = dw.astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d))


@pytest.mark.parametrize("fmt,act_order", [("q4_0", False), ("q4_k", False), ("iq4_nl", False), ("q3_k", False),
                                           ("q4_0", True), ("q4_k", True)])
def test_compensation_lowers_the_output_error_in_and_out_of_sample(fmt, act_order):
    rng = np.random.default_rng(0)
    draw = _inputs(1, 512)
    x, held = draw(4000, rng), draw(4000, rng)          # calibration tokens, and other tokens of the same law
    h, h_held = x.T @ x / len(x), held.T @ held / len(held)
    w = (rng.standard_normal((128, 512)) * 0.05).astype(np.float32)
    f = get_format(fmt)
    imp = np.diag(h).astype(np.float32)
    plain = f.roundtrip(w, imp) - w
    comp = f.roundtrip(compensate(w, f, Hessian.of(h, act_order=act_order), imp), imp) - w
    assert _error(comp, h) < 0.9 * _error(plain, h)
    assert _error(comp, h_held) < 0.95 * _error(plain, h_held)


def test_inverse_cholesky_survives_dead_inputs():
    h = np.diag([4.0, 0.0, 1.0])
    u = inverse_cholesky(damped(h))
    assert np.all(np.isfinite(u)) and np.allclose(np.triu(u), u)


def test_compensation_on_one_blas_thread_is_the_two_thread_result_bit_for_bit():
    """compensate() limits BLAS to one thread (faster on a shared machine); the weights must not change with it."""
    from threadpoolctl import threadpool_limits

    from edgeq.passes.gptq import _compensate

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((384, 1024)) * 0.05).astype(np.float32)
    x = _inputs(3, 1024)(2048, rng)
    for act_order in (False, True):
        hess = Hessian.of(x.T @ x / len(x), act_order=act_order)
        imp = np.diag(hess.h).astype(np.float32)
        for name in ("q4_0", "q4_k"):
            fmt = get_format(name)
            with threadpool_limits(limits=2, user_api="blas"):
                two = _compensate(w, fmt, hess, imp)[0]
            assert np.array_equal(compensate(w, fmt, hess, imp), two), (name, act_order)


@pytest.mark.parametrize("fmt,act_order", [("q4_k", False), ("q4_k", True), ("iq2_xxs", True), ("q4_0", False)])
def test_written_values_are_the_round_trip_of_the_written_weights(fmt, act_order):
    """The planner's price of a GPTQ candidate (`written_values`: the block loop's round trips where the format is
    blockwise) is exactly the round trip of what the writer quantizes."""
    rng = np.random.default_rng(6)
    x = _inputs(6, 512)(1500, rng)
    hess = Hessian.of(x.T @ x / len(x), act_order=act_order)
    w = (rng.standard_normal((64, 512)) * 0.05).astype(np.float32)
    f = get_format(fmt)
    imp = np.diag(hess.h).astype(np.float32)
    assert np.array_equal(written_values(w, f, hess, imp), f.roundtrip(*written(w, f, hess, imp)))


@pytest.fixture(scope="module")
def exported(tiny_decoder_dir, cache, tmp_path_factory):
    import os

    os.environ["EDGEQ_CACHE"] = str(cache)
    try:
        out = {}
        for gptq in (False, True, "float"):
            b = tmp_path_factory.mktemp("gptq") / "b"
            export(ExportOptions(model=str(tiny_decoder_dir), quant="q4_0", gptq=bool(gptq), calib_windows=2,
                                 gptq_windows=2, gptq_sequential=gptq != "float", out=str(b)))
            out[gptq] = b
        return out
    finally:
        os.environ.pop("EDGEQ_CACHE", None)


def _assert_compensated_through(run: Graph, file: Graph, source: Graph, names: list[str], imatrix: dict,
                                n_windows: int = 2, conditional: bool = False, act_order: bool = True,
                                token_weights: dict[str, np.ndarray] | None = None,
                                weighted: list[int] | None = None) -> None:
    """Each of `names` in `file` is its format's quantization of W' = the source's weight compensated through the
    H of the inputs that reach it when `run` runs the calibration windows (blocks in act-order, edgeq's default)."""
    checked = []
    tokens, bos, add_bos = calibration_tokens(source)

    def check(node, envs):
        name = node.inputs[1]
        if name in names:
            f = get_format(file.weights[name].source_format)
            if weighted is not None:
                hess = partly_weighted_hessian(envs, node.inputs[0], weighted, token_weights[name],
                                               act_order=act_order, conditional=conditional)
            else:
                hess = input_hessian(envs, node.inputs[0], act_order=act_order, conditional=conditional,
                                     token_weights=None if token_weights is None else token_weights[name])
            w_prime, imp = written(source.weights[name].numpy(), f, hess, imatrix[name])
            np.testing.assert_array_equal(file.weights[name].numpy(), f.roundtrip(w_prime, imp))
            checked.append(name)

    windows = calibration_windows(tokens, DEFAULT_CTX, n_windows, bos, add_bos)
    Executor(run, before={"linear": check}).run_many(windows, outputs=("logits",))
    assert names and sorted(checked) == sorted(names)


def test_the_file_holds_the_compensated_weights_and_errs_less(exported, tiny_decoder_dir, cache, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE", str(cache))
    source: Graph = import_model(tiny_decoder_dir)
    cal = calibrate(source, n_windows=2)
    plain, comp = (import_gguf(exported[g] / "model.gguf") for g in (False, "float"))
    q4 = [n for n, t in comp.weights.items() if len(t.shape) == 2 and t.source_format == "q4_0"]
    assert len(q4) >= 2 * 7 - 1
    total = {False: 0.0, True: 0.0}
    for name in q4:
        h = cal.stats(name).full()
        w = source.weights[name].numpy()
        for g, graph in ((False, plain), (True, comp)):
            total[g] += _error(graph.weights[name].numpy() - w, h)
    assert total[True] < 0.9 * total[False]
    # what was written is the format's own quantization of W' (ggml's code), W' compensated through the H of each
    # layer's inputs in the float model over the calibration windows, one streamed run
    _assert_compensated_through(source, comp, source, q4, cal.imatrix())
    # W' is only what is quantized: the reference outputs the bundle is checked against are the source's
    ref = {g: {p.name: p.read_bytes() for p in (exported[g] / "reference").iterdir()} for g in (False, True)}
    assert ref[False] and ref[False] == ref[True]


def test_sequential_gptq_takes_each_layers_h_from_the_quantized_layers_before_it(exported, tiny_decoder_dir, cache,
                                                                                 monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE", str(cache))
    source: Graph = import_model(tiny_decoder_dir)
    seq = import_gguf(exported[True] / "model.gguf")
    q4 = [n for n, t in seq.weights.items() if len(t.shape) == 2 and t.source_format == "q4_0"]
    # the file's own weights produce the inputs each layer was compensated for
    _assert_compensated_through(seq, seq, source, q4, calibrate(source, n_windows=2).imatrix())


def test_the_planner_prices_the_compensated_error(tiny_decoder_dir, cache, monkeypatch):
    from edgeq.core.formats import candidate_formats
    from edgeq.importers.loader import graph_tokenizer_spec
    from edgeq.passes.sensitivity import compute_costs
    from edgeq.targets.registry import get_target

    monkeypatch.setenv("EDGEQ_CACHE", str(cache))
    graph = import_model(tiny_decoder_dir)
    cal = calibrate(graph, n_windows=2)
    fmts = [f for f in candidate_formats("gguf") if f.name in ("f16", "q8_0", "q4_0", "q4_k", "iq4_nl")]
    layout = get_target("gguf").layout(graph, fmts, [0], None, spec=graph_tokenizer_spec(graph))
    plain, comp = (compute_costs(graph, fmts, cal, layout, gptq=g) for g in (False, True))
    assert comp.info["gptq"]["compensated_tensors"] == len(comp.options) - 1      # all but the tied embedding
    for name, options in comp.options.items():
        for o, p in zip(options, plain.options[name]):
            assert (o.format, o.bytes) == (p.format, p.bytes)
            if o.format == "f16" or name == "model.embed_tokens.weight":
                assert o.cost == p.cost
    # (q4_k's blocks are 256 wide: only the 512-wide down projections have a second block to pay the first back)
    for fmt, most in (("q4_0", 0.9), ("iq4_nl", 0.9), ("q4_k", 0.99)):
        before, after = (sum(o.cost for v in t.options.values() for o in v if o.format == fmt) for t in (plain, comp))
        assert after < most * before, fmt


def test_refused_where_it_cannot_apply(tiny_decoder_dir, tmp_path):
    with pytest.raises(EdgeqError, match="gptq"):
        export(ExportOptions(model=str(tiny_decoder_dir), quant="q4_0", gptq=True, calibration=False,
                             out=str(tmp_path / "a")))
    with pytest.raises(EdgeqError, match="gptq"):
        export(ExportOptions(model=str(tiny_decoder_dir), bpw=5.0, ranks=[0, 8], gptq=True, out=str(tmp_path / "b")))
    with pytest.raises(EdgeqError, match="pruning rates"):     # a width table: many models, one set of weights
        export(ExportOptions(model=str(tiny_decoder_dir), quant="q4_0", pruning_rates=[0.0, 0.25], gptq=True,
                             out=str(tmp_path / "c")))
    assert not any((tmp_path / x).exists() for x in "abc")


def test_budgeted_gguf_plans_compensate_by_default_and_no_gptq_turns_it_off(tiny_decoder_dir, tmp_path, monkeypatch):
    """README command 1's install (no torch): a budgeted GGUF export prices and writes the compensated weights
    (llama.cpp runs the file as the executor runs its weights: the bytes are in the file's row order);
    --no-gptq writes the plain quantization."""
    import sys

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "torch", None)
    out = {}
    for gptq in (None, False):
        b = tmp_path / f"b{gptq}"
        res = export(ExportOptions(model=str(tiny_decoder_dir), bpw=5.0, gptq=gptq, calib_windows=2, out=str(b),
                                   formats=["f16", "q8_0", "q6_k", "q4_0", "q4_k", "iq4_nl"], check=False))
        m = res["manifest"]
        out[gptq] = (m, import_gguf(b / "model.gguf"))
        assert (b / "model.gguf").stat().st_size == m["plan"]["search"]["predicted_bytes"] <= \
            m["plan"]["search"]["budget_bytes"]
    (m, comp), (m_plain, plain) = out[None], out[False]
    rec = next(r for r in m["passes"] if r["pass"] == "gptq")
    assert rec["sequential"] is True and rec["compensated"] > 0
    assert not any(r["pass"] == "gptq" for r in m_plain["passes"])
    assert "Fisher" in m["plan"]["search"]["cost"]
    # every weight in a quantizing format but the embedding holds its sequential compensation
    names = [n for n, t in comp.weights.items() if len(t.shape) == 2 and n != "model.embed_tokens.weight"
             and get_format(t.source_format).bits_per_weight < 16]
    source = import_model(tiny_decoder_dir)
    _assert_compensated_through(comp, comp, source, names, calibrate(source, n_windows=2).imatrix(),
                                n_windows=GPTQ_WINDOWS)      # the writer's default H: more windows than calibration's
    ids = [int(i) for i in np.random.default_rng(1).integers(3, comp.config.vocab_size, 48)]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "bNone" / "model.gguf"), n_ctx=64, n_batch=64, logits_all=True,
                          n_threads=1, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    ref = Executor(comp).logits(ids).astype(np.float64)
    la, lb = (x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
              for x in (ref, got))
    assert float(np.mean(np.sum(np.exp(la) * (la - lb), -1))) < 5e-3


def test_gptq_writer_windows_default():
    """The writer's H from GPTQ_WINDOWS windows unless asked, or the calibration's when it has more."""
    from edgeq.compile.decide import gptq_windows
    from edgeq.compile.search_labels import label_options

    assert GPTQ_WINDOWS == 32
    assert gptq_windows(ExportOptions(bpw=5.0), 4) == GPTQ_WINDOWS
    assert gptq_windows(ExportOptions(bpw=5.0, calib_windows=64), 64) == 64
    assert gptq_windows(ExportOptions(bpw=5.0, gptq_windows=3), 4) == 3
    # a search's labels rank plans: written from the calibration's windows, not the final export's 32
    assert label_options(ExportOptions(latency_ms=5.0, method="search")).gptq_windows == 4
    assert label_options(ExportOptions(latency_ms=5.0, gptq_windows=16)).gptq_windows == 16


def test_gptq_default_only_where_it_applies(tiny_decoder_dir):
    from edgeq.compile.decide import DecideInputs, gptq_on
    from edgeq.targets.registry import get_target

    graph = import_model(tiny_decoder_dir)
    gguf, onnx = (DecideInputs(target=get_target(b), preset=None, profile=None) for b in ("gguf", "onnx"))
    assert gptq_on(graph, gguf, ExportOptions(bpw=5.0))
    assert not gptq_on(graph, gguf, ExportOptions(bpw=5.0, gptq=False))
    assert not gptq_on(graph, gguf, ExportOptions(quant="q4_k_m"))                    # a preset: llama.cpp's own
    assert not gptq_on(graph, gguf, ExportOptions(bpw=5.0, calibration=False))
    assert not gptq_on(graph, gguf, ExportOptions(bpw=5.0, ranks=[0, 8]))
    assert not gptq_on(graph, gguf, ExportOptions(bpw=5.0, method="dynaquant"))
    assert not gptq_on(graph, gguf, ExportOptions(latency_ms=5.0, method="search"))   # opt-in: labels cost more
    assert gptq_on(graph, gguf, ExportOptions(latency_ms=5.0, method="search", gptq=True))
    assert not gptq_on(graph, gguf, ExportOptions(bpw=5.0, pruning_rates=[0.0, 0.25]))
    assert not gptq_on(graph, onnx, ExportOptions(bpw=5.0))
    assert gptq_on(graph, onnx, ExportOptions(bpw=5.0, gptq=True))


def test_the_price_is_the_written_error(tiny_decoder_dir, tmp_path, monkeypatch):
    """The ILP prices each compensated format by the error of what the writer writes: the plan's predicted error of
    every compensated tensor equals the error of the file's weights under the plan's own (Fisher) cost. (Pricing
    through the Fisher's C_F compensated weights no file holds: the file erred up to 2x its price.) The writer takes
    the calibration's windows here; by default it takes more (GPTQ_WINDOWS), and the price is then the in-sample
    proxy of a better-estimated H."""
    from edgeq.passes.fisher import output_fisher
    from edgeq.passes.sensitivity import output_error

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    b = tmp_path / "b"
    res = export(ExportOptions(model=str(tiny_decoder_dir), bpw=5.0, calib_windows=2, gptq_sequential=False,
                               gptq_windows=2, out=str(b), formats=["f16", "q8_0", "q6_k", "q4_0", "q4_k", "iq4_nl"],
                               check=False))
    plan = res["manifest"]["plan"]
    source = import_model(tiny_decoder_dir)
    written = import_gguf(b / "model.gguf")
    tokens, bos, add_bos = calibration_tokens(source)
    fisher = output_fisher(source, calibration_windows(tokens, DEFAULT_CTX, 2, bos, add_bos))
    priced = measured = 0.0
    checked = 0
    for name, t in written.weights.items():
        fmt = get_format(t.source_format)
        if len(t.shape) != 2 or name == "model.embed_tokens.weight" or fmt.bits_per_weight >= 16:
            continue
        dw = t.numpy() - source.weights[name].numpy()
        got = output_error(dw, fisher[f"cov:{name}"], None, fisher[name])
        want = plan["tensors"][name]["predicted_error"]
        assert got == pytest.approx(want, rel=0.05), name
        priced, measured, checked = priced + want, measured + got, checked + 1
    assert checked >= 10 and measured == pytest.approx(priced, rel=0.01)


def test_the_plan_file_records_gptq_and_reproduces_the_bytes(tiny_decoder_dir, tmp_path, monkeypatch):
    """A budgeted export's plan says it was written compensated; `--plan` with that file (no --gptq) writes the same
    bytes, and --no-gptq still writes the plain quantization of the same formats."""
    import json

    from edgeq.core.plan import load_plan

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    fmts = ["f16", "q8_0", "q6_k", "q4_0", "q4_k", "iq4_nl"]
    res = export(ExportOptions(model=str(tiny_decoder_dir), bpw=5.0, calib_windows=2, out=str(tmp_path / "a"),
                               formats=fmts, check=False))
    plan = res["manifest"]["plan"]
    assert plan["gptq"] == {"act_order": True, "sequential": True, "damp": 0.01, "windows": GPTQ_WINDOWS}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert load_plan(path).gptq == plan["gptq"]
    again = export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), calib_windows=2, out=str(tmp_path / "b"),
                                 check=False))
    assert any(r["pass"] == "gptq" for r in again["manifest"]["passes"])
    assert (tmp_path / "b" / "model.gguf").read_bytes() == (tmp_path / "a" / "model.gguf").read_bytes()
    plain = export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), calib_windows=2, gptq=False,
                                 out=str(tmp_path / "c"), check=False))
    assert plain["manifest"]["plan"].get("gptq") is None
    assert (tmp_path / "c" / "model.gguf").read_bytes() != (tmp_path / "a" / "model.gguf").read_bytes()
    formats = [{n: t.source_format for n, t in import_gguf(tmp_path / x / "model.gguf").weights.items()}
               for x in ("a", "c")]
    assert formats[0] == formats[1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**plan, "gptq": {"act_order": "yes"}}))
    with pytest.raises(EdgeqError, match="gptq.act_order"):
        load_plan(bad)
    with pytest.raises(EdgeqError, match="gptq"):
        export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), calibration=False, out=str(tmp_path / "d")))
    assert not (tmp_path / "d").exists()


def test_a_plan_that_fixes_the_mlp_widths_is_compensated_after_the_narrowing(tiny_decoder_dir, tmp_path,
                                                                             monkeypatch):
    """Plans that fix each MLP's width (`keep`: `edgeq search`'s, or a person's) are one narrowed model: GPTQ
    compensates that model — every layer's H from the inputs that reach it in the narrowed, quantized model — and
    llama.cpp, running the file, is closer to the narrowed float model than the plain quantization of the same
    formats. (Compensating the full-width weights and slicing after would pay errors into removed columns.)"""
    import json

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    widths = (288, 224)          # layers that differ: llama.cpp's `deci` architecture
    tensors = {n: {"format": "q4_0", "keep": k} for i, k in enumerate(widths) for n in llama.mlp_weights(i)}
    path = tmp_path / "keep.json"
    path.write_text(json.dumps({"preset": "q4_0", "tensors": tensors}))
    res = {g: export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), gptq=g, calib_windows=2,
                                   gptq_windows=2, out=str(tmp_path / f"b{g}"), check=False))["manifest"]
           for g in (True, False)}
    passes = [r["pass"] for r in res[True]["passes"]]
    assert passes.index("uniql_alloc") < passes.index("gptq") and "gptq" not in [r["pass"] for r in res[False]["passes"]]
    assert res[True]["plan"]["gptq"]["sequential"] is True
    source = import_model(tiny_decoder_dir)
    channels = {i: np.asarray(res[True]["plan"]["tensors"][llama.mlp_weights(i)[0]]["order"])[:k]
                for i, k in enumerate(widths)}
    narrow = llama.prune_mlp(source, channels)
    comp = import_gguf(tmp_path / "bTrue" / "model.gguf")
    names = [n for n, t in comp.weights.items() if len(t.shape) == 2 and t.source_format == "q4_0"
             and n != "model.embed_tokens.weight"]
    assert llama.mlp_widths(comp) == list(widths) and len(names) == 2 * 7
    cal = calibrate(source, n_windows=2).reindexed({llama.mlp_weights(i)[2]: c for i, c in channels.items()})
    _assert_compensated_through(comp, comp, narrow, names, cal.imatrix())
    # on text the calibration did not see (windows 2 and 5 of 8 spread over it; its 2 were the first and the last)
    tokens, bos, add_bos = calibration_tokens(source)
    spread = calibration_windows(tokens, DEFAULT_CTX, 8, bos, add_bos)
    assert spread[0] == calibration_windows(tokens, DEFAULT_CTX, 2, bos, add_bos)[0]
    held_out = [spread[i][:256] for i in (2, 5)]
    kld = {True: 0.0, False: 0.0}
    for g in kld:
        with runtime.load(tmp_path / f"b{g}") as s:
            for ids in held_out:
                lr, lg = log_softmax64(Executor(narrow).logits(ids)), log_softmax64(s.logits(ids))
                kld[g] += float(np.mean(np.sum(np.exp(lr) * (lr - lg), -1)))
    assert kld[True] < 0.8 * kld[False], kld


def test_deferred_covariances_are_the_held_ones_bit_for_bit(tiny_decoder_dir, tmp_path, monkeypatch):
    """A budgeted GPTQ plan's calibration holds no full covariance: each is recomputed from stored residual streams
    when the pricing reads it, and equals the one calibration would have held to the bit (so the costs, the plan
    and the files are the same); a cached calibration recomputes them the same way; its record is the same."""
    from edgeq.core.formats import candidate_formats
    from edgeq.importers.loader import graph_tokenizer_spec
    from edgeq.passes.fisher import FisherSource
    from edgeq.passes.sensitivity import compute_costs
    from edgeq.targets.registry import get_target

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    graph = import_model(tiny_decoder_dir)
    held = calibrate(graph, n_windows=2, use_cache=False)
    lazy, cached = (calibrate(graph, n_windows=2, defer_full=True) for _ in range(2))
    for cal in (lazy, cached):
        assert all(s.sum_outer is None for s in cal.inputs.values()) and cal.deferred == set(held.inputs)
        assert cal.to_json() == held.to_json() and cal.imatrix().keys() == held.imatrix().keys()
        for w in reversed(list(held.weight_input)):          # top down, as the Fisher stream asks
            np.testing.assert_array_equal(cal.full(w), held.stats(w).full())
    fmts = [f for f in candidate_formats("gguf") if f.name in ("q8_0", "q4_0")]
    layout = get_target("gguf").layout(graph, fmts, [0], None, spec=graph_tokenizer_spec(graph))
    tokens, bos, add_bos = calibration_tokens(graph)
    fisher = FisherSource(graph, calibration_windows(tokens, DEFAULT_CTX, 1, bos, add_bos))   # the plan's cost
    a, b = (compute_costs(graph, fmts, cal, layout, gptq=True, fisher=fisher) for cal in (held, lazy))
    assert a.to_json() == b.to_json() and b.info["gptq"]["compensated_tensors"] == len(b.options) - 1


def test_gptq_pricing_holds_one_input_covariance_at_a_time(tmp_path, monkeypatch):
    """What GPTQ's pricing holds besides the calibration's diagonals, on a deep model whose input covariances
    (float64, 20 layers) outweigh everything else: the peak allocation while pricing every weight stays below half
    of holding every covariance (holding them, as the planner did, peaks above their total)."""
    import tracemalloc

    from edgeq.core.formats import candidate_formats
    from edgeq.importers.loader import graph_tokenizer_spec
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
    from edgeq.passes.sensitivity import compute_costs
    from edgeq.targets.registry import get_target

    monkeypatch.setenv("EDGEQ_CACHE", "off")
    layers, width, inner = 20, 32, 256
    cfg = tiny_config(vocab_size=300, hidden_size=width, intermediate_size=inner, n_layers=layers, n_heads=2,
                      n_kv_heads=1, head_dim=16, context_length=128, tied_embeddings=True)
    graph = import_model(graph_to_hf_folder(random_llama(cfg, seed=3, scale=0.08), tmp_path / "m",
                                            byte_level_spec(300)))
    fmts = [f for f in candidate_formats("gguf") if f.name == "q8_0"]
    fmts[0].roundtrip(np.ones((4, 64), dtype=np.float32), None)      # the quantizer's one-off set-up, not traced
    layout = get_target("gguf").layout(graph, fmts, [0], None, spec=graph_tokenizer_spec(graph))
    total = layers * 8 * (3 * width ** 2 + inner ** 2)      # every input's covariance: q/k/v's, o's, gate/up's, down's
    peaks = {}
    for defer in (True, False):
        tracemalloc.start()
        cal = calibrate(graph, n_windows=2, ctx=64, use_cache=False, defer_full=defer)
        tracemalloc.reset_peak()             # (the calibration text's tokens come and go before)
        table = compute_costs(graph, fmts, cal, layout, gptq=True)
        peaks[defer] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert table.info["gptq"]["compensated_tensors"] == layers * 7
        del cal, table
    assert peaks[False] > total and peaks[True] < total / 2, (peaks, total)


@pytest.mark.parametrize("act_order", [False, True])
def test_conditional_importance_is_what_later_columns_cannot_pay_back(act_order):
    """--gptq-conditional: block S's quantizer weighs its columns by diag(H_SS − H_SR H_RR⁻¹ H_RS) (R: the columns
    quantized after S), read off the Cholesky factor the update uses; the block quantized last gets diag H."""
    rng = np.random.default_rng(0)
    x = _inputs(2, 256)(3000, rng)
    h = x.T @ x / len(x)
    f = get_format("iq4_nl")
    hess = Hessian.of(h, act_order=act_order, conditional=True)
    d = damped(h)
    imp = hess.importance(f, np.diag(h).astype(np.float32))
    perm = hess.factor(32)[0]
    order = np.arange(256) if perm is None else perm
    for s0 in (0, 96, 224):
        s, r = order[s0:s0 + 32], order[s0 + 32:]
        schur = d[np.ix_(s, s)] - (d[np.ix_(s, r)] @ np.linalg.solve(d[np.ix_(r, r)], d[np.ix_(r, s)]) if len(r) else 0)
        np.testing.assert_allclose(imp[s], np.diag(schur), rtol=1e-4)
    assert np.all(imp <= np.diag(d) * (1 + 1e-5)) and imp[order[:-32]].sum() < 0.9 * np.diag(d)[order[:-32]].sum()
    # uncorrelated inputs: nothing later predicts a column, the weights are E[x²] (damped)
    diag = Hessian.of(np.diag(np.diag(h)), conditional=True).importance(f, None)
    np.testing.assert_allclose(diag, np.diag(damped(np.diag(np.diag(h)))), rtol=1e-5)
    assert Hessian.of(h, conditional=True).importance(get_format("q8_0"), None) is None   # (takes no imatrix)
    # the bytes: the compensated weights are quantized with those weights, and still err less than plain ones
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    dq = f.roundtrip(*written(w, f, hess, np.diag(h).astype(np.float32)))
    assert _error(dq - w, h) < 0.9 * _error(f.roundtrip(w, np.diag(h).astype(np.float32)) - w, h)


def test_conditional_importance_and_gptq_windows_are_written_recorded_and_reproduced(tiny_decoder_dir, tmp_path,
                                                                                    monkeypatch):
    """--gptq-conditional and --gptq-windows: the file holds the format's quantization (with the conditional
    weights) of W' compensated through H over that many windows; the plan records both and `--plan` writes the
    same bytes."""
    import json

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    res = export(ExportOptions(model=str(tiny_decoder_dir), quant="iq4_nl", gptq=True, gptq_conditional=True,
                               gptq_windows=3, gptq_sequential=False, calib_windows=2, out=str(tmp_path / "a"),
                               check=False))
    plan = res["manifest"]["plan"]
    assert plan["gptq"] == {"act_order": True, "sequential": False, "damp": 0.01, "windows": 3,
                            "importance": "conditional"}
    source: Graph = import_model(tiny_decoder_dir)
    comp = import_gguf(tmp_path / "a" / "model.gguf")
    names = [n for n, t in comp.weights.items() if len(t.shape) == 2 and t.source_format == "iq4_nl"
             and n != "model.embed_tokens.weight"]
    _assert_compensated_through(source, comp, source, names, calibrate(source, n_windows=2).imatrix(), n_windows=3,
                                conditional=True)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), calib_windows=2, out=str(tmp_path / "b"),
                         check=False))
    assert (tmp_path / "b" / "model.gguf").read_bytes() == (tmp_path / "a" / "model.gguf").read_bytes()
    path.write_text(json.dumps({**plan, "gptq": {**plan["gptq"], "importance": "fisher"}}))
    with pytest.raises(EdgeqError, match="gptq.importance"):
        export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), out=str(tmp_path / "c")))
    with pytest.raises(EdgeqError, match="--gptq-windows"):
        export(ExportOptions(model=str(tiny_decoder_dir), quant="q4_0", gptq=True, gptq_windows=0,
                             out=str(tmp_path / "d")))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_aiming_at_the_float_output_is_the_least_squares_refit():
    """W̃ = W + W·E[(x_f − x_q)x_qᵀ]·H⁻¹ is the refit of W x_f onto the quantized inputs (vanishing damping), so
    ‖W x_f − Q x_q‖² = ‖W x_f − W̃ x_q‖² + ‖(W̃ − Q) x_q‖² for any Q; equal inputs leave W unchanged."""
    rng = np.random.default_rng(0)
    xf = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24))
    xq = xf + 0.1 * rng.standard_normal(xf.shape)
    w = rng.standard_normal((8, 24)).astype(np.float32)
    envs, ref = [{"x": xq[:200]}, {"x": xq[200:]}], [{"x": xf[:200]}, {"x": xf[200:]}]
    hess = input_hessian(envs, "x", damp=1e-9)
    aimed = aimed_at_reference(w, hess, input_drift(envs, ref, "x"))
    lstsq = np.linalg.lstsq(xq, xf @ w.T.astype(np.float64), rcond=None)[0].T
    np.testing.assert_allclose(aimed, lstsq, rtol=1e-4, atol=1e-4)
    q = np.round(aimed * 4) / 4
    total = np.sum((xf @ w.T - xq @ q.T) ** 2)
    split = np.sum((xf @ w.T - xq @ aimed.T) ** 2) + np.sum((xq @ (aimed - q).T) ** 2)
    assert abs(total - split) < 1e-3 * total
    same = input_hessian(ref, "x")
    np.testing.assert_array_equal(aimed_at_reference(w, same, input_drift(ref, ref, "x")), w)


def test_gptq_aimed_at_the_float_model_is_written_recorded_and_reproduced(tiny_decoder_dir, tmp_path, monkeypatch):
    """--gptq-aim float: each weight in the file is its format's GPTQ of W̃ (the refit of the float model's output
    onto the quantized model's inputs, both models run in step over the calibration windows); the plan records it
    and `--plan` writes the same bytes; the file's logits are closer to the float model's than plain sequential
    GPTQ's on the calibration windows; it refuses --no-gptq-sequential in one line."""
    import json

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    out = {}
    for aim in ("quantized", "float"):
        res = export(ExportOptions(model=str(tiny_decoder_dir), quant="q4_0", gptq=True, gptq_aim=aim,
                                   calib_windows=2, gptq_windows=2, out=str(tmp_path / aim), check=False))
        out[aim] = res["manifest"]["plan"]
    assert out["float"]["gptq"] == {"act_order": True, "sequential": True, "damp": 0.01, "windows": 2,
                                    "aim": "float"}
    assert "aim" not in out["quantized"]["gptq"]
    source: Graph = import_model(tiny_decoder_dir)
    comp = import_gguf(tmp_path / "float" / "model.gguf")
    imatrix = calibrate(source, n_windows=2).imatrix()
    names = [n for n, t in comp.weights.items() if len(t.shape) == 2 and t.source_format == "q4_0"
             and n != "model.embed_tokens.weight"]
    checked, moved = [], []

    def check(node, envs, reference_envs):
        name = node.inputs[1]
        if name in names:
            f = get_format(comp.weights[name].source_format)
            hess = input_hessian(envs, node.inputs[0], act_order=True)
            drift = input_drift(envs, reference_envs, node.inputs[0])
            w = source.weights[name].numpy()
            aimed = aimed_at_reference(w, hess, drift)
            np.testing.assert_array_equal(comp.weights[name].numpy(), f.roundtrip(*written(aimed, f, hess,
                                                                                           imatrix[name])))
            checked.append(name)
            moved.append(bool(np.any(aimed != w)))

    tokens, bos, add_bos = calibration_tokens(source)
    windows = calibration_windows(tokens, DEFAULT_CTX, 2, bos, add_bos)
    Executor(comp, before={"linear": check}).run_paired(Executor(source), windows, outputs=("logits",))
    assert sorted(checked) == sorted(names)
    assert all(moved)          # the token embedding is quantized too: even the first layer's inputs drift
    ref = Executor(source).run_many(windows)
    err = {aim: sum(float(np.sum((a - b) ** 2)) for a, b in zip(
        Executor(import_gguf(tmp_path / aim / "model.gguf")).run_many(windows), ref)) for aim in out}
    assert err["float"] < err["quantized"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(out["float"]))
    export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), calib_windows=2, out=str(tmp_path / "b"),
                         check=False))
    assert (tmp_path / "b" / "model.gguf").read_bytes() == (tmp_path / "float" / "model.gguf").read_bytes()
    with pytest.raises(EdgeqError, match="--gptq-aim float"):
        export(ExportOptions(model=str(tiny_decoder_dir), quant="q4_0", gptq=True, gptq_aim="float",
                             gptq_sequential=False, out=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()


def test_fisher_weighted_tokens_give_each_weight_its_own_h(tiny_decoder_dir, tmp_path, monkeypatch):
    """--gptq-tokens fisher: each weight in the file is GPTQ through Σ a_t x_t x_tᵀ / Σ a_t, a_t the energy of
    the float model's output gradient at that weight's output (so q, k and v, which share an input, get different
    H); the plan records it, `--plan` writes the same bytes, and the file differs from the uniform one."""
    import json

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    out = {}
    for tokens in ("uniform", "fisher"):
        res = export(ExportOptions(model=str(tiny_decoder_dir), quant="q4_0", gptq=True, gptq_tokens=tokens,
                                   calib_windows=2, gptq_windows=2, out=str(tmp_path / tokens), check=False))
        out[tokens] = res["manifest"]["plan"]
    assert out["fisher"]["gptq"]["tokens"] == "fisher" and "tokens" not in out["uniform"]["gptq"]
    source: Graph = import_model(tiny_decoder_dir)
    comp = import_gguf(tmp_path / "fisher" / "model.gguf")
    names = [n for n, t in comp.weights.items() if len(t.shape) == 2 and t.source_format == "q4_0"
             and n != "model.embed_tokens.weight"]
    tokens, bos, add_bos = calibration_tokens(source)
    weights = token_weights(source, calibration_windows(tokens, DEFAULT_CTX, 2, bos, add_bos))
    q, k = (next(n for n in names if n.endswith(f"layers.0.self_attn.{p}_proj.weight")) for p in "qk")
    assert weights[q].shape == weights[k].shape and not np.allclose(weights[q], weights[k])
    _assert_compensated_through(comp, comp, source, names, calibrate(source, n_windows=2).imatrix(),
                                token_weights=weights)
    uniform = import_gguf(tmp_path / "uniform" / "model.gguf")
    assert sum(not np.array_equal(comp.weights[n].numpy(), uniform.weights[n].numpy()) for n in names) > len(names) // 2
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(out["fisher"]))
    export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), calib_windows=2, out=str(tmp_path / "b"),
                         check=False))
    assert (tmp_path / "b" / "model.gguf").read_bytes() == (tmp_path / "fisher" / "model.gguf").read_bytes()
    path.write_text(json.dumps({**out["fisher"], "gptq": {**out["fisher"]["gptq"], "tokens": "gradient"}}))
    with pytest.raises(EdgeqError, match="gptq.tokens"):
        export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), out=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()


def test_tokens_without_a_backward_get_the_mean_weight_of_their_kind_of_position():
    """--gptq-token-windows K: H = Σ w_t x_t x_tᵀ / Σ w_t over every window, w_t = a_t on the K windows with a
    backward and, elsewhere, the mean a_t of those windows' first tokens (the attention sink) or of their later
    ones; every window weighted is the plain Fisher-weighted H, flat weights the uniform H."""
    draw, rng = _inputs(3, 16), np.random.default_rng(4)
    envs = [{"x": draw(40, rng).astype(np.float32)} for _ in range(8)]
    a = rng.random(8 * 40) ** 4
    every = partly_weighted_hessian(envs, "x", list(range(8)), a).h
    np.testing.assert_allclose(every, input_hessian(envs, "x", token_weights=a).h, rtol=1e-12, atol=1e-12)
    some = weighted_windows(8, 2)
    assert some == [0, 4] and weighted_windows(8, None) == weighted_windows(8, 8) == list(range(8))
    np.testing.assert_allclose(partly_weighted_hessian(envs, "x", some, np.full(80, 0.3)).h,
                               input_hessian(envs, "x").h, rtol=1e-10, atol=1e-12)
    ak = a[:80].copy()
    ak[[0, 40]] = [50.0, 30.0]                  # the sink: 40 on average
    w = np.full(320, ak[np.r_[1:40, 41:80]].mean())
    w[::40] = 40.0
    w[0:40], w[160:200] = ak[:40], ak[40:]
    got = partly_weighted_hessian(envs, "x", some, ak).h
    np.testing.assert_allclose(got, input_hessian(envs, "x", token_weights=w).h, rtol=1e-10, atol=1e-12)
    assert not np.allclose(got, input_hessian(envs, "x").h, rtol=1e-3)


def test_fisher_tokens_on_fewer_windows_write_the_partly_weighted_h(tiny_decoder_dir, tmp_path, monkeypatch):
    """--gptq-tokens fisher --gptq-token-windows 1 of 2 writer windows: each weight is GPTQ through the partly
    weighted H (the backward over window 0 only); the plan records it and `--plan` writes the same bytes."""
    import json

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    res = export(ExportOptions(model=str(tiny_decoder_dir), quant="q4_0", gptq=True, gptq_tokens="fisher",
                               gptq_token_windows=1, calib_windows=2, gptq_windows=2, out=str(tmp_path / "a"),
                               check=False))
    plan = res["manifest"]["plan"]
    assert plan["gptq"]["tokens"] == "fisher" and plan["gptq"]["token_windows"] == 1
    source: Graph = import_model(tiny_decoder_dir)
    comp = import_gguf(tmp_path / "a" / "model.gguf")
    names = [n for n, t in comp.weights.items() if len(t.shape) == 2 and t.source_format == "q4_0"
             and n != "model.embed_tokens.weight"]
    tokens, bos, add_bos = calibration_tokens(source)
    windows = calibration_windows(tokens, DEFAULT_CTX, 2, bos, add_bos)
    weights = token_weights(source, windows[:1])
    _assert_compensated_through(comp, comp, source, names, calibrate(source, n_windows=2).imatrix(),
                                token_weights=weights, weighted=[0])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), calib_windows=2, out=str(tmp_path / "b"),
                         check=False))
    assert (tmp_path / "b" / "model.gguf").read_bytes() == (tmp_path / "a" / "model.gguf").read_bytes()
    path.write_text(json.dumps({**plan, "gptq": {**plan["gptq"], "token_windows": 0}}))
    with pytest.raises(EdgeqError, match="gptq.token_windows"):
        export(ExportOptions(model=str(tiny_decoder_dir), plan=str(path), out=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()
