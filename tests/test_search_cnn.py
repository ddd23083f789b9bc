"""edgeq search --supernet (APQ on a CNN once-for-all supernet): stage widths x int8/float on onnxruntime.

A tiny setting: the digits supernet trained for 2 + 2 + 1 epochs, a latency table of a few subnets timed for real,
a search of a few generations. Checked: every point the search can make (sampled, mutated, crossed, walked back)
meets the latency limit; an unreachable limit is one line and exit status 2 before any training; the same seed
gives the same plan; the searched subnet exported through `edgeq export --model PLAN.pt2 --plan PLAN.json` runs in
onnxruntime and agrees with the float reference executor, with the searched formats and widths. Whether the search
beats uniform slimming is measured by bench/search_cnn.py, not here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_run import edgeq

from edgeq import api
from edgeq.compile.search_cnn import (CnnSearchOptions, FinalistTiming, SubnetModels, TableSettings, measure_table,
                                      run_search, space_of)
from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.models.cnn import StageLayer, mixed_activations, quantized_activations
from edgeq.passes.search import SearchSettings
from edgeq.passes.search_cnn import CnnSpace, search_cnn
from edgeq.passes.search_space import Budgets, Candidate
from edgeq.predictor.cnn_table import CnnLatencyTable

TINY = SearchSettings(population=8, generations=3, cheap_labels=24, expensive_labels=2, finalists=1, seed=5)
TABLE = TableSettings(fit=6, held=2, rounds=2, per_round=5)


@pytest.fixture(scope="module")
def supernet():
    from edgeq.models.recipes.digits_supernet import train_digits_supernet

    return train_digits_supernet(seed=0, full_epochs=2, sandwich_epochs=2, depth_epochs=1)


@pytest.fixture(scope="module")
def table_file(supernet, tmp_path_factory):
    models = SubnetModels(supernet)
    try:
        table = measure_table(models, TABLE, seed=0)
    finally:
        models.close()
    path = tmp_path_factory.mktemp("cnn-table") / "table.json"
    table.save(path)
    return path


@pytest.fixture(scope="module")
def limit_ms(supernet, table_file):
    """0.8 x the table's prediction for the full int8 model: a limit in predicted ms (a deterministic search)."""
    models = SubnetModels(supernet)
    try:
        space = space_of(supernet, CnnLatencyTable.load(table_file), models)
        return 0.8 * space.measures(space.point(tuple(supernet.full), "int8")).latency_ms
    finally:
        models.close()


def _options(table_file, **kw) -> CnnSearchOptions:
    return CnnSearchOptions(latency_profile=str(table_file), settings=TINY, table=TABLE, **kw)


def test_every_candidate_meets_the_limit():
    """Sampling, mutation, crossover and the walk back keep every point within the limit (an additive latency)."""
    layers = [StageLayer("a", 0, None, 9, 64, fixed_in=1), StageLayer("b", 1, 0, 9, 64),
              StageLayer("c", None, 1, 4, fixed_out=10)]

    def latency(widths, formats):
        return 0.01 + sum(l.macs(widths) / 1e6 * (0.2 if f == "int8" else 1.0) for l, f in zip(layers, formats))

    space = CnnSpace(layers, [16, 32], [[4, 8, 12, 16], [8, 16, 24, 32]], latency)
    full = space.measures(space.point((16, 32), "f32")).latency_ms
    budgets = Budgets(None, 0.4 * full)
    anchor = space.feasible_anchor(budgets)
    rng = np.random.default_rng(0)
    pts = [space.sample(rng, anchor, budgets) for _ in range(50)]
    for _ in range(200):
        a, b = pts[int(rng.integers(len(pts)))], pts[int(rng.integers(len(pts)))]
        child = space.toward(space.mutate(space.crossover(a, b, rng), rng, 0.5), a, budgets, rng)
        assert space.measures(child).meets(budgets)
        pts.append(child)
    assert len(set(pts)) > 10                                    # the space is explored, not collapsed to the anchor
    assert {space.format_names(c)[0] for c in pts} == {"f32", "int8"}
    with pytest.raises(EdgeqError, match="no configuration of the search space meets"):
        space.feasible_anchor(Budgets(None, 0.001))


def test_mixed_activations_follow_the_int8_layers(supernet):
    models = SubnetModels(supernet)
    try:
        g = models.graph(tuple(supernet.full))
    finally:
        models.close()
    every = [l.weight for l in supernet.layers]
    assert mixed_activations(g, set(every)) == quantized_activations(g)
    assert mixed_activations(g, set()) == []
    only_fc = mixed_activations(g, {"fc.weight"})
    assert len(only_fc) == 1 and only_fc[0] in quantized_activations(g)


def test_unreachable_limit_is_one_clear_error(table_file, tmp_path):
    out = tmp_path / "plan.json"
    r = edgeq("search", "--supernet", "digits", "--latency-ms", "0.00001", "--latency-profile", table_file,
              "-o", out, "--quiet", check=False)
    line = r.stderr.strip()
    assert r.returncode == 2 and line.count("\n") == 0, r.stderr
    assert "no configuration of the search space meets 1e-05 ms" in line and "predicted" in line, line
    assert not out.exists() and not out.with_suffix(".pt2").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "coef": "x"}))
    r = edgeq("search", "--supernet", "digits", "--latency-ms", "1", "--latency-profile", bad, "-o", out, "--quiet",
              check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "bad.json" in r.stderr, r.stderr


def test_table_predicts_timed_subnets(table_file):
    t = CnnLatencyTable.load(table_file)
    assert len(t.fit["points"]) == 2 * 7 + TABLE.fit + TABLE.held      # uniform slims x 2 formats + random points
    assert all(p["median"] > 0 for p in t.fit["points"])
    assert all(c >= 0 for c in t.coef)
    assert t.fit["train_mean_abs_rel_error"] < 0.5


def test_same_seed_same_plan_and_export_matches_reference(supernet, table_file, limit_ms, tmp_path):
    a = run_search(_options(table_file, latency_ms=limit_ms), supernet=supernet)
    try:
        pa = a.plan(a.result.best)
        assert a.space.measures(a.result.best).latency_ms <= a.budget_ms
        assert pa.search["chosen"]["val_loss"] == round(a.result.measured[a.result.best], 6)
        fm = a.space.format_names(a.result.best)
    finally:
        a.models.close()
    # the same search again, through the API that writes the plan and the subnet (.pt2): the same plan
    out = tmp_path / "plan.json"
    plan, model = api.search_supernet(_options(table_file, latency_ms=limit_ms), out=out, supernet=supernet)
    assert plan.to_json() == pa.to_json()
    assert model.exists() and json.loads(out.read_text())["search"]["widths"] == list(a.result.best.widths)
    # exported through the normal pipeline and run in onnxruntime
    edgeq("export", "--model", model, "--plan", out, "-o", tmp_path / "bundle", "--quiet")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    run = [(l.weight, f) for l, f in zip(supernet.layers, fm) if l.present(a.result.best.widths)]
    assert [(w, manifest["plan"]["tensors"][w]["format"]) for w, _ in run] == run   # a skipped block has no weights
    assert sorted(manifest["plan"]["activations"]) == sorted(plan.activations)
    from edgeq import runtime
    from edgeq.importers.torch_export import import_pt2

    x, y = supernet.data.x_test, supernet.data.y_test
    with runtime.load(tmp_path / "bundle", threads=1) as s:
        got = s.run({"images": x})["logits"]
    ref_graph = import_pt2(model)
    assert ref_graph.weights["stem.weight"].shape[0] == a.result.best.widths[0]
    assert ("block.conv1.weight" in ref_graph.weights) == bool(supernet.point(a.result.best.widths)[3])
    ref = Executor(ref_graph).run_inputs({"images": x})["logits"]
    assert got.shape == (len(x), 10)
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.97
    assert np.mean(got.argmax(-1) == y) > 0.5                        # a working classifier, not noise


def test_supernet_training_is_seeded(supernet):
    """The supernet, its elastic-depth phase included, is the same bit for bit from the same seed (the search's
    determinism rests on it); the depth phase does train (without it the weights differ)."""
    import torch

    from edgeq.models.recipes.digits_supernet import train_digits_supernet

    want = supernet.net.state_dict()
    again = train_digits_supernet(seed=0, full_epochs=2, sandwich_epochs=2, depth_epochs=1).net.state_dict()
    assert want.keys() == again.keys() and all(torch.equal(want[k], again[k]) for k in want)
    none = train_digits_supernet(seed=0, full_epochs=2, sandwich_epochs=2, depth_epochs=0).net.state_dict()
    assert not torch.equal(want["conv.weight"], none["conv.weight"])


def test_elastic_depth_and_kernel_subnets(supernet):
    """Once-for-all's elastic depth and kernel size: a point with the residual block skipped or 1x1 kernels is a
    plain digits CNN of that shape whose ONNX lowering (the average pool folded into the classifier) computes what
    torch computes; the latency table's features drop a skipped layer and count its depth term."""
    import onnx
    import torch

    from edgeq.predictor.cnn_table import features

    x = supernet.data.x_val[:64]
    models = SubnetModels(supernet)
    try:
        for w, convs in (((8, 8, 16, 0, 3, 1), 2), ((16, 16, 32, 1, 1, 3), 4)):
            sub = supernet.subnet(w)
            assert hasattr(sub.block, "conv1") == bool(w[3])
            assert sub.conv.weight.shape[-1] == w[5]
            with torch.no_grad():
                ref = sub(torch.from_numpy(x)).numpy()
            f32 = models.onnx(w, ("f32",) * 5)
            got = models.session(f32).run(["logits"], {"images": x})[0]
            np.testing.assert_allclose(got, ref, atol=1e-4)
            ops = [n.op_type for n in onnx.load(str(f32)).graph.node]
            assert ops.count("Conv") == convs and "AveragePool" not in ops, ops
            int8 = models.onnx(w, ("int8",) * 5)
            q = models.session(int8).run(["logits"], {"images": x})[0]
            assert np.mean(q.argmax(-1) == ref.argmax(-1)) >= 0.9
        layers = supernet.layers
        skip = features(layers, (16, 16, 32, 0, 3, 3), ("int8",) * 5, 3)
        keep = features(layers, (16, 16, 32, 1, 1, 3), ("int8",) * 5, 5)
        assert list(skip[5:13]) == [0.0] * 8 and skip[-1] == 0.0 and keep[-1] == 1.0
        assert keep[5] == pytest.approx(16 * 16 * 64 / 1e6)          # a 1x1 conv1: one weight per channel pair
        assert layers[1].params((16, 16, 32, 1, 3, 3)) == 9 * layers[1].params((16, 16, 32, 1, 1, 3))
    finally:
        models.close()


def test_levels_and_pick_choose_on_measured_latency():
    """Finalists come from evolutions at several levels of the limit (some predicted over it), and `pick` chooses
    on what it measures: here a 'device' 20 % slower than the table for wide layers, so the pick takes the best point
    measured within the limit, whatever the table predicted."""
    layers = [StageLayer("a", 0, None, 9, 64, fixed_in=1), StageLayer("b", 1, 0, 9, 64),
              StageLayer("c", None, 1, 4, fixed_out=10)]

    def latency(widths, formats):
        return 0.01 + sum(l.macs(widths) / 1e6 * (0.2 if f == "int8" else 1.0) for l, f in zip(layers, formats))

    space = CnnSpace(layers, [16, 32], [[4, 8, 12, 16], [8, 16, 24, 32]], latency)
    limit = 0.5 * space.measures(space.point((16, 32), "f32")).latency_ms

    def device(c):                          # the real latency: wide first stages cost more than the table says
        return space.measures(c).latency_ms * (1.2 if c.widths[0] > 8 else 1.0)

    def error(c):                           # wider and float is more accurate
        return 1.0 / (1 + sum(c.widths)) + 0.01 * sum(c.formats)

    picked = {}

    def pick(measured, score):
        assert score(list(measured)).shape == (len(measured),)
        within = [c for c in measured if device(c) <= limit]
        best = min(within, key=lambda c: (measured[c], device(c)))
        picked["pool"] = list(measured)
        return best, {"within": len(within)}

    s = SearchSettings(population=12, generations=4, cheap_labels=40, expensive_labels=4, finalists=2, seed=3)
    r = search_cnn(space, Budgets(None, limit), lambda w: 1.0 / (1 + sum(w)), lambda cs: [error(c) for c in cs],
                   s, levels=(1.2, 1.0, 0.8), pick=pick)
    levels = {f["level"] for f in r.record["finalists"]}
    assert levels == {1.2, 1.0, 0.8} and r.record["levels"] == [1.2, 1.0, 0.8]
    assert all(space.measures(c).latency_ms <= f["level"] * limit for c, f in zip(r.finalists, r.record["finalists"]))
    assert device(r.best) <= limit and r.record["timed"] == {"within": sum(device(c) <= limit for c in picked["pool"])}
    assert r.best == min((c for c in picked["pool"] if device(c) <= limit), key=lambda c: (error(c), device(c)))
    again = search_cnn(space, Budgets(None, limit), lambda w: 1.0 / (1 + sum(w)), lambda cs: [error(c) for c in cs],
                       s, levels=(1.2, 1.0, 0.8), pick=pick)
    assert again.best == r.best and again.record == r.record                    # seeded: the same finalists


def test_timed_search_limits_by_measured_latency(supernet, table_file):
    """A limit as a share of the full int8 model's latency: the full int8 model is timed first (the record), the
    evolution searches under ratio x its predicted latency, and every measured point is timed with the full int8
    model; the chosen one is the most accurate measured within the ratio less the margin (or, if none is, the
    fastest)."""
    timing = FinalistTiming(levels=(1.1, 0.9), margin=0.03, rounds=4, per_round=5)
    s = run_search(_options(table_file, latency_ratio=0.8, timing=timing), supernet=supernet)
    try:
        rec = s.result.record["timed"]
        assert s.full_int8_ms > 0
        full = s.space.point(tuple(supernet.full), "int8")
        assert s.budget_ms == pytest.approx(0.8 * s.space.measures(full).latency_ms)
        assert rec["limit_ratio"] == pytest.approx(0.8 * 0.97) and len(rec["points"]) == len(s.result.measured)
        within = [p for p in rec["points"] if p["ratio"] <= rec["limit_ratio"]]
        assert rec["within_limit"] == bool(within)
        chosen = next(p for p in rec["points"] if p["widths"] == list(s.result.best.widths)
                      and p["formats"] == list(s.space.format_names(s.result.best)))
        if within:
            assert chosen["val_loss"] == min(p["val_loss"] for p in within) and chosen["ratio"] <= rec["limit_ratio"]
        else:
            assert chosen["ratio"] == min(p["ratio"] for p in rec["points"])
        assert {f["level"] for f in s.result.record["finalists"]} <= {1.1, 0.9}
        assert s.plan(s.result.best).search["measured_full_int8_ms"] == round(s.full_int8_ms, 5)
    finally:
        s.models.close()


def test_canonical_point_drops_what_skipped_layers_use(supernet):
    """With the residual block skipped, its inner width, kernel size and formats are one model: one canonical
    point (what only skipped layers use at full width and int8), with the same predicted latency."""
    layers, full = supernet.layers, supernet.full
    space = CnnSpace(layers, full, supernet.menus, lambda w, f: float(sum(l.macs(w) for l in layers)),
                     channel_stages=supernet.channel_stages)
    f32, q = 0, 1
    skipped = Candidate((f32, f32, f32, q, f32), (12, 8, 24, 0, 1, 3))
    c = space.canonical(skipped)
    assert c == Candidate((f32, q, q, q, f32), (12, 16, 24, 0, 3, 3))
    assert space.measures(c).latency_ms == space.measures(skipped).latency_ms
    kept = Candidate((f32, f32, q, q, f32), (12, 8, 24, 1, 1, 3))
    assert space.canonical(kept) == kept and space.canonical(c) == c


def test_format_menu_int8_only():
    """The format menu (SpaceEvo's format set): int8 only gives all-int8 points; a menu without int8 is one error."""
    layers = [StageLayer("a", 0, None, 9, 64, fixed_in=1), StageLayer("c", None, 0, 4, fixed_out=10)]
    space = CnnSpace(layers, [16], [[4, 8, 16]], lambda w, f: 0.01 + w[0] * 1e-3, formats=("int8",))
    rng = np.random.default_rng(0)
    anchor = space.feasible_anchor(Budgets(None, 1.0))
    assert {space.format_names(space.sample(rng, anchor, Budgets(None, 1.0))) for _ in range(20)} == {("int8", "int8")}
    with pytest.raises(EdgeqError, match="formats are int8"):
        CnnSpace(layers, [16], [[4, 8, 16]], lambda w, f: 0.01, formats=("f32",))
