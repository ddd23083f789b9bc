"""Low-rank error compensation (QERA): the closed form, ranks in the ILP, and the adapter GGUF in llama.cpp."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from edgeq.passes.allocate import min_feasible_bytes, solve
from edgeq.passes.lowrank_compensate import branch, branch_costs, scaling
from edgeq.passes.sensitivity import CostTable, Option
from edgeq.targets.gguf.presets import GGUF_PRESETS


def _layer(seed=0, out_dim=96, in_dim=64, tokens=4000):
    """A quantization-like error and inputs with very unequal, correlated channels (as in LLM activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((in_dim, in_dim)) * np.exp(rng.uniform(-3, 2, in_dim))[None, :]
    x = rng.standard_normal((tokens, in_dim)) @ mix.T
    cov = x.T @ x / tokens
    e = 0.01 * rng.standard_normal((out_dim, in_dim))
    return e, cov


def _weighted(e, cov):
    return float(np.einsum("ij,jk,ik->", e, cov, e))


def test_exact_branch_is_the_closed_form_and_beats_diag_and_identity():
    e, cov = _layer()
    k = 8
    res = {}
    for mode in ("exact", "diag", "identity"):
        sc = scaling(mode, e.shape[1], cov, np.diag(cov))
        a, b = branch(e, sc, k)
        assert a.shape == (k, e.shape[1]) and b.shape == (e.shape[0], k) and a.dtype == np.float16
        direct = _weighted(e - b.astype(np.float64) @ a.astype(np.float64), cov)
        assert branch_costs(e, a, b, [k], cov, None)[k] == pytest.approx(direct, rel=1e-6)
        res[mode] = direct
    # closed form: what is left is the tail of E·C^½'s spectrum (up to the F16 rounding of A and B)
    lam, v = np.linalg.eigh(cov)
    s = np.linalg.svd(e @ (v * np.sqrt(lam)) @ v.T, compute_uv=False)
    assert res["exact"] == pytest.approx(float(np.sum(s[k:] ** 2)), rel=1e-3)
    assert res["exact"] <= res["diag"] <= res["identity"] < _weighted(e, cov)
    # nested prefixes: more rank, less error
    a, b = branch(e, scaling("exact", e.shape[1], cov), 16)
    costs = branch_costs(e, a, b, [0, 4, 8, 16], cov, None)
    assert costs[0] == pytest.approx(_weighted(e, cov)) and costs[0] > costs[4] > costs[8] > costs[16]


def test_fisher_weighted_branch_costs_are_the_weighted_residual():
    """With per-row Fisher weights F the branch's residual cost is Σ_o F_o ((E − BA) C (E − BA)ᵀ)_oo, for every
    C the sensitivity pass uses (full, diagonal, identity)."""
    e, cov = _layer(seed=2)
    rows = np.random.default_rng(5).uniform(0.0, 3.0, e.shape[0])
    sc = scaling("exact", e.shape[1], cov, np.diag(cov))
    a, b = branch(e, sc, 12)
    for c, full, diag in ((cov, cov, None), (np.diag(np.diag(cov)), None, np.diag(cov)),
                          (np.eye(e.shape[1]), None, None)):
        got = branch_costs(e, a, b, [0, 4, 12], full, diag, rows=rows)
        for r in (0, 4, 12):
            res = e - b[:, :r].astype(np.float64) @ a[:r].astype(np.float64)
            assert got[r] == pytest.approx(float(np.diag(res @ c @ res.T) @ rows), rel=1e-6)


def test_randomized_decomposition_matches_the_full_svd_on_a_wide_layer():
    e, cov = _layer(seed=1, out_dim=300, in_dim=200)
    sc = scaling("exact", 200, cov)
    lam, v = np.linalg.eigh(cov)
    s = np.linalg.svd(e @ (v * np.sqrt(lam)) @ v.T, compute_uv=False)
    a, b = branch(e, sc, 8)                         # 200 > 4·8 + 16: the randomized path
    assert branch_costs(e, a, b, [8], cov, None)[8] == pytest.approx(float(np.sum(s[8:] ** 2)), rel=2e-2)
    a2, b2 = branch(e, sc, 8)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)           # seeded: same bytes every time


def _rank_table(rng, n_tensors=5):
    options = {}
    for i in range(n_tensors):
        size = int(rng.integers(50, 300))
        opts = []
        for bits in sorted(rng.choice(np.arange(2, 9), 3, replace=False)):
            base = Option(f"f{bits}", int(size * bits), float(rng.uniform(0.5, 1.5) * 2.0 ** -bits * size))
            opts.append(base)
            for r in (4, 8):
                extra = int(rng.integers(20, 80)) * r // 4
                opts.append(Option(base.format, base.bytes + extra, base.cost * rng.uniform(0.3, 0.95) ** (r // 4),
                                   rank=r, branch_bytes=extra))
        options[f"t{i}"] = opts
    return CostTable(options, 100, n_params=1000, info={"formats": []})


def _brute(table, budget, overhead, ties=()):
    names = list(table.options)
    best = None
    for combo in itertools.product(*(table.options[n] for n in names)):
        pick = dict(zip(names, combo))
        if any(len({(pick[m].format, pick[m].rank) for m in g}) > 1 for g in ties):
            continue
        size = table.fixed_bytes + sum(o.bytes for o in combo) + (overhead if any(o.rank for o in combo) else 0)
        if size <= budget:
            cost = sum(o.cost for o in combo)
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
def test_ilp_with_ranks_matches_brute_force(seed):
    """Ranks are options; the adapter file's fixed bytes are paid only when some branch is chosen."""
    rng = np.random.default_rng(seed)
    table = _rank_table(rng, n_tensors=4)
    overhead = 150
    ties = [["t0", "t1"]] if seed % 2 else []
    if ties:
        table.options["t1"] = [Option(o.format, o.bytes * 2, o.cost * 3, o.rank, o.branch_bytes)
                               for o in table.options["t0"]]
    lo = min_feasible_bytes(table, ties)
    hi = table.fixed_bytes + sum(max(o.bytes for o in v) for v in table.options.values()) + overhead
    branches_used = False
    for budget in np.linspace(lo, hi, 6).astype(int):
        alloc = solve(table, int(budget), ties, adapter_overhead=overhead)
        used = any(o.rank for o in alloc.choice.values())
        branches_used |= used
        assert alloc.total_bytes == (table.fixed_bytes + sum(o.bytes for o in alloc.choice.values())
                                     + (overhead if used else 0)) <= budget
        for g in ties:
            assert len({(alloc.choice[m].format, alloc.choice[m].rank) for m in g}) == 1
        assert alloc.total_cost == pytest.approx(_brute(table, int(budget), overhead, ties), rel=1e-9)
    assert branches_used


# --- the adapter GGUF in llama.cpp ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from edgeq.core.plan import Plan, TensorPlan
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
    from edgeq.runtime.tokenizer import spec_to_json
    from edgeq.targets.gguf import write_gguf

    cfg = tiny_config(n_layers=2, vocab_size=384, tied_embeddings=True)
    graph = random_llama(cfg, seed=7, scale=0.08)
    path = tmp_path_factory.mktemp("tiny-lr") / "tiny-f32.gguf"
    write_gguf(graph, Plan(tensors={n: TensorPlan("f32") for n in graph.weights}), path,
               spec_to_json(byte_level_spec(cfg.vocab_size)))
    return path


def test_adapter_gguf_moves_llama_cpp_towards_the_float_reference(tiny_gguf, tmp_path, monkeypatch):
    """A q2_k plan with rank-64 branches on every linear weight: llama.cpp loads the adapter and gets closer.

    (Quantization error of random weights is nearly white, so only a large rank shows a clear gain here.)
    """
    from edgeq import runtime
    from edgeq.api import ExportOptions, export
    from edgeq.core.executor import Executor
    from edgeq.core.plan import Plan, TensorPlan
    from edgeq.evaluate.decoder import compare_logits
    from edgeq.importers.gguf import import_gguf
    from edgeq.runtime.gguf_backend import LlamaCppBackend

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    graph = import_gguf(tiny_gguf)
    plan = Plan(tensors={n: TensorPlan("f32" if len(t.shape) == 1 else "q8_0" if "embed" in n else "q2_k",
                                       rank=64 if len(t.shape) == 2 and "embed" not in n else 0)
                         for n, t in graph.weights.items()}, search={"lowrank_scaling": "exact", "ranks": [64]})
    plan.save(tmp_path / "plan.json")
    said = []
    export(ExportOptions(model=str(tiny_gguf), plan=str(tmp_path / "plan.json"), out=str(tmp_path / "b"),
                         calib_windows=2, check=False), log=said.append)
    # stock llama.cpp does not read the manifest: the export and the report name the flag it needs
    assert any("--lora adapter.gguf" in line for line in said)
    assert "llama-cli -m model.gguf --lora adapter.gguf" in (tmp_path / "b" / "report.md").read_text()
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    adapter = [a for a in m["artifacts"] if a.get("role") == "adapter"]
    assert adapter and (tmp_path / "b" / "adapter.gguf").stat().st_size == adapter[0]["bytes"]
    from gguf import GGUFReader

    r = GGUFReader(tmp_path / "b" / "adapter.gguf")
    assert str(bytes(r.fields["general.type"].parts[-1]), "utf-8") == "adapter"
    assert len(r.tensors) == 2 * 7 * 2                   # A and B for 7 linear weights in 2 layers

    rng = np.random.default_rng(0)
    ids = [[1] + rng.integers(3, 384, 63).tolist() for _ in range(2)]
    ref = Executor(graph).logits_many(ids)
    with runtime.load(tmp_path / "b", n_ctx=128) as s:            # the runtime applies the adapter itself
        with_branch = compare_logits(ref, [s.logits(i) for i in ids])
    plain = LlamaCppBackend(tmp_path / "b" / "model.gguf", n_ctx=128)
    try:
        without = compare_logits(ref, [plain.logits(i) for i in ids])
    finally:
        plain.close()
    assert with_branch["kld_mean"] < 0.7 * without["kld_mean"], (with_branch, without)

    # the same plan writes the same adapter bytes
    export(ExportOptions(model=str(tiny_gguf), plan=str(tmp_path / "plan.json"), out=str(tmp_path / "b2"),
                         calib_windows=2, check=False))
    assert (tmp_path / "b2" / "adapter.gguf").read_bytes() == (tmp_path / "b" / "adapter.gguf").read_bytes()


def test_budget_counts_the_adapter(tiny_gguf, tmp_path, monkeypatch):
    """With --ranks the ILP may buy branches; model + adapter files stay within the budget and as planned."""
    from edgeq.api import ExportOptions, export

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    # (the plain output error: on this random tiny model the Fisher-weighted costs buy no branch at 3.6 bpw)
    res = export(ExportOptions(model=str(tiny_gguf), bpw=3.6, ranks=[0, 8, 16], formats=["q2_k", "q3_k", "q4_0"],
                               out=str(tmp_path / "b"), calib_windows=2, check=False, cost="output"))
    s = res["manifest"]["plan"]["search"]
    files = sum(p.stat().st_size for p in (tmp_path / "b").glob("*.gguf"))
    assert files <= s["predicted_bytes"] <= s["budget_bytes"]
    assert s["predicted_bytes"] - files < 32                 # only the adapter's final padding is estimated
    assert s["branches"] > 0 and (tmp_path / "b" / "adapter.gguf").is_file()


# --- DynaQuant-style allocator ----------------------------------------------------------------------

def test_dynaquant_meets_the_budget(tiny_gguf, tmp_path, monkeypatch):
    """A learned plan of real GGUF types fits the budget, nearly fills it, and predicts its file size."""
    pytest.importorskip("torch")
    from edgeq.api import ExportOptions, export
    from edgeq.core.formats import FORMATS

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    res = export(ExportOptions(model=str(tiny_gguf), bpw=4.5, method="dynaquant", out=str(tmp_path / "b"),
                               calib_windows=2, check=False))
    plan = res["manifest"]["plan"]
    s = plan["search"]
    size = (tmp_path / "b" / "model.gguf").stat().st_size
    assert s["method"] == "dynaquant" and size == s["predicted_bytes"] <= s["budget_bytes"]
    assert size >= 0.95 * s["budget_bytes"]                          # the repair fills the budget
    assert s["history"][-1]["tau"] < s["history"][0]["tau"]          # annealed towards one-hot
    used = {t["format"] for t in plan["tensors"].values()}
    assert used <= set(FORMATS) and len(used - {"f32"}) > 1


def test_dynaquant_impossible_budget_is_one_clear_error(tiny_gguf, tmp_path, monkeypatch):
    from edgeq.api import ExportOptions, export
    from edgeq.core.errors import EdgeqError

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgeqError, match="below the smallest feasible size"):
        export(ExportOptions(model=str(tiny_gguf), bpw=1.0, method="dynaquant", out=str(tmp_path / "b"), check=False))
    assert not (tmp_path / "b").exists()


# --- the export report's Pareto plot -----------------------------------------------------------------

def test_budgeted_export_report_plots_the_plan_beside_measured_presets(tiny_gguf, tmp_path, monkeypatch):
    from edgeq.api import ExportOptions, export
    from edgeq.evaluate.bundle import evaluate_bundle

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    export(ExportOptions(model=str(tiny_gguf), quant="q4_0", out=str(tmp_path / "p"), calib_windows=2, check=False))
    ev = evaluate_bundle(tmp_path / "p", ctx=256, chunks=2, reference=str(tiny_gguf), record=False)  # caches the point
    res = export(ExportOptions(model=str(tiny_gguf), bpw=5.0, out=str(tmp_path / "b"), calib_windows=2))
    par = res["measurements"]["pareto"]
    assert par["ctx"] == 256 and par["chunks"] == 2
    assert par["presets"]["q4_0"]["kld_mean"] == pytest.approx(ev["kld_mean"])
    (label, point), = par["plan"].items()
    assert label.startswith("ilp @") and point["bpw"] <= 5.0 and point["kld_mean"] > 0
    report = (tmp_path / "b" / "report.md").read_text()
    assert "![bits per weight vs KLD](pareto.png)" in report and "| q4_0 |" in report
    assert (tmp_path / "b" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # and its speed beside the preset whose bytes are nearest, both files timed in llama.cpp
    sp = res["measurements"]["speed"]
    assert sp["runtime"] == "gguf" and sp["plan"]["bytes"] == (tmp_path / "b" / "model.gguf").stat().st_size
    near = sp["preset"]
    assert near["name"] in GGUF_PRESETS and near["name"] not in ("f32", "f16", "bf16")
    for v in (sp["plan"], near):
        assert v["decode_tps"] > 0 and v["prefill_tps"] > 0
    assert sp["decode_ratio"] == pytest.approx(sp["plan"]["decode_tps"] / near["decode_tps"], rel=1e-2)
    assert "## Speed beside the preset of the nearest bytes" in report and f"| {near['name']} |" in report


# --- Fisher-weighted costs ----------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_fisher_backward_is_torch_autograd_of_the_executor(tied):
    """The numpy backward (passes/fisher.py) gives autograd's gradients at every linear output and lookup, through
    a forward that is the executor's own (GQA attention, RoPE with llama3 scaling, SwiGLU, RMSNorm, tied head)."""
    torch = pytest.importorskip("torch")
    from edgeq.models.recipes.synthetic import random_llama, tiny_config
    from edgeq.passes.fisher import _sample, _Tape, backward
    from edgeq.passes.torch_forward import torch_forward as forward

    scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = tiny_config(n_layers=2, vocab_size=384, tied_embeddings=tied, rope_scaling=None if tied else scaling)
    graph = random_llama(cfg, seed=3, scale=0.08)
    ids = [1] + np.random.default_rng(0).integers(3, 384, 47).tolist()
    tape = _Tape(graph)
    logits = tape.forward(ids)
    sampled, dlogits = _sample(logits, np.random.default_rng(0))
    linear, lookup = backward(tape, ids, dlogits)
    weights = {n: torch.from_numpy(np.array(t.numpy(), dtype=np.float32)) for n, t in graph.weights.items()}
    keep: dict = {}
    out = forward(graph, ids, weights, torch, keep)
    np.testing.assert_allclose(out.detach().numpy(), logits, rtol=1e-4, atol=1e-4)
    logp = torch.log_softmax(out.double(), -1)
    (-logp[torch.arange(len(ids)), torch.from_numpy(sampled)].sum()).backward()
    assert set(linear) == {n for (k, n) in keep if k == "linear"} and len(linear) == 7 * cfg.n_layers + 1
    for name, g in linear.items():
        want = keep[("linear", name)].grad.numpy()
        np.testing.assert_allclose(g, want, rtol=2e-3, atol=2e-3 * float(np.abs(want).max())), name
    want = keep[("lookup", "model.embed_tokens.weight")].grad.numpy()
    np.testing.assert_allclose(lookup["model.embed_tokens.weight"], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert sampled.min() >= 0 and sampled.max() < cfg.vocab_size


def test_fisher_weights_are_per_output_channel():
    from edgeq.models.recipes.synthetic import random_llama, tiny_config
    from edgeq.passes.fisher import output_fisher
    from edgeq.passes.sensitivity import output_error

    cfg = tiny_config(n_layers=2, vocab_size=384, tied_embeddings=True)
    graph = random_llama(cfg, seed=3, scale=0.08)
    ids = [1] + np.random.default_rng(0).integers(3, 384, 47).tolist()
    f = output_fisher(graph, [ids, ids[::-1]])
    q = "model.layers.1.self_attn.q_proj.weight"
    assert f[q].shape == (cfg.hidden_size,) and (f[q] >= 0).all() and f[q].sum() > 0
    assert f["model.embed_tokens.weight"].shape == (cfg.vocab_size,)
    assert f["lookup:model.embed_tokens.weight"].shape == (cfg.hidden_size,)
    assert output_fisher(graph, [ids, ids[::-1]])[q].tobytes() == f[q].tobytes()     # seeded: the same twice
    # the weighted cost is Σ_o F_o (ΔW C ΔWᵀ)_oo
    rng = np.random.default_rng(1)
    dw = rng.standard_normal((cfg.hidden_size, cfg.hidden_size)).astype(np.float32)
    c = np.cov(rng.standard_normal((cfg.hidden_size, 500))).astype(np.float32)
    want = float(np.diag(dw.astype(np.float64) @ c @ dw.T) @ f[q])
    assert output_error(dw, c, None, f[q]) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_fisher_streams_a_segment_at_a_time_and_costs_equal_the_whole(tied):
    """The statistics come top layer first, each weight's once and final, in pieces no bigger than a few
    weights; the gradients equal one whole backward per window; the cost table built while streaming is the
    one built from every statistic at once (same options, same order)."""
    from edgeq.core.formats import get_format
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
    from edgeq.passes.calibrate import collect
    from edgeq.passes.fisher import FisherSource, _sample, _Tape, backward
    from edgeq.runtime.tokenizer import spec_to_json
    from edgeq.passes.sensitivity import compute_costs
    from edgeq.targets.gguf.layout import gguf_layout

    cfg = tiny_config(n_layers=3, vocab_size=384, tied_embeddings=tied)
    graph = random_llama(cfg, seed=3, scale=0.08)
    rng = np.random.default_rng(0)
    wins = [[1] + rng.integers(3, 384, 47).tolist(), [1] + rng.integers(3, 384, 31).tolist()]
    src = FisherSource(graph, wins)
    parts = list(src.stream())
    keys = [k for p in parts for k in p]
    assert len(keys) == len(set(keys)) and len(parts) >= 2 * cfg.n_layers
    linears = src.linear_weights()
    assert max(sum(1 for k in p if k in linears) for p in parts) <= 4          # q,k,v,o or gate,up,down
    first = {k.split(".")[2] for k in parts[1] if k.startswith("model.layers.")}
    assert first == {str(cfg.n_layers - 1)}                                    # the top layer first
    whole = src.collect()
    tape, r, n = _Tape(graph), np.random.default_rng(0), sum(map(len, wins))
    sums: dict = {}
    for w in wins:
        lin, look = backward(tape, w, _sample(tape.forward(w), r)[1])
        for k, g in {**lin, **{f"lookup:{k}": v for k, v in look.items()}}.items():
            sums[k] = sums.get(k, 0) + np.square(g, dtype=np.float64).sum(0)
    for k, v in sums.items():
        np.testing.assert_allclose(whole[k], v / n, rtol=1e-5)
    cal = collect(graph, wins, max_full=0)
    fmts = [get_format(f) for f in ("q8_0", "q4_0", "iq4_nl")]
    layout = gguf_layout(graph, spec_to_json(byte_level_spec(cfg.vocab_size)))
    a = compute_costs(graph, fmts, cal, layout, fisher=src)
    b = compute_costs(graph, fmts, cal, layout, fisher=whole)
    assert list(a.options) == list(b.options) == [k for k, t in graph.weights.items() if len(t.shape) == 2]
    for name in a.options:
        assert [(o.format, o.bytes) for o in a.options[name]] == [(o.format, o.bytes) for o in b.options[name]]
        np.testing.assert_allclose([o.cost for o in a.options[name]], [o.cost for o in b.options[name]], rtol=1e-6)


def test_fisher_cost_plan_meets_the_budget(tiny_gguf, tmp_path, monkeypatch):
    from edgeq.api import ExportOptions, export
    from edgeq.core.errors import EdgeqError

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    res = export(ExportOptions(model=str(tiny_gguf), bpw=5.0, cost="fisher", out=str(tmp_path / "b"),
                               calib_windows=2, check=False))
    s = res["manifest"]["plan"]["search"]
    assert "Fisher" in s["cost"] and (tmp_path / "b" / "model.gguf").stat().st_size == s["predicted_bytes"]
    assert s["predicted_bytes"] <= s["budget_bytes"]
    assert any(r["pass"] == "fisher" for r in res["manifest"]["passes"])
    # Fisher costs combine with --ranks: branch options are Fisher-weighted too, model + adapter within budget
    res = export(ExportOptions(model=str(tiny_gguf), bpw=5.0, cost="fisher", ranks=[0, 8], out=str(tmp_path / "c"),
                               calib_windows=2, check=False))
    s = res["manifest"]["plan"]["search"]
    files = sum(f.stat().st_size for f in (tmp_path / "c").glob("*.gguf"))
    assert "Fisher" in s["cost"] and s["ranks"] == [8] and files <= s["predicted_bytes"] <= s["budget_bytes"]
    with pytest.raises(EdgeqError, match="--cost"):
        export(ExportOptions(model=str(tiny_gguf), bpw=5.0, cost="hessian", out=str(tmp_path / "d"), check=False))


def test_default_cost_is_fisher_without_torch_and_the_output_error_without_calibration(tiny_gguf, tmp_path,
                                                                                       monkeypatch):
    import sys

    from edgeq.api import ExportOptions, export

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "torch", None)              # what the main install (no torch) sees
    res = export(ExportOptions(model=str(tiny_gguf), bpw=5.0, out=str(tmp_path / "b"), calib_windows=2, check=False))
    m = res["manifest"]
    assert "Fisher" in m["plan"]["search"]["cost"] and any(r["pass"] == "fisher" for r in m["passes"])
    assert (tmp_path / "b" / "model.gguf").stat().st_size == m["plan"]["search"]["predicted_bytes"]
    res = export(ExportOptions(model=str(tiny_gguf), bpw=5.0, out=str(tmp_path / "c"), calibration=False,
                               check=False))
    assert res["manifest"]["plan"]["search"]["cost"] == "tr(dW C dW^T)"


def test_token_weighted_fisher_covariance_is_the_gradient_energy_weighted_second_moment():
    """C_F = Σ_t a_t x_t x_tᵀ / Σ_t a_t with a_t = Σ_o g²_{t,o}, so that Σ_o F_o (ΔW C_F ΔWᵀ)_oo is the rank-one
    (tokens × channels) model of Σ_t Σ_o g²_{t,o} (Δw_o·x_t)²: exact when g² factorises, checked here on the
    backward's own gradients (one window: the same sampled tokens as output_fisher)."""
    from edgeq.models.recipes.synthetic import random_llama, tiny_config
    from edgeq.passes.fisher import _sample, _Tape, backward, output_fisher
    from edgeq.passes.sensitivity import output_error

    cfg = tiny_config(n_layers=2, vocab_size=384, tied_embeddings=True)
    graph = random_llama(cfg, seed=3, scale=0.08)
    ids = [1] + np.random.default_rng(0).integers(3, 384, 47).tolist()
    f = output_fisher(graph, [ids])
    tape = _Tape(graph)
    _, dlogits = _sample(tape.forward(ids), np.random.default_rng(0))
    linear, lookup = backward(tape, ids, dlogits)
    index = {n.inputs[1]: i for i, n in enumerate(graph.nodes) if n.op == "linear"}
    name = "model.layers.1.mlp.down_proj.weight"
    g2 = np.square(linear[name], dtype=np.float64)
    x = tape.args[index[name]][0].astype(np.float64)
    a = g2.sum(1)
    np.testing.assert_allclose(f[name], g2.mean(0), rtol=1e-6)
    np.testing.assert_allclose(f[f"cov:{name}"], (x * a[:, None]).T @ x / a.sum(), rtol=1e-4, atol=1e-7)
    dw = np.random.default_rng(1).standard_normal(graph.weights[name].shape).astype(np.float32) * 0.01
    rank_one = (g2.mean(0)[None, :] * a[:, None] / a.mean())            # g² ≈ F_o · a_t / mean(a)
    want = float((rank_one * np.square(x @ dw.T.astype(np.float64))).mean(0).sum())
    assert output_error(dw, f[f"cov:{name}"], None, f[name]) == pytest.approx(want, rel=1e-4)
    # each embedding row's lookup weight is its tokens' mean gradient energy over the mean (1 for unseen ids)
    rel = f["lookup_tokens:model.embed_tokens.weight"]
    lk = np.square(lookup["model.embed_tokens.weight"], dtype=np.float64).sum(1)
    tok = ids[5]
    assert rel[tok] == pytest.approx(lk[np.array(ids) == tok].mean() / lk.mean(), rel=1e-6)
    assert rel[next(i for i in range(384) if i not in ids)] == 1.0
