"""edgeq search (APQ): widths x formats under a latency and a byte budget, on a tiny random Llama with the recorded
latency profile of tests/data (test_predictor.py's).

Constraints are checked on every candidate the search can make (sampled, mutated, crossed, walked back), the found
plan is exported and run (llama.cpp, the export's own reference check), its file bytes are the predicted ones and
its predicted latency is the plan's; the same seed gives the same plan; an infeasible budget is one line and exit
status 2. How well the accuracy predictor ranks configurations is measured by bench/search.py, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import edgeq

from edgeq.compile import pipeline
from edgeq.compile.options import ExportOptions
from edgeq.compile.search import search
from edgeq.core.formats import get_format
from edgeq.passes.search import SearchSettings
from edgeq.passes.search_accuracy import AccuracyPredictor, spearman
from edgeq.passes.search_space import Budgets, Candidate

PROFILE = Path(__file__).parent / "data" / "latency_profile_gguf_quick.json"
# the tiny decoder's uniform q4_0 plan predicts about 0.554 ms a decode step on this profile, f16 0.621 ms
LIMIT_MS = 0.58
SMALL = SearchSettings(population=12, generations=4, cheap_labels=200, expensive_labels=6, finalists=1, seed=3)


@pytest.fixture
def cache_env(cache, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE", str(cache))
    import os

    return dict(os.environ)


def _opts(model, **kw) -> ExportOptions:
    return ExportOptions(model=str(model), backend="gguf", method="search", latency_profile=str(PROFILE),
                         latency_ms=LIMIT_MS, **kw)


def _decided(model, **kw):
    """The pipeline decided up to the search (no evolution, no labels): its context holds the space and costs."""
    opts = _opts(model, cost="output", search=SearchSettings(population=4, generations=1, cheap_labels=20,
                                                             expensive_labels=0, finalists=0, seed=kw.pop("seed", 0)),
                 **kw)
    c = pipeline.prepare(opts, None, None, several_allowed=False)
    pipeline.decide_all(c, opts, branches=False)
    return c.ctx


def test_infeasible_budget_is_one_clear_error(tiny_decoder_dir, tmp_path, cache_env):
    out = tmp_path / "p.json"
    r = edgeq("search", "--model", tiny_decoder_dir, "--backend", "gguf", "--latency-ms", "0.001",
              "--latency-profile", PROFILE, "--cost", "output", "-o", out, "--quiet", check=False, env=cache_env)
    line = r.stderr.strip()
    assert r.returncode == 2 and line.count("\n") == 0, r.stderr
    assert "no configuration of the search space meets 0.001 ms" in line and "predicted" in line, line
    assert not out.exists()
    r = edgeq("search", "--model", tiny_decoder_dir, "--backend", "gguf", "--budget-mb", "0.05", "--cost", "output",
              "-o", out, "--quiet", check=False, env=cache_env)
    assert r.returncode == 2 and "meets 0.050 MB" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_every_candidate_meets_the_budgets_and_its_formats_blocks(tiny_decoder_dir, cache_env):
    """Sampling, mutation, crossover and the walk back within the budgets, under a tight latency budget and a
    byte budget: every point the search can make is within both and its widths slice its formats' blocks."""
    space, anchor = _decided(tiny_decoder_dir, budget_mb=0.7, seed=1).analysis["search_space"]
    budgets = Budgets(700_000, LIMIT_MS)
    rng = np.random.default_rng(0)
    made, walked = [], 0
    pool = [space.sample(rng, anchor, budgets) for _ in range(40)]
    for _ in range(150):
        a, b = pool[int(rng.integers(len(pool)))], pool[int(rng.integers(len(pool)))]
        raw = space.mutate(space.crossover(a, b, rng), rng, 0.5)
        walked += not space.measures(raw).meets(budgets)
        made.append(space.toward(raw, anchor, budgets, rng))
    for cand in pool + made:
        m = space.measures(cand)
        assert m.bytes <= 700_000 and m.latency_ms <= LIMIT_MS
        for i, w in enumerate(cand.widths):
            assert w == space.full[i] or w % space.alignment(cand, i) == 0
            for t in space.mlp[i]:
                assert get_format(space.format_of(cand, t)).can_carry(space.shape(t, cand.widths))
    assert walked > 0                                     # the walk back was exercised
    assert len(set(pool + made)) > 20                     # and the space explored, not collapsed on the anchor
    assert any(w < f for cand in made for w, f in zip(cand.widths, space.full))


def test_same_seed_same_plan(tiny_decoder_dir, cache_env):
    a = search(_opts(tiny_decoder_dir, cost="output", search=SMALL)).to_json()
    b = search(_opts(tiny_decoder_dir, cost="output", search=SMALL)).to_json()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["search"]["measured_configurations"] >= 2 and a["search"]["kld"] > 0
    # the ILP's plan at full widths was a seed and measured beside the finalists: the search never does worse
    ilp = a["search"]["ilp_seed"]
    assert a["search"]["kld"] <= ilp["kld"], ilp
    # the labels (the ILP's plan and up to six more) corrected the cost per role and the ILP was solved again on it:
    # every re-solved plan that differs from the first was measured too, and none beat the chosen plan
    corr = a["search"]["cost_correction"]
    assert set(corr["chosen"]["multipliers"]) >= {"model.layers.*.mlp.down_proj.weight", "pruning"}
    for r in corr["ilp_plans"]:
        assert r["kld"] >= a["search"]["kld"], corr


def test_found_plan_exports_within_the_budgets(tiny_decoder_dir, tmp_path, cache_env):
    plan, out = tmp_path / "plan.json", tmp_path / "b"
    edgeq("search", "--model", tiny_decoder_dir, "--backend", "gguf", "--latency-ms", LIMIT_MS, "--budget-mb", "0.7",
          "--latency-profile", PROFILE, "-o", plan, "--population", "12", "--generations", "4", "--cheap-labels",
          "200", "--expensive-labels", "0", "--finalists", "1", "--gptq", "--quiet", env=cache_env)
    p = json.loads(plan.read_text())
    s = p["search"]
    assert s["method"] == "search" and s["predicted_latency_ms"] <= LIMIT_MS and s["predicted_bytes"] <= 700_000
    widths = s["mlp_widths"]
    keeps = [p["tensors"][f"model.layers.{i}.mlp.down_proj.weight"].get("keep") for i in range(len(widths))]
    assert [k or 512 for k in keeps] == widths
    # --gptq: written as the ILP's plans are, compensated (GPTQ on the narrowed model), recorded so --plan writes so
    assert p["gptq"] == {"act_order": True, "sequential": True, "damp": 0.01, "windows": 32}, p.get("gptq")
    edgeq("export", "--model", tiny_decoder_dir, "--plan", plan, "--latency-profile", PROFILE, "-o", out, "--quiet",
          env=cache_env)
    # exact bytes: the file is what the search counted
    assert (out / "model.gguf").stat().st_size == s["predicted_bytes"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["pass"] for r in manifest["passes"]][-1] == "gptq"
    assert manifest["predicted"]["latency_ms_per_token"] == pytest.approx(s["predicted_latency_ms"], rel=1e-3)
    # llama.cpp ran the pruned file: the export's reference check against the float source of the same widths
    chk = json.loads((out / "measurements.json").read_text())["reference_check"]
    assert 0 <= chk["kld_mean"] < 1.0, chk
    bundle = json.loads(edgeq("predict", out, "--latency-profile", PROFILE, "--json", env=cache_env).stdout)
    assert bundle["decode_ms_per_token"] == pytest.approx(s["predicted_latency_ms"], rel=1e-3)


def test_transfer_predictor_trains_and_ranks(tiny_decoder_dir, cache_env):
    """Pre-training on cheap labels ranks held-out configurations' cheap labels; fine-tuning moves the
    predictions towards the expensive labels it is given, deterministically."""
    space, _ = _decided(tiny_decoder_dir).analysis["search_space"]
    rng = np.random.default_rng(7)
    pts = list(dict.fromkeys(space.random(rng) for _ in range(700)))
    x = np.array([space.features(p) for p in pts])
    y = np.array([space.cheap_label(p) for p in pts])
    train, test = slice(0, 500), slice(500, None)
    cheap = AccuracyPredictor("cheap", seed=0).fit(x[train], y[train], None, None)
    assert spearman(cheap.predict(x[test]), y[test]) > 0.8
    # "expensive" labels that reverse the pruning's weight: the fine-tune must follow them
    exp_y = y * np.exp(-3 * x[:, -2:].mean(axis=1))
    few = slice(0, 16)
    t1 = AccuracyPredictor("transfer", seed=0).fit(x[train], y[train], x[few], exp_y[few])
    t2 = AccuracyPredictor("transfer", seed=0).fit(x[train], y[train], x[few], exp_y[few])
    assert np.array_equal(t1.predict(x[test]), t2.predict(x[test]))
    # towards the expensive labels: far closer to them than the cheap predictor, and ranking them no worse (both
    # rank these 16 points almost perfectly, so a strict rank test would compare ties)
    target = np.log(exp_y[few])
    assert np.abs(t1.predict(x[few]) - target).mean() < 0.5 * np.abs(cheap.predict(x[few]) - target).mean()
    assert spearman(t1.predict(x[few]), target) >= spearman(cheap.predict(x[few]), target)
    with pytest.raises(Exception, match="needs expensive labels"):
        AccuracyPredictor("expensive").fit(None, None, None, None)


def test_cost_correction_recovers_a_mispriced_role(tiny_decoder_dir, cache_env):
    """Labels made from the space's own costs with the value projections priced 8x: the weakly pulled fit finds
    that factor against the other roles, the strongly pulled one stays near the uncorrected cost, leave-one-out
    picks the fit that predicts the labels, and the corrected table scales each tensor's options by its role."""
    from edgeq.passes.search_correction import corrections, fit, role_costs, role_of

    ctx = _decided(tiny_decoder_dir)
    space, _ = ctx.analysis["search_space"]
    rng = np.random.default_rng(5)
    v = "model.layers.*.self_attn.v_proj.weight"
    # full MLP widths, random formats (labels near the ILP's plan are mostly so: pruning would drown the roles)
    pts = list(dict.fromkeys(Candidate(space.random(rng).formats, tuple(space.full)) for _ in range(40)))
    truth = {p: 0.01 * sum(cost * (8.0 if g == v else 1.0) for g, cost in role_costs(space, p).items())
             for p in pts}
    assert sum(role_costs(space, pts[0]).values()) == pytest.approx(space.cheap_label(pts[0]), rel=1e-12)
    weak, strong = fit(space, truth, 1e-10), fit(space, truth, 1e3)
    others = np.median([m for g, m in weak.multipliers.items() if g not in (v, "pruning")])
    assert weak.multipliers[v] / others == pytest.approx(8.0, rel=0.05), weak
    assert abs(strong.multipliers[v] - 1.0) < 0.2 and strong.multipliers[v] < weak.multipliers[v]
    fitted, best = corrections(space, truth, (1e3, 1e-10))
    assert best is fitted[1]
    for p in pts:
        assert best.label(space, p) == pytest.approx(truth[p], rel=1e-3)
    table = ctx.analysis["costs"]
    name = next(n for n in table.options if role_of(n) == v)
    scaled = best.table(table)
    for o, so in zip(table.options[name], scaled.options[name]):
        assert so.cost == pytest.approx(o.cost * best.multipliers[v]) and so.bytes == o.bytes
    assert corrections(space, dict(list(truth.items())[:3])) == ([], None)


def test_ray_path_gives_the_in_process_plan(tiny_decoder_dir, cache_env):
    """The expensive labels as tasks on a local Ray instance: the same labels, so the same plan."""
    pytest.importorskip("ray")
    here = search(_opts(tiny_decoder_dir, cost="output", search=SMALL)).to_json()
    there = search(_opts(tiny_decoder_dir, cost="output", search=SMALL), ray="local").to_json()
    assert json.dumps(here, sort_keys=True) == json.dumps(there, sort_keys=True)


def test_menus_are_scored_and_the_best_searched(tiny_decoder_dir, cache_env):
    """SpaceEvo: every menu (width step x format set) gets a Q-T score, the table is in the plan, best first, and
    the plan lies in the best menu's space (its formats from its set, its widths on its step)."""
    from edgeq.passes.search_menus import FORMAT_SETS, WIDTH_STEPS

    opts = _opts(tiny_decoder_dir, cost="output", search=SearchSettings(
        population=8, generations=2, cheap_labels=200, expensive_labels=0, finalists=0, menu="auto"))
    p = search(opts)
    menus = p.search["menus"]
    assert len(menus) == len(WIDTH_STEPS) * len(FORMAT_SETS)
    scores = [m["score"] for m in menus]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    for m in menus:
        assert m["score"] == pytest.approx(m["feasible_share"] * m["quality"], rel=1e-3, abs=1e-6)
    top = menus[0]
    keep = FORMAT_SETS[top["formats"]]
    assert all(keep(t.format) for n, t in p.tensors.items() if t.bytes is not None)
    assert all(w == 512 or w % top["width_step"] == 0 for w in p.search["mlp_widths"])
