"""Deciding a plan: the declared pass lists, per way of deciding and model kind.

Three ways to decide, each one list of passes (the target supplies what it knows as data: what a preset
means, its formats, its size model):

- budgeted (`--budget-mb` / `--bpw` / `--latency-ms`): calibrate, [fisher], sensitivity, allocate (ILP or DynaQuant),
  legalize, [lowrank_compensate];
- a preset on a target whose preset reads the importance matrix (GGUF: llama.cpp picks some types by
  whether one is given), or a plan file that decides every tensor itself: [calibrate], [assign_preset],
  [apply_rules], legalize, [lowrank_compensate];
- a preset elsewhere: assign_preset, [apply_rules], legalize, then what the finished plan's formats need:
  calibrate_ranges (static INT8 activations: per weight, or per activation on CNNs) then
  choose_activation_ranges (per layer: the static range, or per-call ranges where it costs too much), and
  calibrate (an importance matrix for decoders' formats that take one).

With `--pruning-rates` (or a plan that fixes MLP orders or widths) every list ends, before any low-rank branch, with
uniql_sort (the MLPs' channels sorted; the graph the target lowers changes), with `--prune-attention` uniql_attention
(the heads' Q/K pairs sorted and V/O rotated) and uniql_alloc (the rate -> per-layer widths table, aligned to the
formats just decided, or the plan's widths applied).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgeq.compile.options import GPTQ_WINDOWS, ExportOptions, bundle_n_ctx
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import get_format
from edgeq.core.ir import Graph
from edgeq.core.layout import zero_weights
from edgeq.core.plan import Plan
from edgeq.models import llama
from edgeq.passes import Context, Pass, run_passes
from edgeq.passes.allocate import (Allocate, ExtraRow, budget_bytes, budget_error, min_feasible_bytes, solve_ilp,
                                   solve_rows)
from edgeq.passes.allocate_dynaquant import AllocateDynaQuant
from edgeq.passes.apply_rules import ApplyRules
from edgeq.passes.assign_preset import AssignPreset
from edgeq.passes.calibrate import DEFAULT_MAX_FULL, Calibrate
from edgeq.passes.calibrate_ranges import CalibrateRanges, needs_ranges, text_inputs
from edgeq.passes.choose_activation_ranges import ChooseActivationRanges
from edgeq.passes.fisher import Fisher
from edgeq.passes.gptq import DEFAULT_DAMP, GptqCompensate, partial_token_windows
from edgeq.passes.legalize import Legalize
from edgeq.passes.search import Search, SearchInputs
from edgeq.passes.search_space import Budgets, SearchSpace, genes_of
from edgeq.passes.lowrank_compensate import LowrankCompensate
from edgeq.passes.sensitivity import CostTable, Sensitivity, bytes_table
from edgeq.predictor.budget import LatencyBudget
from edgeq.predictor.predict import DEFAULT_CONTEXT_TOKENS, check_runtime_here, open_profile, profile_record
from edgeq.passes.uniql_alloc import UniqlAlloc
from edgeq.passes.uniql_attention import UniqlAttention
from edgeq.passes.uniql_recover import UniqlRecover
from edgeq.passes.uniql_sort import UniqlSort
from edgeq.targets.base import Target

PERCENTILE = 99.999          # static INT8 activation ranges: this percentile of |x| per tensor


@dataclass
class Decision:
    """A plan and what the passes computed for the writer."""

    plan: Plan
    calibration: Any = None          # a passes.calibrate.Calibration, or None (llama.cpp's plain behaviour)
    branches: dict = field(default_factory=dict)   # low-rank error branches {weight: (A, B)}
    graph: Graph | None = None       # the model to lower when the passes changed it (sorted or narrowed MLPs)
    # the weights to write when they differ from the model's (GPTQ's compensated W': their quantization is the
    # model, their float values are not, so references and presets keep reading `graph`)
    written: Graph | None = None


@dataclass
class DecideInputs:
    """What a decision reads besides the graph and the options."""

    target: Target
    preset: str | None
    profile: Any                                     # targets.profiles.DeviceProfile
    user_plan: Plan | None = None
    spec: Any = None                                 # the decoder's TokenizerSpec (the GGUF size model holds it)
    # static INT8 activation ranges are calibrated on these: a CNN's images (required), a text model's token
    # ids (default: the calibration text)
    calibration: list | None = None
    calibration_source: str | None = None
    text: Any = None                                 # the calibration text (importers.calibration_text), every pass's
    measure: Any = None                              # the search's expensive labels: plans -> real KLDs (compile/search.py)


def decide(graph: Graph, inp: DecideInputs, opts: ExportOptions, ctx: Context, branches: bool = True) -> Decision:
    """Run the passes that make one target's plan. `branches`: also compute the low-rank branches a plan's ranks
    ask for (`edgeq plan` only writes the plan)."""
    if opts.imatrix and not opts.calibration:
        raise EdgeqError(opts.imatrix, "--imatrix and --no-calibration contradict each other")
    if opts.gptq and not opts.calibration:
        raise EdgeqError(None, "--gptq compensates through the calibration's inputs: drop --no-calibration")
    if opts.gptq_aim == "float" and not opts.gptq_sequential:
        raise EdgeqError(None, "--gptq-aim float compares the quantized model's inputs with the float model's, which "
                               "--no-gptq-sequential makes equal: drop one of them")
    opts = replace(opts, gptq=gptq_on(graph, inp, opts))
    recorded = inp.user_plan.gptq if inp.user_plan is not None else None
    if opts.gptq and recorded is not None:      # write as the export that made the plan wrote
        opts = replace(opts, gptq_act_order=recorded.get("act_order", False),
                       gptq_sequential=recorded.get("sequential", True),
                       gptq_windows=recorded.get("windows", opts.gptq_windows),
                       gptq_conditional=recorded.get("importance") == "conditional",
                       gptq_aim=recorded.get("aim", "quantized"),
                       gptq_tokens=recorded.get("tokens", "uniform"),
                       gptq_token_windows=recorded.get("token_windows"))
    if opts.budgeted and inp.user_plan is not None:
        raise EdgeqError(opts.plan, "give either --plan or a budget (--budget-mb / --bpw), not both")
    if opts.budgeted and opts.method not in ("ilp", "dynaquant", "search"):
        raise EdgeqError(None, f"unknown --method {opts.method!r} (ilp, dynaquant, search)")
    if "calibration_source" in ctx.analysis:     # an earlier backend sorted the MLPs: start from the source's stats
        ctx.analysis["calibration"] = ctx.analysis.pop("calibration_source")
    if inp.preset is None or inp.target.preset_reads_imatrix:
        decision = _decide_calibrated_first(graph, inp, opts, ctx, branches)
    else:
        decision = _decide_preset(graph, inp, opts, ctx)
    _check_importance(decision)
    inp.target.check_plan(graph, decision.plan)
    return decision


def gptq_windows(opts: ExportOptions, calib_windows: int) -> int:
    """The calibration windows GPTQ's writer takes each layer's H from: --gptq-windows, else GPTQ_WINDOWS or the
    calibration's (`calib_windows`) if more (its pricing always reads the calibration's E[xxᵀ]); a text with fewer
    windows gives what it has."""
    if opts.gptq_windows is not None and opts.gptq_windows < 1:
        raise EdgeqError(None, f"--gptq-windows must be at least 1, not {opts.gptq_windows}")
    return max(calib_windows, GPTQ_WINDOWS) if opts.gptq_windows is None else opts.gptq_windows


def gptq_on(graph: Graph, inp: DecideInputs, opts: ExportOptions) -> bool:
    """--gptq / --no-gptq, else on for a budgeted ILP plan with calibration on a target that compensates by
    default (what the planner prices is then what the file holds), where no low-rank branch, width table or plan
    file starts from the uncompensated weights. `edgeq search` compensates with --gptq only: each of its measured
    labels is then a compensated export, several times the search's time on the test model."""
    if opts.gptq is not None:
        return opts.gptq
    if inp.user_plan is not None and inp.user_plan.gptq is not None and inp.target.compensates:
        # the plan was written compensated: --plan reproduces its bytes
        if not opts.calibration:
            raise EdgeqError(opts.plan, "the plan was written compensated (its 'gptq'), which needs the calibration: "
                                        "drop --no-calibration or give --no-gptq")
        return True
    return bool(opts.budgeted and opts.calibration and inp.target.compensates and graph.kind == "decoder"
                and opts.method == "ilp" and not any(opts.ranks) and not opts.pruning and inp.user_plan is None)


def _check_importance(decision: Decision) -> None:
    """Formats written from an importance matrix only (the low-bit i-quants) need one for their tensor."""
    have = set(decision.calibration.weight_input) if decision.calibration is not None else set()
    for name, tp in decision.plan.tensors.items():
        fmt = get_format(tp.format)
        if fmt.requires_imatrix and name not in have:
            raise EdgeqError(None, f"format {fmt.name} (for {name}) is written from an importance matrix only, as "
                                   "llama.cpp's is: calibrate (drop --no-calibration) or give an --imatrix that has it")


def _decide_calibrated_first(graph: Graph, inp: DecideInputs, opts: ExportOptions, ctx: Context,
                             branches: bool) -> Decision:
    user = inp.user_plan
    windows = opts.windows(user)
    search = opts.budgeted
    ranks = search and any(opts.ranks) or user is not None and any(t.rank for t in user.tensors.values())
    prune = _prunes(graph, inp, opts)
    passes: list[Pass] = []
    # fixed MLP widths (a plan's keep, the search's) are one narrowed model, compensated after the narrowing; a
    # width table is many models sharing their weights, which one compensation cannot serve
    table = opts.pruning or user is not None and user.pruning is not None
    if opts.gptq and (ranks or prune and table):
        raise EdgeqError(None, "--gptq with low-rank branches or pruning rates is not supported yet (a branch, and "
                               "every width of a table, would start from the uncompensated weights)")
    if opts.calibration and (search or ranks or opts.imatrix or prune or opts.gptq or _takes_imatrix(graph, inp)):
        # Only low-rank branches, DynaQuant and a search under the plain output error read full input
        # covariances (the Fisher cost reads its own token-weighted ones); a preset needs the importance matrix
        # (their diagonals), and on a big model the covariances alone cost gigabytes. Sorting the MLPs needs
        # the covariance of each down projection's input, whatever its width.
        # GPTQ's writer takes each layer's H from its own run; its pricing compensates through these (the
        # writer's H), so the ILP prices what is written: it reads each input's only while pricing that input's
        # weights, so where nothing else reads them they are recomputed then, one at a time, not held
        # (`defer_full`; the same matrices, bit for bit).
        held = ranks or search and (opts.method == "dynaquant" or search_cost(opts) != "fisher")
        full = held or search and opts.gptq
        max_full = DEFAULT_MAX_FULL if full else 0
        # sorting MLPs (the search's, a plan's widths) reads the down projections' covariances too: held then
        passes.append(Calibrate(n_windows=windows, imatrix_file=opts.imatrix, source=inp.text,
                                max_full=max_full, defer_full=full and not held and not prune,
                                full_for=_full_for(graph, max_full, opts.prune_attention) if prune else frozenset(),
                                subset=opts.calib_subset, means=prune and opts.prune_compensate))
    if search:
        passes += _search_passes(graph, inp, opts, ctx)
    elif inp.preset is not None:
        passes.append(AssignPreset(inp.preset, inp.target.preset))
    if user is not None:
        passes.append(ApplyRules(user, opts.plan))
    passes.append(Legalize())
    if prune:
        passes += _pruning_passes(inp, opts, ranks)[1 if opts.budgeted and opts.method == "search" else 0:]
    if opts.gptq:            # after the narrowing: each layer's H is that of the model the file holds
        passes.append(GptqCompensate(act_order=opts.gptq_act_order, sequential=opts.gptq_sequential,
                                     n_windows=gptq_windows(opts, windows), conditional=opts.gptq_conditional,
                                     asymmetric=opts.gptq_aim == "float", source=inp.text, subset=opts.calib_subset,
                                     file_rows=functools.partial(inp.target.file_rows, graph),
                                     fisher_weighted=opts.gptq_tokens == "fisher",
                                     token_windows=opts.gptq_token_windows))
    if ranks and branches:
        passes.append(LowrankCompensate(None if user is not None else opts.lowrank_scaling))
    out, plan = run_passes(passes, graph, Plan(), ctx)
    cal = ctx.analysis.get("calibration")
    plan.calibration = None if cal is None else {**cal.to_json(), "calib_windows_requested": windows}
    token_windows = partial_token_windows(opts.gptq_tokens == "fisher", opts.gptq_token_windows,
                                          gptq_windows(opts, windows))
    plan.gptq = {"act_order": opts.gptq_act_order, "sequential": opts.gptq_sequential, "damp": DEFAULT_DAMP,
                 "windows": gptq_windows(opts, windows),
                 **({"importance": "conditional"} if opts.gptq_conditional else {}),
                 **({"aim": "float"} if opts.gptq_aim == "float" else {}),
                 **({"tokens": "fisher"} if opts.gptq_tokens == "fisher" else {}),
                 **({"token_windows": token_windows} if token_windows else {})} if opts.gptq else None
    return Decision(plan, cal, ctx.analysis.get("branches", {}), None if out is graph else out,
                    ctx.analysis.pop("written", None))


def _prunes(graph: Graph, inp: DecideInputs, opts: ExportOptions) -> bool:
    """Whether the MLPs are sorted and a width table made (--pruning-rates), or a plan file's orders or widths
    applied."""
    user = inp.user_plan
    fixed = user is not None and (user.pruning is not None or any(t.keep is not None or t.order is not None
                                                                   for t in user.tensors.values()))
    searched = opts.budgeted and opts.method == "search"       # the search decides widths with the formats
    if not (opts.pruning or fixed or searched):
        return False
    if graph.kind != "decoder" or graph.arch != "llama":
        raise EdgeqError(None, f"--pruning-rates prunes Llama-family decoders' MLPs, not a {graph.arch} {graph.kind}")
    if not inp.target.prunes_mlp:
        raise EdgeqError(None, f"--pruning-rates is not available for backend {inp.target.name} yet")
    if opts.prune_attention and not inp.target.prunes_attention:
        raise EdgeqError(None, f"--prune-attention is not available for backend {inp.target.name}: "
                               f"{inp.target.prunes_attention_why}")
    if opts.budgeted and not inp.target.prunes_budgeted:
        raise EdgeqError(None, f"a budget with --pruning-rates is not sized on {inp.target.name} (its library has "
                               "symbolic MLP widths); export the budgeted plan, then --plan it with --pruning-rates")
    return True


def _full_for(graph: Graph, max_full: int, attention: bool = False) -> frozenset[str]:
    """The down projections whose input is wider than `max_full`: their covariance is kept all the same; with
    attention pruning also the attention's input (Q/K/V's) and the output projection's."""
    kept = [llama.mlp_weights(i)[2] for i in range(graph.config.n_layers)]
    if attention:
        kept += [n for i in range(graph.config.n_layers) for n in llama.attention_weights(i)[::3]]
    return frozenset(n for n in kept if graph.weights[n].shape[1] > max_full)


def _pruning_passes(inp: DecideInputs, opts: ExportOptions, ranks: bool) -> list[Pass]:
    if ranks and opts.pruning_rates:
        raise EdgeqError(None, "--pruning-rates with low-rank branches (--ranks) is not supported: a branch would "
                               "need slicing with its weight")
    if opts.prune_compensate and (inp.target.name != "gguf" or opts.recover_steps or not opts.pruning_rates):
        raise EdgeqError(None, "--prune-compensate goes with --pruning-rates on gguf bundles without --recover-steps "
                               "(ONNX and TVM bundles carry no per-rate bias yet; recovery changes the weights after "
                               "the biases are taken)")
    sort = UniqlSort(opts.prune_order, opts.prune_ridge, centered=opts.prune_compensate)
    alloc = UniqlAlloc(opts.pruning_rates, opts.prune_alloc, inp.target.mlp_channel_multiple, order=opts.prune_order,
                       compensate=opts.prune_compensate,
                       **({} if opts.prune_temperature is None else {"temperature": opts.prune_temperature}),
                       **({} if opts.prune_attention_ratio is None else {"attention_ratio": opts.prune_attention_ratio}))
    if opts.prune_attention:
        sort = [sort, UniqlAttention()]
    else:
        sort = [sort]
    if not opts.recover_steps:
        return [*sort, alloc]
    return [*sort, alloc, UniqlRecover(opts.recover_steps, subset=opts.calib_subset, source=inp.text)]


def _takes_imatrix(graph: Graph, inp: DecideInputs) -> bool:
    """Whether any format the preset or the plan file writes uses an importance matrix (else calibrating is
    wasted)."""
    if inp.preset is not None and inp.target.preset_takes_imatrix(graph, inp.preset):
        return True
    if inp.user_plan is not None:
        used = [t.format for t in inp.user_plan.tensors.values()] + [r.format for r in inp.user_plan.rules]
        return any(get_format(f).takes_imatrix for f in used)
    return False


def _decide_preset(graph: Graph, inp: DecideInputs, opts: ExportOptions, ctx: Context) -> Decision:
    if opts.gptq:
        raise EdgeqError(None, f"--gptq compensates calibrated plans; backend {inp.target.name}'s --quant "
                               f"{inp.preset} is not one (give a budget or --plan)")
    passes: list[Pass] = [AssignPreset(inp.preset, inp.target.preset)]
    if inp.user_plan is not None:
        passes.append(ApplyRules(inp.user_plan, opts.plan))
    passes.append(Legalize())
    _, plan = run_passes(passes, graph, Plan(), ctx)
    if graph.kind == "decoder" and _prunes(graph, inp, opts):
        return _decide_preset_pruned(graph, plan, inp, opts, ctx)
    if graph.kind == "cnn":
        return Decision(_cnn_activation_ranges(graph, plan, inp, ctx))
    if any(get_format(d.format).static_activations and d.act_range is None for d in plan.tensors.values()):
        inputs, source = ((inp.calibration, inp.calibration_source or "calibration inputs")
                          if inp.calibration is not None else text_inputs(graph, source=inp.text))
        _, plan = run_passes(_range_passes(plan, inputs, source), graph, plan, ctx)
    if graph.kind == "decoder" and opts.calibration and any(get_format(d.format).takes_imatrix
                                                            for d in plan.tensors.values()):
        if "calibration" not in ctx.analysis:        # another backend of the bundle may have calibrated already
            run_passes([Calibrate(n_windows=opts.windows(inp.user_plan), imatrix_file=opts.imatrix, max_full=0,
                                  source=inp.text, subset=opts.calib_subset)], graph, plan, ctx)
        plan.calibration = ctx.analysis["calibration"].to_json()
    return Decision(plan, ctx.analysis.get("calibration") if plan.calibration else None)


def _range_passes(plan: Plan, inputs: list, source: str) -> list[Pass]:
    """Static activation ranges calibrated, then per layer kept static or moved to per-call ranges by measurement
    (only where calibration, not a person, set the range)."""
    fresh = {n for n, d in plan.tensors.items() if get_format(d.format).static_activations and d.act_range is None}
    return [CalibrateRanges(inputs, source, PERCENTILE), ChooseActivationRanges(inputs, fresh)]


def _decide_preset_pruned(graph: Graph, plan: Plan, inp: DecideInputs, opts: ExportOptions,
                          ctx: Context) -> Decision:
    """A preset plan whose MLPs are then sorted and given a width table: the importance matrix and the orders come
    from one calibration with the down projections' full covariances."""
    passes: list[Pass] = []
    if any(get_format(d.format).static_activations and d.act_range is None for d in plan.tensors.values()):
        inputs, source = text_inputs(graph, source=inp.text)
        passes += _range_passes(plan, inputs, source)
    if opts.calibration:
        passes.append(Calibrate(n_windows=opts.windows(inp.user_plan), imatrix_file=opts.imatrix, max_full=0,
                                full_for=_full_for(graph, 0, opts.prune_attention), subset=opts.calib_subset,
                                source=inp.text, means=opts.prune_compensate))
    passes += _pruning_passes(inp, opts, False)
    out, plan = run_passes(passes, graph, plan, ctx)
    cal = ctx.analysis.get("calibration")
    takes = any(get_format(d.format).takes_imatrix for d in plan.tensors.values())
    plan.calibration = cal.to_json() if cal is not None and takes else None
    return Decision(plan, cal if plan.calibration else None, graph=None if out is graph else out)


def _cnn_activation_ranges(graph: Graph, plan: Plan, inp: DecideInputs, ctx: Context) -> Plan:
    """Static INT8 CNNs get a calibrated range per activation (the plan's `activations`) unless the plan has them."""
    if plan.activations is not None or not needs_ranges(plan):
        return plan
    if inp.calibration is None:
        raise EdgeqError(None, "static int8 needs calibration images: pass --calib-images FILE.npz (array 'images' "
                               f"of shape (n, {', '.join(map(str, graph.config.image_shape))}) float32), or use "
                               "--quant int8-dyn")
    source = inp.calibration_source or "calibration images"
    _, plan = run_passes([CalibrateRanges(inp.calibration, source, PERCENTILE)], graph, plan, ctx)
    plan.calibration = {"activations": f"per-tensor [min, max] of each quantized activation, {PERCENTILE} "
                                       "percentile of |x|", "source": inp.calibration_source,
                        "images": int(sum(len(x) for x in inp.calibration))}
    return plan


def search_cost(opts: ExportOptions) -> str:
    """The sensitivity cost a budgeted plan uses: by default the Fisher-weighted output error (in KLD units,
    bench/results/additivity_groups.json), computed in numpy (no torch), which needs the calibration text;
    without calibration, the plain output error."""
    if opts.cost != "auto":
        return opts.cost
    return "fisher" if opts.calibration else "output"


def _latency_budget(graph: Graph, inp: DecideInputs, opts: ExportOptions, opened) -> LatencyBudget:
    """The predicted call --latency-ms bounds: a decode step at --context-tokens, or the prefill of
    --prompt-tokens."""
    path, profile, fitted = opened
    check_runtime_here(profile, path)
    kind, key = (("prefill", opts.prompt_tokens) if opts.prompt_tokens is not None
                 else ("decode", DEFAULT_CONTEXT_TOKENS if opts.context_tokens is None else opts.context_tokens))
    return LatencyBudget(fitted, graph, bundle_n_ctx(graph, inp.profile, opts),
                         inp.target.kv_cache_dtype(inp.preset, inp.profile, opts.kv_dtype), kind, int(key),
                         float(opts.latency_ms))


def _latency_row(graph: Graph, inp: DecideInputs, opts: ExportOptions, sizes: CostTable, budget: int,
                 ties: list[list[str]], byte_budget: bool, opened) -> ExtraRow:
    """The ILP row bounding the plan's predicted decode step (or prefill of --prompt-tokens), after checking that
    the fastest plan within the byte budget meets it (one error naming that plan's latency if not)."""
    path, profile, _ = opened
    lb = _latency_budget(graph, inp, opts, opened)
    fastest_table = CostTable({n: [replace(o, cost=lb.coef(n, o.format, o.rank)) for o in v]
                               for n, v in sizes.options.items()}, sizes.fixed_bytes, sizes.n_params, sizes.info)
    fast = solve_ilp(fastest_table, budget, ties)
    fast_choice = {n: (o.format, o.rank) for n, o in fast.choice.items()}
    fastest = lb.exact(fast_choice)
    if fastest > opts.latency_ms:
        raise lb.too_fast_error(fastest, f"; within {budget / 1e6:.3f} MB" if byte_budget else "")
    return ExtraRow("predicted_latency_ms", lambda n, o: lb.coef(n, o.format, o.rank),
                    opts.latency_ms - lb.fixed_ms(fast_choice),
                    exact=lambda choice: lb.exact({n: (o.format, o.rank) for n, o in choice.items()}),
                    limit=float(opts.latency_ms),
                    info={"latency_of": lb.what, "latency_profile": profile_record(path, profile)})


def _search_passes(graph: Graph, inp: DecideInputs, opts: ExportOptions, ctx: Context) -> list[Pass]:
    if any(r < 0 for r in opts.ranks):
        raise EdgeqError(None, "--ranks must be non-negative integers")
    byte_budget = opts.budget_mb is not None or opts.bpw is not None
    # the budget in bytes needs only the parameter count: check it before anything is sized
    budget = budget_bytes(CostTable({}, 0, graph.n_params), opts.budget_mb, opts.bpw) if byte_budget else None
    target = inp.target
    fmts = target.candidate_formats(opts.formats)
    if not opts.calibration:          # formats written from an importance matrix only are not candidates then
        named = [f.name for f in fmts if f.requires_imatrix and opts.formats]
        if named:
            raise EdgeqError(None, f"--formats {named[0]} needs an importance matrix; drop --no-calibration")
        fmts = [f for f in fmts if not f.requires_imatrix]
    opened = None
    if opts.latency_ms is not None:      # a latency row prices each candidate with the profile's timings
        opened = open_profile(opts.latency_profile, target.name, None)
        timed = set(opened[2].kernels.formats)
        untimed = [f.name for f in fmts if f.name not in timed]
        if untimed and opts.formats:
            raise EdgeqError(opened[0], f"the latency profile has no timings for format {untimed[0]}: drop it from "
                                        "--formats or profile the device again (edgeq profile)")
        fmts = [f for f in fmts if f.name in timed]     # formats newer than the profile are no candidates
    formats = [f.name for f in fmts]
    layout = target.layout(graph, fmts, opts.ranks, inp.profile, spec=inp.spec, ndk_clang=opts.android_clang)
    ties = llama.fused_groups(graph, opts.ties)
    # feasibility needs only the bytes: check it before any calibration or cost is computed
    sizes = bytes_table(graph, layout, formats)
    if budget is None:            # a latency budget alone: every size is allowed
        budget = sizes.fixed_bytes + sum(max(o.bytes for o in v) for v in sizes.options.values()) \
            + layout.branch_overhead + sum(layout.branch_bytes(n, graph.weights[n].shape, r)
                                           for n in sizes.options for r in opts.ranks if r)
    if opts.method == "search":
        return _search_widths_passes(graph, inp, opts, layout, formats, ties, budget if byte_budget else None,
                                     budget, opened)
    if budget < min_feasible_bytes(sizes, ties):
        raise budget_error(sizes, budget, ties)
    rows = []
    if opts.latency_ms is not None:
        if opts.method != "ilp":
            raise EdgeqError(None, "--latency-ms is a row of the ILP: use it with --method ilp")
        rows.append(_latency_row(graph, inp, opts, sizes, budget, ties, byte_budget, opened))
    passes = _cost_passes(inp, opts, layout, formats)
    if opts.method == "dynaquant":
        if any(opts.ranks):
            raise EdgeqError(None, "--method dynaquant chooses formats only; use --ranks with --method ilp")
        passes.append(AllocateDynaQuant(budget, ties, exact_bytes=layout.exact_bytes))
        return passes
    passes.append(Allocate(budget, ties, extra_rows=rows, adapter_overhead=layout.branch_overhead,
                           exact_bytes=layout.exact_bytes))
    return passes


def _cost_passes(inp: DecideInputs, opts: ExportOptions, layout, formats: list[str]) -> list[Pass]:
    """[fisher], sensitivity: every candidate's cost for every tensor."""
    passes: list[Pass] = []
    cost = search_cost(opts)
    if cost == "fisher":
        passes.append(Fisher(source=inp.text))
    elif cost != "output":
        raise EdgeqError(None, f"unknown --cost {opts.cost!r} (auto, output, fisher)")
    passes.append(Sensitivity(layout, formats=formats, ranks=opts.ranks, scaling=opts.lowrank_scaling,
                              gptq=opts.gptq, act_order=opts.gptq_act_order, conditional=opts.gptq_conditional))
    return passes


def _search_widths_passes(graph: Graph, inp: DecideInputs, opts: ExportOptions, layout, formats: list[str],
                          ties: list[list[str]], byte_budget: int | None, budget: int, opened) -> list[Pass]:
    """`edgeq search`: costs, the MLPs' channel rankings, then the evolutionary search over widths x formats with
    the target's exact bytes and the profile's latency as data."""
    target = inp.target
    if graph.kind != "decoder" or graph.arch != "llama" or not target.sizes_any_width:
        raise EdgeqError(None, f"edgeq search prunes Llama-family decoders' MLPs on backends that size any width "
                               f"(gguf); not a {graph.arch} {graph.kind} on {target.name}")
    if any(opts.ranks) or opts.pruning_rates is not None:
        raise EdgeqError(None, "edgeq search decides formats and fixed MLP widths: no --ranks or --pruning-rates")
    lb = _latency_budget(graph, inp, opts, opened) if opened is not None else None
    full = llama.mlp_widths(graph)

    @functools.lru_cache(maxsize=2)
    def overhead(uniform: bool) -> int:
        """The header records one MLP width, or one per layer when they differ (fixed-width numbers either way)."""
        if uniform or len(full) < 2:
            return layout.overhead
        narrowed = llama.prune_mlp(zero_weights(graph), {0: np.arange(full[0] - 1)})
        return target.layout(narrowed, [get_format(f) for f in formats], [0], inp.profile, spec=inp.spec,
                             ndk_clang=opts.android_clang).overhead

    info = {}
    if lb is not None:
        path, profile, _ = opened
        info = {"latency_of": lb.what, "latency_profile": profile_record(path, profile)}
    # feasibility needs only bytes and latency: check it before any calibration or cost is computed
    sizes = bytes_table(graph, layout, formats)

    def bytes_of(name: str, shape: tuple[int, int], fmt: str) -> int:
        return layout.tensor_bytes(name, shape, get_format(fmt))

    budgets = Budgets(byte_budget, opts.latency_ms)
    SearchSpace(genes_of(sizes, ties), {n: tuple(graph.weights[n].shape) for n in sizes.options}, full, {}, [],
                bytes_of, overhead, None if lb is None else lb.pruned_ms, opts.search.width_step,
                opts.search.max_prune, target.mlp_channel_multiple).feasible_anchor(budgets)

    def ilp_formats(table: CostTable) -> dict[str, str] | None:
        """The ILP's plan at full MLP widths under the same budgets (None where none exists: the search may
        still meet a latency only narrower MLPs reach)."""
        try:
            rows = [] if opened is None else [_latency_row(graph, inp, opts, sizes, budget, ties,
                                                           byte_budget is not None, opened)]
            alloc = solve_rows(table, budget, ties, rows)
        except EdgeqError:
            return None
        return {n: o.format for n, o in alloc.choice.items()}

    inputs = SearchInputs(
        budgets, budget,
        bytes_of, overhead,
        None if lb is None else lb.pruned_ms, info, ties, target.mlp_channel_multiple, inp.measure, ilp_formats)
    return _cost_passes(inp, opts, layout, formats) + [UniqlSort(opts.prune_order, opts.prune_ridge),
                                                       Search(inputs, opts.search)]
