"""Calibration, importance matrices, sensitivity and the ILP allocator, on small problems and synthetic models.

The ILP is checked against brute force (budgets, ties, infeasibility); the
calibration statistics against the executor's own activations; the
sensitivity cost against the output error measured directly; the imatrix
file against llama.cpp's layout; the bytes written with an importance matrix
against the registry's reference quantizer, for every GGUF type.
"""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from gguf import GGUFReader

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.formats import get_format
from edgeq.importers.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from edgeq.passes.calibrate import calibration_from_imatrix, imatrix_from_calibration
from edgeq.importers.gguf import import_gguf
from edgeq.models import llama
from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
from edgeq.passes.allocate import fit_exact_bytes, min_feasible_bytes, solve_ilp
from edgeq.passes.calibrate import MIN_TOKENS, Calibration, calibration_windows, collect
from edgeq.passes.sensitivity import CostTable, Option, compute_costs, output_error
from edgeq.core.plan import Plan, TensorPlan
from edgeq.targets.gguf import write_gguf
from edgeq.runtime.tokenizer import spec_to_json


# --- ILP against brute force ------------------------------------------------------------------

def random_table(rng, n_tensors: int, n_opts: int, fixed: int = 100) -> CostTable:
    options = {}
    for i in range(n_tensors):
        size = int(rng.integers(50, 400))
        opts = []
        for j, bits in enumerate(sorted(rng.choice(np.arange(2, 17), n_opts, replace=False))):
            # more bits: more bytes, roughly less error (not always: the solver must not assume it)
            opts.append(Option(f"f{bits}", int(size * bits), float(rng.uniform(0.5, 1.5) * 2.0 ** -bits * size)))
        options[f"t{i}"] = opts
    return CostTable(options, fixed, n_params=sum(int(o[0].bytes) for o in options.values()),
                     info={"formats": [f"f{b}" for b in range(2, 17)]})


def brute_force(table: CostTable, budget: int, ties=()) -> float | None:
    names = list(table.options)
    tie_of = {m: g[0] for g in ties for m in g}
    best = None
    for combo in itertools.product(*(table.options[n] for n in names)):
        pick = dict(zip(names, combo))
        if any(pick[m].format != pick[tie_of[m]].format for m in tie_of):
            continue
        size = table.fixed_bytes + sum(o.bytes for o in combo)
        if size <= budget:
            cost = sum(o.cost for o in combo)
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(12))
def test_ilp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    table = random_table(rng, n_tensors=5, n_opts=4)
    lo = min_feasible_bytes(table)
    hi = table.fixed_bytes + sum(max(o.bytes for o in v) for v in table.options.values())
    for budget in np.linspace(lo, hi, 5).astype(int):
        alloc = solve_ilp(table, int(budget))
        assert alloc.total_bytes <= budget
        assert alloc.total_bytes == table.fixed_bytes + sum(o.bytes for o in alloc.choice.values())
        assert alloc.total_cost == pytest.approx(brute_force(table, int(budget)), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_ties_match_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    table = random_table(rng, n_tensors=5, n_opts=3)
    # tied tensors must offer the same formats
    for n in ("t1", "t2", "t4"):
        table.options[n] = [Option(o.format, o.bytes * (1 + int(n[1])), o.cost * (2 + int(n[1])))
                            for o in table.options["t0"]]
    ties = [["t0", "t1", "t2"]]
    lo = min_feasible_bytes(table, ties)
    hi = table.fixed_bytes + sum(max(o.bytes for o in v) for v in table.options.values())
    for budget in np.linspace(lo, hi, 4).astype(int):
        alloc = solve_ilp(table, int(budget), ties)
        assert len({alloc.choice[m].format for m in ties[0]}) == 1
        assert alloc.total_bytes <= budget
        assert alloc.total_cost == pytest.approx(brute_force(table, int(budget), ties), rel=1e-9)


def test_ilp_impossible_budget_names_the_smallest_size():
    table = random_table(np.random.default_rng(1), n_tensors=4, n_opts=3, fixed=1_000_000)
    need = min_feasible_bytes(table)
    with pytest.raises(EdgeqError, match=rf"smallest feasible size {need / 1e6:.3f} MB"):
        solve_ilp(table, need - 1)
    assert solve_ilp(table, need).total_bytes == need


def test_ilp_extra_row_is_respected():
    """The latency hook: a second linear budget over the same options."""
    from edgeq.passes.allocate import ExtraRow

    table = random_table(np.random.default_rng(3), n_tensors=6, n_opts=4)
    budget = table.fixed_bytes + sum(max(o.bytes for o in v) for v in table.options.values())
    free = solve_ilp(table, budget)
    ms = lambda name, o: o.bytes / 1000.0  # noqa: E731  a "latency" proportional to bytes
    bound = 0.8 * sum(ms(n, o) for n, o in free.choice.items())
    limited = solve_ilp(table, budget, extra_rows=[ExtraRow("latency_ms", ms, bound)])
    assert sum(ms(n, o) for n, o in limited.choice.items()) <= bound + 1e-9
    assert limited.total_cost >= free.total_cost


def test_a_plan_over_its_exact_size_is_solved_again_until_it_fits():
    """Where the files cost more than the options' bytes add up to (a TVM library holds one kernel per distinct
    format), the plan over the budget is solved again under a budget less its excess, until its exact size fits;
    a size that never fits is one clear error."""
    table = random_table(np.random.default_rng(5), n_tensors=6, n_opts=4)
    kernel = 150

    def exact(plan: Plan) -> int:        # called before fit_exact_bytes records the exact size in the plan
        return plan.search["predicted_bytes"] + kernel * len({t.format for t in plan.tensors.values()})

    def solve_at(target: int):
        alloc = solve_ilp(table, target)
        return alloc, Plan(tensors={n: TensorPlan(o.format) for n, o in alloc.choice.items()},
                           search={"predicted_bytes": alloc.total_bytes})

    lo = min_feasible_bytes(table) + 4 * kernel
    hi = table.fixed_bytes + sum(max(o.bytes for o in v) for v in table.options.values())
    budget = (lo + hi) // 2
    assert exact(solve_at(budget)[1]) > budget                 # the additive plan alone is over
    alloc, plan = fit_exact_bytes(solve_at, budget, exact, table.n_params)
    s = plan.search
    assert s["exact_tries"] > 1 and alloc.total_bytes == s["predicted_bytes"] <= budget
    assert s["predicted_bytes"] == s["additive_bytes"] + kernel * len({t.format for t in plan.tensors.values()})
    assert s["predicted_bpw"] == pytest.approx(8 * s["predicted_bytes"] / table.n_params)
    with pytest.raises(EdgeqError, match="no plan found whose files fit"):
        fit_exact_bytes(solve_at, hi, lambda p: hi + 1, table.n_params)      # never fits, whatever is chosen


# --- calibration ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(n_layers=2, vocab_size=384, tied_embeddings=True)
    return random_llama(cfg, seed=3, scale=0.08)


def test_calibration_statistics_are_the_inputs_second_moments(tiny):
    rng = np.random.default_rng(0)
    windows = [list(rng.integers(3, 384, 40)) for _ in range(3)]
    cal = collect(tiny, windows, max_full=300)
    seen: dict[str, list[np.ndarray]] = {}

    def grab(node, args):
        seen.setdefault(node.inputs[1], []).append(np.asarray(args[0], dtype=np.float64))

    ex = Executor(tiny, observers={"linear": grab})
    for w in windows:
        ex.run(w)
    assert set(cal.weight_input) == set(seen) == {n for n, t in tiny.weights.items() if len(t.shape) == 2}
    for name, xs in seen.items():
        x = np.concatenate(xs)
        s = cal.stats(name)
        assert s.n == x.shape[0]
        np.testing.assert_allclose(s.diag(), (x * x).mean(0), rtol=1e-5)
        if x.shape[1] <= 300:
            np.testing.assert_allclose(s.full(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-7)
        else:
            assert s.full() is None            # wider than max_full: diagonal only
    # q/k/v share one input, gate/up another
    p = "model.layers.0."
    assert cal.weight_input[p + "self_attn.q_proj.weight"] == cal.weight_input[p + "self_attn.v_proj.weight"]
    assert cal.weight_input[p + "mlp.gate_proj.weight"] == cal.weight_input[p + "mlp.up_proj.weight"]
    assert cal.token_counts.sum() == sum(len(w) for w in windows)
    # the tied embedding is the output head: it has the head's input statistics
    assert cal.stats("model.embed_tokens.weight").n == 120


def test_calibration_cache_round_trip(tiny, tmp_path):
    rng = np.random.default_rng(1)
    cal = collect(tiny, [list(rng.integers(3, 384, 32))], max_full=300)
    cal.info["x"] = 1
    back = Calibration.from_bytes(cal.to_bytes())
    assert back.weight_input == cal.weight_input and back.info == cal.info
    for k, s in cal.inputs.items():
        assert back.inputs[k].n == s.n and np.array_equal(back.inputs[k].sum_sq, s.sum_sq)
        assert (s.sum_outer is None) == (back.inputs[k].sum_outer is None)
    assert np.array_equal(back.token_counts, cal.token_counts)


def test_calibration_windows_start_with_bos():
    toks = list(range(100, 100 + 5000))
    ws = calibration_windows(toks, 512, 4, bos_id=1, add_bos=True)
    assert len(ws) == 4 and all(len(w) == 512 and w[0] == 1 for w in ws)
    assert ws[0][1] == 101 and ws[-1][1] == 100 + 8 * 512 + 1        # spread over the whole text
    short = calibration_windows(toks[:100], 512, 4, 1, True)       # shorter than a window: one shorter window
    assert len(short) == 1 and len(short[0]) == 100 and short[0][0] == 1
    with pytest.raises(EdgeqError, match="fewer than the 64"):
        calibration_windows(toks[:MIN_TOKENS - 1], 512, 4, 1, True)


# --- imatrix files ---------------------------------------------------------------------------

def test_imatrix_gguf_layout_is_llama_cpps(tmp_path):
    im = Imatrix({"blk.1.ffn_down.weight": ImatrixEntry(np.arange(8, dtype=np.float32), np.array([4])),
                  "blk.0.attn_q.weight": ImatrixEntry(np.ones(4, dtype=np.float32) * 6, np.array([3]))},
                 ["calib.txt"], chunk_count=2, chunk_size=512)
    write_imatrix(tmp_path / "im.gguf", im)
    r = GGUFReader(tmp_path / "im.gguf")
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.datasets"].contents() == ["calib.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 2 and r.fields["imatrix.chunk_size"].contents() == 512
    assert [t.name for t in r.tensors] == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                                           "blk.1.ffn_down.weight.in_sum2", "blk.1.ffn_down.weight.counts"]
    t = r.tensors[2]
    assert t.tensor_type.name == "F32" and list(t.shape) == [8, 1]      # ne = [width, n_mat]
    assert list(r.tensors[3].shape) == [1, 1]
    back = read_imatrix(tmp_path / "im.gguf")
    assert back.datasets == ["calib.txt"] and back.chunk_count == 2 and back.chunk_size == 512
    np.testing.assert_array_equal(back.entries["blk.1.ffn_down.weight"].importance(), np.arange(8) / 4)
    np.testing.assert_array_equal(back.entries["blk.0.attn_q.weight"].importance(), np.full(4, 2.0))


def test_legacy_imatrix_dat(tmp_path):
    vals = np.array([2.0, 4.0, 6.0], dtype=np.float32)
    name = b"blk.0.attn_k.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 3) + vals.tobytes()
    data += struct.pack("<i", 7) + struct.pack("<i", 4) + b"wiki"
    (tmp_path / "im.dat").write_bytes(data)
    im = read_imatrix(tmp_path / "im.dat")
    assert im.legacy and im.chunk_count == 7 and im.datasets == ["wiki"]
    np.testing.assert_array_equal(im.entries["blk.0.attn_k.weight"].importance(), vals / 2)
    (tmp_path / "bad.dat").write_bytes(b"\x00\x00")
    with pytest.raises(EdgeqError):
        read_imatrix(tmp_path / "bad.dat")


def test_imatrix_round_trip_through_calibration(tiny, tmp_path):
    rng = np.random.default_rng(2)
    cal = collect(tiny, [list(rng.integers(3, 384, 48))], max_full=0)
    write_imatrix(tmp_path / "im.gguf", imatrix_from_calibration(tiny, cal))
    back = calibration_from_imatrix(tiny, read_imatrix(tmp_path / "im.gguf"), tmp_path / "im.gguf")
    ours, theirs = cal.imatrix(), back.imatrix()
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])     # bit for bit: same float32 division
    bad = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones(7, dtype=np.float32), np.array([1]))})
    with pytest.raises(EdgeqError, match="7 values"):
        calibration_from_imatrix(tiny, bad)
    with pytest.raises(EdgeqError, match="names no 2-D weight"):
        calibration_from_imatrix(tiny, Imatrix({"blk.9.attn_q.weight": ImatrixEntry(np.ones(256), np.array([1]))}))


# --- sensitivity -----------------------------------------------------------------------------

def test_output_error_is_the_measured_output_mse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 64)).astype(np.float32) * np.linspace(0.1, 3, 64, dtype=np.float32)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    dw = get_format("q4_0").roundtrip(w) - w
    measured = float(np.mean(np.sum((x @ dw.T).astype(np.float64) ** 2, 1)))
    c = (x.T.astype(np.float64) @ x) / len(x)
    assert output_error(dw, c.astype(np.float32), None) == pytest.approx(measured, rel=1e-4)
    # the diagonal form ignores cross terms; the identity is the weight MSE
    assert output_error(dw, None, np.diag(c)) == pytest.approx(float(np.sum(dw.astype(np.float64) ** 2 * np.diag(c))))
    assert output_error(dw, None, None) == pytest.approx(float(np.sum(dw.astype(np.float64) ** 2)), rel=1e-6)


def test_costs_use_the_bytes_and_round_trip_the_writer_uses(tiny):
    from edgeq.core.formats import candidate_formats
    from edgeq.targets.gguf.layout import gguf_layout
    from edgeq.targets.gguf.writer import layout_overhead, padded

    rng = np.random.default_rng(4)
    cal = collect(tiny, [list(rng.integers(3, 384, 64))], max_full=600)
    fmts = candidate_formats("gguf", ["q8_0", "q4_k", "q4_0", "f16"])
    tok = spec_to_json(byte_level_spec(tiny.config.vocab_size))
    table = compute_costs(tiny, fmts, cal, gguf_layout(tiny, tok))
    name = "model.layers.1.mlp.down_proj.weight"
    w = tiny.weights[name].numpy()
    imp = cal.imatrix()[name]
    for o in table.options[name]:
        f = get_format(o.format)
        assert o.bytes == padded(f.nbytes(w.shape))
        dw = f.roundtrip(w, imp if f.takes_imatrix else None) - w
        assert o.cost == pytest.approx(output_error(dw, cal.stats(name).full().astype(np.float32), None))
    costs = {o.format: o.cost for o in table.options[name]}
    assert costs["f16"] < costs["q8_0"] < costs["q4_k"] and costs["q8_0"] < costs["q4_0"]
    assert table.fixed_bytes == layout_overhead(tiny, tok) + sum(padded(4 * t.n_elements) for t in tiny.weights.values()
                                                                 if len(t.shape) == 1)


# --- bytes written with an importance matrix ---------------------------------------------------

ALL_TYPES = ["q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "q5_0", "q5_1", "q4_0", "q4_1", "f16", "bf16", "f32"]


def test_reference_quantizer_matches_written_bytes_with_imatrix(tmp_path):
    """For every GGUF type: what the writer stores with an imatrix is what the registry's round trip predicts."""
    cfg = tiny_config(n_layers=4, vocab_size=384)
    graph = random_llama(cfg, seed=11, scale=0.08)
    rng = np.random.default_rng(5)
    imatrix = {n: rng.lognormal(0, 1.5, t.shape[-1]).astype(np.float32)
               for n, t in graph.weights.items() if len(t.shape) == 2}
    tensors, i = {}, 0
    for name, t in graph.weights.items():
        if len(t.shape) == 1:
            tensors[name] = TensorPlan("f32")
        else:
            tensors[name] = TensorPlan(ALL_TYPES[i % len(ALL_TYPES)])
            i += 1
    plan = Plan(tensors=tensors)
    path = tmp_path / "m.gguf"
    write_gguf(graph, plan, path, spec_to_json(byte_level_spec(cfg.vocab_size)), imatrix=imatrix)
    back = import_gguf(path)
    used = set()
    for name, t in graph.weights.items():
        if len(t.shape) != 2:
            continue
        f = get_format(plan.tensors[name].format)
        want = f.roundtrip(t.numpy(), imatrix[name] if f.takes_imatrix else None)
        assert np.array_equal(back.weights[name].numpy(), want), name
        used.add(f.name)
        if f.takes_imatrix:    # and the importance matrix really changed the result
            assert not np.array_equal(want, f.roundtrip(t.numpy())), name
    assert used == set(ALL_TYPES)


def test_file_size_is_layout_overhead_plus_padded_tensors(tmp_path):
    from edgeq.targets.gguf.writer import layout_overhead, padded

    cfg = tiny_config(n_layers=2, vocab_size=384)
    graph = random_llama(cfg, seed=1)
    tok = spec_to_json(byte_level_spec(cfg.vocab_size))
    tensors, i = {}, 0
    for name, t in graph.weights.items():
        tensors[name] = TensorPlan("f32" if len(t.shape) == 1 else ALL_TYPES[i % len(ALL_TYPES)])
        i += len(t.shape) == 2
    plan = Plan(tensors=tensors)
    write_gguf(graph, plan, tmp_path / "m.gguf", tok)
    predicted = layout_overhead(graph, tok) + sum(padded(get_format(plan.tensors[n].format).nbytes(t.shape))
                                                 for n, t in graph.weights.items())
    assert (tmp_path / "m.gguf").stat().st_size == predicted


def test_fused_groups(tiny):
    groups = llama.fused_groups(tiny, ["qkv", "gate_up"])
    assert len(groups) == 4
    assert groups[0] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    with pytest.raises(EdgeqError):
        llama.fused_groups(tiny, ["qk"])


# --- budgeted plans end to end (CLI, a synthetic model llama.cpp runs) ---------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    cfg = tiny_config(n_layers=2, vocab_size=384, tied_embeddings=True)
    graph = random_llama(cfg, seed=5, scale=0.08)
    path = tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf"
    write_gguf(graph, Plan(tensors={n: TensorPlan("f32") for n in graph.weights}), path,
               spec_to_json(byte_level_spec(cfg.vocab_size)))
    return path


def _edgeq(*args, cache):
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDGEQ_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


def test_budgeted_export_meets_the_budget_exactly_as_planned(tiny_gguf, tmp_path):
    import json

    common = ["--model", tiny_gguf, "--bpw", "6", "--calib-windows", "2", "--quiet"]
    r = _edgeq("plan", *common, "-o", tmp_path / "plan.json", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    s = plan["search"]
    assert s["method"] == "ilp" and s["optimal"] and s["predicted_bytes"] <= s["budget_bytes"]
    assert plan["calibration"]["windows"] == 2
    decided = {n: t for n, t in plan["tensors"].items() if "bytes" in t}
    assert len(decided) == 2 * 7 + 1                     # every 2-D tensor, the tied embedding included
    for t in decided.values():
        assert t["predicted_error"] >= 0 and t["reason"].startswith("ilp: " + t["format"])
    assert len({t["format"] for t in decided.values()}) > 1   # mixed, not uniform

    r = _edgeq("export", *common, "-o", tmp_path / "out", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    size = (tmp_path / "out" / "model.gguf").stat().st_size
    assert size == s["predicted_bytes"] <= 6 * m["model"]["n_params"] / 8
    assert m["plan"]["tensors"] == plan["tensors"] and m["calibration"]["enabled"]
    assert m["artifacts"][0]["bytes"] == size
    # the plan file reproduces the same bytes (with --gptq: the budget compensated by default, a plan file does not
    # say so), and llama.cpp runs it close to the float reference
    r = _edgeq("export", "--model", tiny_gguf, "--plan", tmp_path / "plan.json", "--calib-windows", "2", "--quiet",
               "--gptq",
               "-o", tmp_path / "out2",
               cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out2" / "model.gguf").read_bytes() == (tmp_path / "out" / "model.gguf").read_bytes()
    meas = json.loads((tmp_path / "out" / "measurements.json").read_text())
    assert meas["reference_check"]["kld_mean"] < 0.05


def test_impossible_budget_is_one_clear_error(tiny_gguf, tmp_path):
    r = _edgeq("plan", "--model", tiny_gguf, "--budget-mb", "0.01", "-o", tmp_path / "p.json", cache=tmp_path)
    assert r.returncode == 2
    assert "below the smallest feasible size" in r.stderr and "MB" in r.stderr and "bpw" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()
    r = _edgeq("plan", "--model", tiny_gguf, "--bpw", "5", "--quant", "q4_0", "-o", tmp_path / "p.json", cache=tmp_path)
    assert r.returncode == 2 and "not both" in r.stderr
