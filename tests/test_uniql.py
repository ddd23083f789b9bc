"""UniQL: sorted MLPs, per-layer width tables, one model that llama.cpp, onnxruntime and TVM load at any rate the
bundle carries.

Everything here runs on a small synthetic Llama through the real pipeline and llama.cpp; the comparison of orders
and allocations on SmolLM2 is bench/uniql.py's job (README: UniQL).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeq.core.executor import Executor
from edgeq.core.formats import get_format
from edgeq.models import llama
from edgeq.passes.uniql_alloc import layer_shares, segmented, widths_for
from edgeq.passes.uniql_sort import channel_scores, ridge_leverage, sort_order

RATES = [0.0, 0.1, 0.25, 0.4]


@pytest.fixture(scope="module")
def env(tmp_path_factory, cache, monkeypatch_module):
    monkeypatch_module.setenv("EDGEQ_CACHE", str(cache))
    return tmp_path_factory.mktemp("uniql")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _export(out, model, **kw):
    from edgeq.api import ExportOptions, export

    return export(ExportOptions(model=str(model), out=str(out), force=True, calib_windows=1, **kw))["manifest"]


@pytest.fixture(scope="module", params=["gguf", "onnx", "tvm"])
def f32_bundle(request, env, tiny_decoder_dir):
    out = env / f"f32-{request.param}"
    m = _export(out, tiny_decoder_dir, backend=request.param, quant="f32", pruning_rates=RATES[1:])
    return out, m


@pytest.fixture(scope="module")
def source(tiny_decoder_dir):
    from edgeq.importers.loader import import_model

    return import_model(tiny_decoder_dir)


def _ids(n=96, seed=0):
    return [1] + list(np.random.default_rng(seed).integers(3, 400, n - 1))


def _kld(ref: np.ndarray, got: np.ndarray) -> float:
    from edgeq.evaluate.decoder import log_softmax64

    lr, lg = log_softmax64(ref), log_softmax64(got)
    return float(np.mean(np.sum(np.exp(lr) * (lr - lg), -1)))


def test_sorting_keeps_the_source_outputs(f32_bundle, source):
    """The sorted model at rate 0 is the source: same logits in the executor, and in the runtime (f32) the bundle's
    full width scores like the float reference."""
    from edgeq import runtime

    out, m = f32_bundle
    orders = {i: np.asarray(m["plan"]["tensors"][llama.mlp_weights(i)[0]]["order"]) for i in range(2)}
    for i, o in orders.items():
        assert sorted(o.tolist()) == list(range(512)) and o.tolist() != list(range(512))
        assert all(m["plan"]["tensors"][n]["order"] == o.tolist() for n in llama.mlp_weights(i))
    ids = _ids()
    ref = Executor(source).logits(ids)
    np.testing.assert_allclose(Executor(llama.prune_mlp(source, orders)).logits(ids), ref, atol=2e-5, rtol=0)
    with runtime.load(out, pruning_rate=0.0) as s:
        assert _kld(ref, s.logits(ids)) <= 1e-4


def test_every_rate_is_a_valid_model_that_meets_its_rate(f32_bundle, source):
    """Each rate of the table: achieved exactly in channels (so in MLP parameters), and the model the runtime loads
    at that rate computes the sorted source narrowed to the table's widths (a prefix of every layer's order)."""
    from edgeq import runtime

    out, m = f32_bundle
    table = m["pruning_rates"]
    assert [r["rate"] for r in table["rates"]] == RATES and table["full"] == [512, 512]
    assert m["plan"]["pruning"]["rates"] == table["rates"]
    ids = _ids(seed=1)
    klds = []
    for entry in table["rates"]:
        widths = entry["widths"]
        step = math.gcd(*table["align"])          # f32: one channel; TVM: whole 64-output panels
        assert sum(512 - w for w in widths) == round(entry["rate"] * 1024 / step) * step
        assert entry["achieved"] == pytest.approx(entry["rate"], abs=step / 2048 + 1e-6)
        channels = {i: np.asarray(m["plan"]["tensors"][llama.mlp_weights(i)[0]]["order"])[:w]
                    for i, w in enumerate(widths)}
        want = Executor(llama.prune_mlp(source, channels)).logits(ids)
        with runtime.load(out, pruning_rate=entry["rate"]) as s:
            got = s.logits(ids)
        assert _kld(want, got) <= 1e-4
        klds.append(_kld(Executor(source).logits(ids), got))
    assert klds[0] <= 1e-4 and klds == sorted(klds)       # more pruned, further from the source
    assert len(set(table["rates"][2]["widths"])) > 1       # the allocation gave the layers different widths


def test_widths_align_with_each_format_block(env, tiny_decoder_dir):
    """GGUF q4_0 (32-blocks), a plan putting ffn_down on q4_k (256-blocks along its input) and ONNX int4-asym (two
    32-blocks: zero points are packed two a byte): every width is a multiple of the format's step, the global rate is
    still met, and the runtime loads each bundle at every rate."""
    from edgeq import runtime

    plan = env / "k.json"
    plan.write_text(json.dumps({"preset": "q4_0", "rules": [{"match": "*.ffn_down", "format": "q4_k"}]}))
    for name, kw, block in (("q4_0", {"quant": "q4_0"}, 32), ("k", {"plan": str(plan)}, 256),
                            ("asym", {"backend": "onnx", "quant": "int4-asym"}, 64),
                            ("tvm", {"backend": "tvm", "quant": "int4"}, 64)):
        m = _export(env / name, tiny_decoder_dir, pruning_rates=[0.25, 0.5], **kw)
        downs = {m["plan"]["tensors"][llama.mlp_weights(i)[2]]["format"] for i in range(2)}
        # TVM: int4 groups of 32 along down's inputs, and whole 64-output panels of gate and up
        assert {get_format(f).slice_step for f in downs} == {32 if name == "tvm" else block}
        assert m["pruning_rates"]["align"] == [block, block]
        for entry in m["pruning_rates"]["rates"]:
            assert all(w % block == 0 and 0 < w <= 512 for w in entry["widths"])
            assert entry["achieved"] == pytest.approx(entry["rate"], abs=1e-6)
            with runtime.load(env / name, pruning_rate=entry["rate"]) as s:
                ids = _ids(24)
                full = s.logits(ids)
                s.backend.reset()          # the decode path (one token a call) computes what prefill did
                steps = np.stack([s.backend.feed([t]) for t in ids])
                assert np.isfinite(full).all() and _kld(full, steps) <= 1e-4


def test_a_rate_the_bundle_lacks_is_one_clear_error(f32_bundle, capsys):
    from edgeq.cli import main

    out, m = f32_bundle
    if m["artifacts"][0]["backend"] != "gguf":
        pytest.skip("one backend is enough: the rate is checked before a backend is chosen")
    assert main(["eval", str(out), "--pruning-rate", "0.3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"edgeq: error: {out}: carries pruning rates 0, 0.1, 0.25, 0.4, not 0.3"]
    assert main(["run", str(out), "hi", "--pruning-rate", "0.3"]) == 2


def test_a_plan_can_fix_the_widths(env, tiny_decoder_dir, source):
    """A plan with `keep` per MLP (the search issue's interface) exports the already-pruned model: layers of
    different widths, written as llama.cpp's per-layer `deci` architecture, computing the narrowed source."""
    from edgeq import runtime

    tensors = {}
    for i, k in enumerate((384, 160)):
        for n in llama.mlp_weights(i):
            tensors[n] = {"format": "f32", "keep": k}
    plan = env / "keep.json"
    plan.write_text(json.dumps({"preset": "f32", "tensors": tensors}))
    out = env / "keep"
    m2 = _export(out, tiny_decoder_dir, plan=str(plan))
    assert m2["pruning_rates"] is None
    assert m2["model"]["n_params"] == source.n_params - 3 * 256 * (128 + 352)
    from gguf import GGUFReader

    r = GGUFReader(out / "model.gguf")
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "deci"
    assert [int(r.fields["deci.feed_forward_length"].parts[i][0]) for i in r.fields["deci.feed_forward_length"].data] \
        == [384, 160]
    channels = {i: np.asarray(m2["plan"]["tensors"][llama.mlp_weights(i)[0]]["order"])[:k]
                for i, k in enumerate((384, 160))}
    ids = _ids(seed=2)
    with runtime.load(out) as s:
        assert _kld(Executor(llama.prune_mlp(source, channels)).logits(ids), s.logits(ids)) <= 1e-4

    # the file edgeq wrote is a model edgeq reads back (`edgeq export --model` of a searched GGUF): the same weights,
    # and exporting it again writes the same tensors
    from edgeq.importers.gguf import import_gguf

    back = import_gguf(out / "model.gguf")
    narrowed = llama.prune_mlp(source, channels)
    assert back.config.ffn_widths == (384, 160) and llama.mlp_widths(back) == [384, 160]
    assert back.weights.keys() == narrowed.weights.keys()
    assert all(np.array_equal(back.weights[n].numpy(), narrowed.weights[n].numpy()) for n in back.weights)
    again = env / "keep-again"
    _export(again, out / "model.gguf", quant="f32", calibration=False)
    r2 = GGUFReader(again / "model.gguf")
    assert bytes(r2.fields["general.architecture"].parts[-1]).decode() == "deci"
    assert {t.name: bytes(t.data) for t in r2.tensors} == {t.name: bytes(t.data) for t in r.tensors}


def test_a_deci_file_whose_layers_differ_in_attention_is_refused(tmp_path):
    """llama.cpp's `deci` may give layers their own head counts (or none); edgeq's layers share one attention shape,
    so such a file is one clear error, not a wrong model."""
    from edgeq.core.errors import EdgeqError

    meta = {"general.architecture": "deci", "deci.embedding_length": 64, "deci.block_count": 2,
            "deci.attention.head_count": [4, 0], "deci.feed_forward_length": [128, 96], "deci.vocab_size": 300,
            "deci.attention.layer_norm_rms_epsilon": 1e-5}
    with pytest.raises(EdgeqError, match="deci.attention.head_count that differs between layers"):
        llama.config_from_gguf(meta, set(), tmp_path / "x.gguf")
    cfg = llama.config_from_gguf({**meta, "deci.attention.head_count": [4, 4]}, set(), tmp_path / "x.gguf")
    assert (cfg.intermediate_size, cfg.ffn_widths) == (128, (128, 96))
    assert llama.expected_shapes(cfg)["model.layers.1.mlp.down_proj.weight"] == (64, 96)
    with pytest.raises(EdgeqError, match="3 values for 2 layers"):
        llama.config_from_gguf({**meta, "deci.attention.head_count": 4, "deci.feed_forward_length": [1, 2, 3]},
                               set(), tmp_path / "x.gguf")


def test_orders_and_allocations():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 48)) @ (rng.standard_normal((48, 48)) * np.exp(rng.uniform(-2, 1, 48)))
    cov = x.T @ x / len(x)
    lam = np.trace(cov) / 48
    direct = np.diag(cov @ np.linalg.inv(cov + lam * np.eye(48)))
    np.testing.assert_allclose(ridge_leverage(cov, 1.0), direct, rtol=1e-9, atol=1e-12)
    assert np.all((direct > 0) & (direct < 1))
    down = rng.standard_normal((16, 48))
    for order in ("uniql", "ridge", "leverage", "magnitude", "wanda", "random"):
        o = sort_order(channel_scores(order, down, cov, np.diag(cov), layer=3))
        assert sorted(o.tolist()) == list(range(48))
    # duplicated channels share their span: ridge leverage ranks a copy below a unique channel of equal energy
    h = rng.standard_normal((4000, 3))
    h = np.column_stack([h[:, 0], h[:, 0], h[:, 1], h[:, 2]])
    s = ridge_leverage(h.T @ h / 4000, 0.01)
    assert s[0] == pytest.approx(s[1]) and s[0] < 0.6 < s[2]
    # a channel with large activations whose down column is ~0 contributes nothing to the output: uniql and ridge
    # (in the output's metric) rank it last, leverage of C alone ranks it first
    h = rng.standard_normal((4000, 6)) * np.array([10.0, 1, 1, 1, 1, 1])
    w = rng.standard_normal((8, 6))
    w[:, 0] *= 1e-4
    cov6 = h.T @ h / 4000
    assert sort_order(channel_scores("uniql", w, cov6, np.diag(cov6), 0))[-1] == 0
    assert sort_order(channel_scores("ridge", w, cov6, np.diag(cov6), 0))[-1] == 0
    assert sort_order(channel_scores("leverage", w, cov6, np.diag(cov6), 0))[0] == 0
    # ridge leverage in the output's metric tends to wanda's order as λ grows (diag(M(M + λI)^-1) ~ diag(M)/λ, and
    # G_jj = wanda_j^2); with D C D, D = diag(|W_down[:, j]|), too: no λ takes it past wanda without a refit
    wanda = sort_order(channel_scores("wanda", down, cov, np.diag(cov), 0))
    norms = np.linalg.norm(down, axis=0)
    for m in (cov * (down.T @ down), cov * np.outer(norms, norms)):
        assert sort_order(ridge_leverage(m, 1e6)).tolist() == wanda.tolist()
        assert sort_order(ridge_leverage(m, 0.01)).tolist() != wanda.tolist()
    # every prefix of the uniql ranking removes, step by step, the channel that adds least to 1_S^T G 1_S
    g = cov * (down.T @ down)
    removed: list[int] = []
    for j in sort_order(channel_scores("uniql", down, cov, np.diag(cov), 0))[::-1][:6]:
        rest = [k for k in range(48) if k not in removed]
        inc = [g[k, k] + 2 * g[k, removed].sum() for k in rest]
        assert inc[rest.index(j)] == pytest.approx(min(inc))
        removed.append(int(j))
    # allocation: the global count met exactly with mixed steps; more important layers pruned less
    imp = np.array([0.9, 0.1, 0.3, 0.05])
    shares = layer_shares(imp, 0.25, "uniql")
    assert shares.mean() == pytest.approx(0.25) and shares[0] < shares[2] < shares[1] < shares[3]
    full, align = [1536] * 4, [32, 256, 32, 32]
    for rate in (0.05, 0.15, 0.35):
        w = widths_for(full, align, layer_shares(imp, rate, "uniql"), rate)
        assert sum(1536 - v for v in w) == round(rate * 6144 / 32) * 32
        assert all(v % a == 0 and 0 < v <= 1536 for v, a in zip(w, align))
    assert widths_for([1536] * 3, [32] * 3, layer_shares(imp[:3], 0.25, "uniform"), 0.25) == [1152] * 3
    assert math.isclose(layer_shares(np.ones(4), 0.3, "uniql").sum(), 1.2)
    # stored order: every width's best channels first, each segment in source order
    ranking = rng.permutation(96)
    stored = segmented(ranking, [64, 32, 64, 96])
    for w in (32, 64, 96):
        assert set(stored[:w].tolist()) == set(ranking[:w].tolist())
    assert stored[:32].tolist() == sorted(stored[:32].tolist()) and stored[32:64].tolist() == sorted(stored[32:64])


def test_calibration_subsets_are_disjoint():
    from edgeq.passes.calibrate import calibration_windows

    tokens = list(range(512 * 40))
    sets = [calibration_windows(tokens, 512, 4, 0, False, subset=(i, 3)) for i in range(3)]
    firsts = [{w[0] for w in s} for s in sets]
    assert all(len(f) == 4 for f in firsts) and not (firsts[0] & firsts[1] or firsts[1] & firsts[2] or
                                                    firsts[0] & firsts[2])
    assert calibration_windows(tokens, 512, 4, 0, False) == calibration_windows(tokens, 512, 4, 0, False, subset=(0, 1))


def test_a_pruned_export_calibrates_on_more_windows():
    """The channel orders are read from the calibration: a pruned export takes 8 windows unless told otherwise."""
    from edgeq.compile.options import CALIB_WINDOWS, PRUNING_CALIB_WINDOWS, ExportOptions

    from edgeq.core.plan import Plan

    assert ExportOptions().windows() == CALIB_WINDOWS == 4
    assert ExportOptions(pruning_rates=[0.15]).windows() == PRUNING_CALIB_WINDOWS == 8
    assert ExportOptions().windows(Plan(pruning={"rates": []})) == 8        # export --plan of a pruned plan
    assert ExportOptions(pruning_rates=[0.15], calib_windows=2).windows() == 2
    assert ExportOptions(calib_windows=6).windows(Plan(pruning={"rates": []})) == 6


def test_the_slicers_refuse_a_damaged_file(f32_bundle, tmp_path):
    from edgeq.runtime import gguf_slice, onnx_slice
    from edgeq.runtime.manifest import BundleError

    out, m = f32_bundle
    if m["artifacts"][0]["backend"] == "tvm":
        from edgeq.runtime.manifest import Pruning
        from edgeq.runtime.tvm_backend import load_params, pruning_cuts

        spec = json.loads(json.dumps(m["tvm"]))
        spec["pruning"][0][0]["per_channel"] = [1, 3]
        with pytest.raises(BundleError, match="splits an element"):
            pruning_cuts(out, spec, Pruning(0.5, [128, 128], [64, 64], [512, 512]))
        name = spec["pruning"][0][0]["param"]
        with pytest.raises(BundleError, match="cannot keep"):
            load_params(out / "params.safetensors", [name], {name: (0, 10**6)})
        return
    if m["artifacts"][0]["backend"] == "onnx":
        data = (out / "model.onnx").read_bytes()
        bad = tmp_path / "bad.onnx"
        recipe = m["onnx"]["pruning"]
        graph_at = data.index(b"\x3a")             # a graph field claiming 4 GB, then the real one
        for blob, why in ((data[:len(data) // 2], "runs past"), (b"\x0f" + data[1:], "wire type"),
                          (b"\x3a\xff\xff\xff\x0f" + data[graph_at:], "runs past")):
            bad.write_bytes(blob)
            with pytest.raises(BundleError, match=why):
                onnx_slice.slice_mlp(bad, tmp_path / "x.onnx", [256, 256], [512, 512], recipe)
            assert not (tmp_path / "x.onnx").exists()
        return
    slice_mlp = gguf_slice.slice_mlp
    data = (out / "model.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    for blob, why in ((data[:4000], "past the end"), (b"GGUF\x03\0\0\0" + b"\xff" * 60, "implausible"),
                      (b"GGJT" + data[4:], "not a GGUF file")):
        bad.write_bytes(blob)
        with pytest.raises(BundleError, match=why):
            slice_mlp(bad, tmp_path / "x.gguf", [256, 256], [1, 1])
        assert not (tmp_path / "x.gguf").exists()


def test_the_hil_runner_loads_a_rate(f32_bundle):
    """The device runner (a clean process running only the staged runtime) loads the bundle at a rate: its full
    width matches the reference outputs as the host's check did, a pruned rate runs and differs from them by what
    the pruning costs, and a rate the bundle lacks is the runtime's one-line error."""
    from edgeq.devices import checks, open_device

    out, m = f32_bundle
    if m["artifacts"][0]["backend"] != "gguf":
        pytest.skip("the runner is backend-independent; one backend is enough")
    dev = open_device("local")
    try:
        full = checks.run_reference(dev, out, pruning_rate=0.0)
        assert checks.assert_outputs_match(out, full)["kld_mean"] <= 1e-4
        pruned = checks.run_reference(dev, out, pruning_rate=0.4)
        assert pruned.ok and checks.compare(out, pruned)["kld_mean"] > 1e-3
        missing = checks.run_reference(dev, out, pruning_rate=0.3)
        assert not missing.ok and "carries pruning rates 0, 0.1, 0.25, 0.4, not 0.3" in missing.error
    finally:
        dev.close()


def test_recovery_merges_into_weights_that_still_nest(env, tiny_decoder_dir, source):
    """--recover-steps: masked LoRA steps merged into the weights (they differ from the sorted source), and every
    rate of the bundle is still the merged model narrowed to the table's widths (the updates live in each channel's
    own rows and column)."""
    pytest.importorskip("torch")
    from edgeq import runtime
    from edgeq.importers.gguf import import_gguf

    out = env / "recovered"
    m = _export(out, tiny_decoder_dir, quant="f32", pruning_rates=[0.25, 0.5], recover_steps=3)
    rec = next(p for p in m["passes"] if p["pass"] == "uniql_recover")
    assert rec["steps"] == 3 and sum(len(v) for v in rec["loss_by_rate"].values()) == 3
    assert m["plan"]["pruning"]["recovery"]["adapted"] == 2 * 7
    merged = import_gguf(out / "model.gguf")
    order = np.asarray(m["plan"]["tensors"][llama.mlp_weights(0)[0]]["order"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(merged.weights[q].numpy(), source.weights[q].numpy(), atol=1e-7)
    ids = _ids(seed=3)
    for entry in m["pruning_rates"]["rates"]:
        narrowed = llama.prune_mlp(merged, {i: np.arange(w) for i, w in enumerate(entry["widths"])})
        with runtime.load(out, pruning_rate=entry["rate"]) as s:
            assert _kld(Executor(narrowed).logits(ids), s.logits(ids)) <= 1e-4
    assert order.shape == (512,)


# --- attention (--prune-attention): ONNX narrows the heads, GGUF and TVM refuse ---------------------------------

def _graph_with_pairs(source, arrays: dict, pairs: dict[int, list]):
    """The source's graph over `arrays`, its rope nodes told which source pair each stored pair is."""
    g = llama.graph_from_arrays(source.config, {**{n: source.weights[n].numpy() for n in source.weights}, **arrays})
    for node in g.nodes:
        if node.op == "rope":
            node.attrs["pairs"] = pairs[int(node.outputs[0][1:].split(".")[0])]
    return g


def test_attention_sort_keeps_the_outputs_and_nests():
    """Sorted Q/K pairs (one order per KV group, pairs kept together) and V/O rotated by the SVD of W_V·C^½: the
    same outputs at full width (f32), every narrower prefix a valid model, and the stored V dimensions ordered by
    their energy on the calibration inputs."""
    from edgeq.models.recipes.synthetic import random_llama, tiny_config
    from edgeq.passes.uniql_attention import pair_order, value_rotation

    cfg = tiny_config(vocab_size=400, n_heads=4, n_kv_heads=2, head_dim=32, attention_bias=True)
    g = random_llama(cfg, seed=3, scale=0.08)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, cfg.hidden_size)) * np.exp(rng.uniform(-1, 1, cfg.hidden_size))
    cov = x.T @ x / len(x)
    pairs, rots = {}, {}
    for i in range(cfg.n_layers):
        q, k, v, _ = (g.weights[n].numpy() for n in llama.attention_weights(i))
        pairs[i] = pair_order(q, k, cov, cfg.n_heads, cfg.n_kv_heads)
        rots[i] = value_rotation(v, cov, cfg.n_kv_heads)
        assert pairs[i].shape == (2, 16) and pairs[i].tolist() != [list(range(16))] * 2
        np.testing.assert_allclose(np.einsum("gij,gik->gjk", rots[i], rots[i]), np.stack([np.eye(32)] * 2),
                                   atol=1e-10)
        vr = np.einsum("gde,gdh->geh", rots[i], v.astype(np.float64).reshape(2, 32, -1))    # stored V rows
        energy = np.einsum("gdh,hx,gdx->gd", vr, cov, vr)
        assert np.all(np.diff(energy, axis=1) <= 1e-9)              # best V dimensions first
    s = llama.reshape_attention(g, pairs, rots)
    ids = _ids(48)
    ref = Executor(g).logits(ids)
    np.testing.assert_allclose(Executor(s).logits(ids), ref, atol=2e-5, rtol=0)
    assert llama.attention_widths(s) == ([32, 32], [32, 32])
    errs = []
    for w in (24, 16, 8):
        narrow = llama.reshape_attention(s, keep=([w, w], [w, w]))
        assert llama.attention_widths(narrow) == ([w, w], [w, w])
        errs.append(float(np.abs(Executor(narrow).logits(ids) - ref).mean()))
    assert errs == sorted(errs) and errs[0] > 0                    # narrower is further from the source


@pytest.fixture(scope="module")
def attention_bundle(env, tiny_decoder_dir):
    out = env / "att-onnx"
    # Q/K and V at the MLPs' rate (not the default split, which keeps V whole): every array the loader narrows
    return out, _export(out, tiny_decoder_dir, backend="onnx", quant="f32", pruning_rates=RATES[1:],
                        prune_attention=True, prune_attention_ratio=(1, 1))


def test_onnx_prunes_attention_at_each_rate(attention_bundle, source):
    """Each rate's Q/K and V widths meet the rate (in head dimensions, so in attention parameters) and nest; the
    sorted bundle at rate 0 is the source; onnxruntime at every rate computes what the executor computes on the
    bundle's own sorted weights narrowed to that rate's widths."""
    import onnx
    from onnx import numpy_helper

    from edgeq import runtime

    out, m = attention_bundle
    table = m["pruning_rates"]
    assert table["attention"] == {"full_qk": [64, 64], "align_qk": [2, 2], "full_v": [64, 64], "align_v": [1, 1]}
    prev = None
    for e in table["rates"]:
        assert abs(e["achieved_attention"] - e["rate"]) <= 2 / 256 and all(w % 2 == 0 for w in e["qk"])
        if prev is not None:
            assert all(a <= b for a, b in zip(e["qk"] + e["v"], prev["qk"] + prev["v"]))
        prev = e
    model = onnx.load(str(out / m["artifacts"][0]["path"]))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    arrays = {n: inits[n].T for i in range(2) for n in llama.attention_weights(i) + llama.mlp_weights(i)}
    stored = _graph_with_pairs(source, arrays, {i: inits[f"model.layers.{i}.self_attn.rope_pairs"].tolist()
                                                for i in range(2)})
    ids = _ids(64, seed=2)
    ref = Executor(source).logits(ids)
    np.testing.assert_allclose(Executor(stored).logits(ids), ref, atol=2e-5, rtol=0)
    for e in table["rates"]:
        narrow = llama.prune_mlp(llama.reshape_attention(stored, keep=(e["qk"], e["v"])),
                                 {i: np.arange(w) for i, w in enumerate(e["widths"])})
        with runtime.load(out, pruning_rate=e["rate"]) as s:
            got = s.backend.logits(ids)
        np.testing.assert_allclose(got, Executor(narrow).logits(ids), atol=5e-5, rtol=0)
        if e["rate"] == 0:
            np.testing.assert_allclose(got, ref, atol=5e-5, rtol=0)


def test_attention_pruning_aligns_with_int4_blocks(env, tiny_decoder_dir):
    """ONNX int4 (32-blocks along the output projection's input): V widths are whole blocks per head, and
    onnxruntime loads the bundle at every rate."""
    from edgeq import runtime

    out = env / "att-int4"
    m = _export(out, tiny_decoder_dir, backend="onnx", quant="int4", pruning_rates=[0.25, 0.5], prune_attention=True,
                prune_attention_ratio=(1, 1))
    table = m["pruning_rates"]
    assert table["attention"]["align_v"] == [32, 32]
    assert any(w < 64 for e in table["rates"] for w in e["v"])
    for e in table["rates"]:
        assert all(w % 32 == 0 for w in e["v"])
        with runtime.load(out, pruning_rate=e["rate"]) as s:
            assert np.isfinite(s.backend.logits(_ids(16))).all()


@pytest.mark.parametrize("backend", ["gguf", "tvm"])
def test_attention_pruning_is_refused_where_the_runtime_cannot_carry_it(env, tiny_decoder_dir, backend, capsys):
    from edgeq.cli import main

    assert main(["export", "--model", str(tiny_decoder_dir), "-o", str(env / f"att-{backend}"), "--backend", backend,
                 "--quant", "f32", "--pruning-rates", "0.25", "--prune-attention"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prune-attention is not available for backend" in err[0]
    assert not (env / f"att-{backend}").exists()


def test_attention_ratio_splits_the_rate_in_parameters(env, tiny_decoder_dir, source):
    """--prune-attention-ratio 0.5,0.5: the attention loses half the MLPs' share of its head dimensions, and the rate
    is the share of all the layers' prunable parameters removed."""
    m = _export(env / "att-ratio", tiny_decoder_dir, backend="onnx", quant="f32", pruning_rates=[0.3],
                prune_attention=True, prune_attention_ratio=(0.5, 0.5))
    c = source.config
    per_dim = c.hidden_size * (c.n_heads + c.n_kv_heads)          # one Q/K or V dimension per head, every head
    full = 3 * c.hidden_size * 512 * 2 + per_dim * 2 * 64 * 2
    e = next(x for x in m["pruning_rates"]["rates"] if x["rate"] == 0.3)
    removed = 3 * c.hidden_size * sum(512 - w for w in e["widths"]) + per_dim * sum(
        64 - w for w in e["qk"] + e["v"])
    assert abs(removed / full - 0.3) < 0.01
    assert abs(e["achieved_attention"] - 0.5 * e["achieved"]) < 0.02


def test_narrowing_an_unsorted_attention_names_its_pairs(source):
    """Narrowing heads that were never sorted keeps each head's first pairs with their own frequencies."""
    narrow = llama.reshape_attention(source, keep=([48, 48], [64, 64]))
    assert all(n.attrs["pairs"] == [list(range(32))] * 2 for n in narrow.nodes if n.op == "rope")
    assert np.isfinite(Executor(narrow).logits(_ids(16))).all()


@pytest.fixture(scope="module")
def offset_mlp_dir(session_tmp):
    """A tiny Llama whose MLP channels have a mean: up = gate in every layer, so h = silu(g)·g is mostly positive
    (a random model's h averages to about zero, and a removed channel's mean would be nothing to compensate)."""
    import dataclasses

    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config

    g = random_llama(tiny_config(vocab_size=400, tied_embeddings=True, context_length=512), seed=2, scale=0.08)
    for i in range(g.config.n_layers):
        gate, up, _ = llama.mlp_weights(i)
        g.weights[up] = dataclasses.replace(g.weights[up], load=g.weights[gate].load)
    return graph_to_hf_folder(g, session_tmp("offset-mlp") / "m", byte_level_spec(400))


def _strip_biases(src, dst):
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    del m["pruning_rates"]["compensate"]
    for e in m["pruning_rates"]["rates"]:
        e.pop("bias", None)
    (dst / "manifest.json").write_text(json.dumps(m))


def test_mean_compensation_lowers_the_error_and_keeps_rate_0(env, offset_mlp_dir, tmp_path):
    """--prune-compensate (GGUF): each rate > 0 carries one ffn_down bias per layer, W_down[:, removed]·E[h_removed];
    llama.cpp loads it (llama and deci) and the output moves closer to the source than the same widths without it;
    rate 0 is the source, unchanged."""
    from edgeq import runtime
    from edgeq.importers.loader import import_model
    from edgeq.passes.calibrate import calibration_tokens

    out = env / "comp"
    m = _export(out, offset_mlp_dir, backend="gguf", quant="f32", pruning_rates=RATES[1:], prune_compensate=True)
    table = m["pruning_rates"]
    assert table["compensate"]["width"] == 256 and "bias" not in table["rates"][0]
    assert all(len(e["bias"]) == 2 for e in table["rates"][1:])
    assert any(p.get("centered") for p in m["passes"] if p["pass"] == "uniql_sort")
    _strip_biases(out, tmp_path / "plain")
    src = import_model(offset_mlp_dir)
    tokens, _, _ = calibration_tokens(src)
    ids = [1] + tokens[3000:3160]                   # beyond the one calibration window
    ref = Executor(src).logits(ids)
    for e in table["rates"]:
        with runtime.load(out, pruning_rate=e["rate"]) as s:
            with_bias = _kld(ref, s.logits(ids))
        if e["rate"] == 0:
            assert with_bias <= 1e-4
            continue
        with runtime.load(tmp_path / "plain", pruning_rate=e["rate"]) as s:
            without = _kld(ref, s.logits(ids))
        assert with_bias < 0.9 * without, (e["rate"], with_bias, without)


def test_a_damaged_bias_table_is_one_clear_error(env, offset_mlp_dir, tmp_path):
    """The biases are checked before anything loads: one per layer, exactly the model's width of finite float32
    within bounds; ONNX and TVM exports refuse --prune-compensate in one line."""
    import base64
    import shutil

    from edgeq.cli import main
    from edgeq.runtime.manifest import BundleError, read_manifest

    out = env / "comp"
    if not out.exists():
        _export(out, offset_mlp_dir, backend="gguf", quant="f32", pruning_rates=RATES[1:], prune_compensate=True)
    good = read_manifest(out)["pruning_rates"]["rates"][1]["bias"]
    nan = base64.b64encode(np.full(256, np.nan, "<f4").tobytes()).decode()
    huge = base64.b64encode(np.full(256, 1e9, "<f4").tobytes()).decode()
    for k, (bias, why) in enumerate([(good[:1], "must be 2 base64"), ([good[0], good[1][:-4]], "must be 2 base64"),
                                     ([good[0], "!" * len(good[1])], "not base64"),
                                     ([good[0], nan], "finite numbers"), ([huge, good[1]], "finite numbers")]):
        bad = tmp_path / f"bad{k}"
        shutil.copytree(out, bad)
        m = json.loads((bad / "manifest.json").read_text())
        m["pruning_rates"]["rates"][1]["bias"] = bias
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=why):
            from edgeq import runtime

            runtime.load(bad, pruning_rate=RATES[1])
    for backend in ("onnx", "tvm"):
        assert main(["export", "--model", str(offset_mlp_dir), "-o", str(tmp_path / backend), "--backend", backend,
                     "--quant", "f32", "--pruning-rates", "0.25", "--prune-compensate", "--calib-windows", "1"]) == 2
        assert not (tmp_path / backend).exists()
