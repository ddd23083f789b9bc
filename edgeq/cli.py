"""The `edgeq` command line.

Vocabulary: --target is a device profile, --backend a runtime family,
--quant a preset; "format" is always a quantization format.
Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from edgeq import __version__, api, runtime
from edgeq.bundle.manifest import MODEL_ROLES
from edgeq.compile.options import ExportOptions
from edgeq.core.errors import EdgeqError
from edgeq.core.progress import make_progress
from edgeq.devices.cli import add_device_parser
from edgeq.devices.session import DeviceSession, runs_remotely
from edgeq.compile.search_cnn import SUPERNETS, CnnSearchOptions, TableSettings
from edgeq.passes.search import SearchSettings
from edgeq.targets.profiles import PROFILES
from edgeq.targets.registry import TARGETS


DEVICE_HELP = ("where to run: local (or cpu, the default: this process), ssh://user@host[:port], adb:SERIAL, "
               "qemu-arm64 (the HIL devices: the bundle is pushed and run by the on-device runner), or "
               "rpc://HOST:PORT (a TVM RPC server, tvm bundles)")


def _log(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))


def _options(a, out: str = "out") -> ExportOptions:
    """ExportOptions from the options `export` and `plan` share."""
    return ExportOptions(
        model=a.model, target=a.target, backend=a.backend, quant=a.quant, plan=a.plan, out=out,
        force=getattr(a, "force", False), n_ctx=getattr(a, "n_ctx", None), kv_dtype=getattr(a, "kv_dtype", None),
        calibration=a.calibration, imatrix=a.imatrix, calib_windows=a.calib_windows, budget_mb=a.budget_mb,
        bpw=a.bpw, method=a.method, formats=a.formats, ranks=a.ranks, ties=a.ties, lowrank_scaling=a.lowrank_scaling,
        cost=a.cost, gptq=a.gptq, gptq_act_order=a.gptq_act_order, gptq_sequential=a.gptq_sequential,
        gptq_windows=a.gptq_windows, gptq_conditional=a.gptq_conditional,
        gptq_aim=a.gptq_aim, gptq_tokens=a.gptq_tokens, gptq_token_windows=a.gptq_token_windows,
        adapters=getattr(a, "adapter", None) or [], adapter_mode=getattr(a, "adapter_mode", None) or "merged",
        calib_images=getattr(a, "calib_images", None),
        calib_text=getattr(a, "calib_text", None), calib_jsonl=getattr(a, "calib_jsonl", None),
        allow_requantize=not getattr(a, "no_requantize", False),
        ndk_clang=getattr(a, "ndk_clang", None),
        tune_trials=getattr(a, "tune_trials", 0) or 0,
        latency_profile=a.latency_profile, latency_ms=a.latency_ms, prompt_tokens=a.prompt_tokens,
        context_tokens=a.context_tokens,
        calib_subset=a.calib_subset, pruning_rates=a.pruning_rates, prune_order=a.prune_order,
        prune_alloc=a.prune_alloc, prune_ridge=a.prune_ridge, prune_temperature=a.prune_temperature,
        recover_steps=a.recover_steps, prune_attention=getattr(a, "prune_attention", False),
        prune_attention_ratio=getattr(a, "prune_attention_ratio", None),
        prune_compensate=getattr(a, "prune_compensate", False),
        native=getattr(a, "native", None),
    )


def _check_summary(chk: dict) -> str:
    if "skipped" in chk:
        return f"not checked here ({chk['skipped']})"
    if "cosine_mean" in chk:
        return f"reference-sentence cosine {chk['cosine_mean']:.5f} (min {chk['cosine_min']:.5f})"
    if "agreement" in chk:
        return (f"reference images: argmax agreement {chk['agreement']:.3f}, max |logit diff| "
                f"{chk['max_abs_diff']:.2e}")
    if "kld_mean" in chk:
        return f"reference-prompt KLD {chk['kld_mean']:.2e}, top-1 {chk['top1']:.3f}"
    return "reference not checked"


def cmd_export(a) -> int:
    res = api.export(_options(a, a.out), progress=make_progress(a.quiet), log=_log(a.quiet))
    if not a.quiet:
        m = res["manifest"]
        models = [x for x in m["artifacts"] if x["role"] in MODEL_ROLES]
        files = ", ".join(f"{x['path']} {x['bytes'] / 2**20:.2f} MiB" for x in models)
        formats = next(x["formats"] for x in models if x["role"] == "model")
        print(f"wrote {a.out}: {files} ({sum(x['bytes'] for x in models) / 1e6:.3f} "
              f"MB), {m['model']['bits_per_weight']:.3f} bpw, formats {formats}; "
              f"{_check_summary(res['measurements'].get('reference_check', {}))}")
        sp = res["measurements"].get("speed")
        if sp:
            print(f"speed ({sp['runtime']}, {sp['threads']} thread(s), this machine): decode "
                  f"{sp['plan']['decode_tps']:.1f} "
                  f"tokens/s, prefill {sp['plan']['prefill_tps']:.1f} tokens/s; the preset of the nearest bytes "
                  f"({sp['preset']['name']}, {sp['preset']['bytes'] / 1e6:.1f} MB): decode "
                  f"{sp['preset']['decode_tps']:.1f}, prefill {sp['preset']['prefill_tps']:.1f} "
                  f"({sp['decode_ratio']:.2f}x / {sp['prefill_ratio']:.2f}x)")
    return 0


def cmd_plan(a) -> int:
    plan = api.plan(_options(a), out=a.out, progress=make_progress(a.quiet), log=_log(a.quiet))
    if not a.quiet:
        extra = ""
        if plan.search and (a.budget_mb is not None or a.bpw is not None or a.latency_ms is not None):
            s = plan.search
            extra = f"; {s['method']}: {s['predicted_mb']:.3f} MB ({s['predicted_bpw']:.3f} bpw)"
            if a.budget_mb is not None or a.bpw is not None:
                extra += f" for a budget of {s['budget_mb']:.3f} MB"
            if "predicted_latency_ms" in s:
                extra += f", predicted {s['predicted_latency_ms']:.3f} ms for a limit of {a.latency_ms:g} ms"
            extra += f", predicted error {s['predicted_error']:.4g}"
        print(f"wrote {a.out}: {len(plan.tensors)} tensors, formats {plan.format_counts()}{extra}")
    return 0


def cmd_search(a) -> int:
    settings = SearchSettings(
        population=a.population, generations=a.generations, mutation=a.mutation, cheap_labels=a.cheap_labels,
        expensive_labels=a.expensive_labels, finalists=a.finalists, seed=a.seed, width_step=a.width_step,
        max_prune=a.max_prune, menu=a.menu)
    if a.supernet is not None:
        return _search_supernet(a, settings)
    opts = replace(_options(a), method="search", search=settings)
    plan = api.search(opts, out=a.out, progress=make_progress(a.quiet), log=_log(a.quiet), ray=a.ray)
    if not a.quiet:
        s = plan.search
        lat = f", predicted {s['predicted_latency_ms']:.3f} ms ({s['latency_of']})" if "predicted_latency_ms" in s else ""
        kld = f", measured KLD {s['kld']:.4g}" if "kld" in s else ""
        print(f"wrote {a.out}: {s['predicted_mb']:.3f} MB ({s['predicted_bpw']:.3f} bpw){lat}{kld}; MLP widths "
              f"{s['mlp_widths']}; formats {plan.format_counts()}")
    return 0


def _search_supernet(a, settings: SearchSettings) -> int:
    """`edgeq search --supernet NAME`: a CNN supernet's stage widths x int8/float on onnxruntime."""
    if a.model is not None or a.budget_mb is not None or a.bpw is not None or a.plan is not None:
        raise EdgeqError(None, "--supernet searches the named supernet under --latency-ms only: no --model, --plan, "
                               "--budget-mb or --bpw")
    if a.latency_ms is None:
        raise EdgeqError(None, "--supernet needs --latency-ms (the subnet's batch-1 latency on onnxruntime)")
    o = CnnSearchOptions(latency_ms=a.latency_ms, latency_profile=a.latency_profile, supernet=a.supernet,
                         scale=a.supernet_scale, settings=settings,
                         table=replace(TableSettings(), threads=a.search_threads))
    plan, model = api.search_supernet(o, out=a.out, progress=make_progress(a.quiet), log=_log(a.quiet))
    if not a.quiet:
        s = plan.search
        err = f", validation cross-entropy {s['chosen']['val_loss']:.4f}" if "val_loss" in s["chosen"] else ""
        print(f"wrote {a.out} and {model}: widths {s['widths']} of {s['full_widths']}, predicted "
              f"{s['predicted_latency_ms']:.4f} ms for a limit of {a.latency_ms:g} ms{err}; formats "
              f"{plan.format_counts()}. Next: edgeq export --model {model} --plan {a.out} -o out/")
    return 0


def cmd_calibrate(a) -> int:
    im, info = api.calibrate(a.out, a.model, a.adapter or [], a.calib_windows, progress=make_progress(a.quiet),
                             calib_text=a.calib_text, calib_jsonl=a.calib_jsonl, log=_log(a.quiet))
    if not a.quiet:
        print(f"wrote {a.out}: llama.cpp imatrix, {len(im.entries)} entries from {info.get('tokens')} tokens "
              f"({im.chunk_count} chunks of {im.chunk_size})")
    return 0


def _sampling(a) -> dict:
    """The sampling options of run, chat and serve, as SamplingParams keywords (seed None: a random one)."""
    return {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "min_p": a.min_p,
            "repeat_penalty": a.repeat_penalty, "repeat_last_n": a.repeat_last_n, "seed": a.seed}


def cmd_run(a) -> int:
    if runs_remotely(a.device):     # a HIL device: the bundle is pushed and run by the on-device runner
        if a.system is not None or a.stop or a.truncate or a.use_adapter:
            raise EdgeqError(None, f"--system, --stop, --truncate and --use-adapter run in this process, not on "
                                   f"{a.device}")
        with DeviceSession(a.bundle, a.device, a.backend, a.threads, pruning_rate=a.pruning_rate) as s:
            if s.kind == "decoder":
                text = s.generate(a.prompt, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed,
                                  chat=a.chat)
                print(text if a.chat else a.prompt + text)
            else:
                print(json.dumps({"backend": s.backend_name,
                                  "embedding": [round(float(x), 6) for x in s.embed(a.prompt)]}))
        return 0
    with runtime.load(a.bundle, backend=a.backend, threads=a.threads, n_ctx=a.n_ctx, device=a.device,
                      pruning_rate=a.pruning_rate, adapters=_use_adapters(a)) as s:
        if getattr(s, "kind", None) == "encoder":   # the sentence's embedding, and on tvm its latency
            res = {"backend": s.backend_name, "embedding": [round(float(x), 6) for x in s.embed(a.prompt)]}
            if hasattr(s, "time"):
                res["latency"] = s.time(s.encoder_inputs([s.tokenize(a.prompt)]))
            print(json.dumps(res))
            return 0
        if not hasattr(s, "stream"):
            raise EdgeqError(a.bundle, "edgeq run needs a decoder or encoder bundle (a CNN runs from Python: "
                                       "edgeq.runtime.load(...).run(inputs))")
        chat = a.chat or a.system is not None
        prompt = a.prompt
        if chat:
            prompt = [{"role": "system", "content": a.system}] if a.system is not None else []
            prompt.append({"role": "user", "content": a.prompt})
        reply = s.stream(prompt, a.max_tokens, chat=chat, stop=a.stop or (), truncate=a.truncate, **_sampling(a))
        if not chat:
            print(a.prompt, end="", flush=True)
        for piece in reply:
            print(piece, end="", flush=True)
        print()
    return 0


def _use_adapters(a) -> dict[str, float | None] | None:
    return runtime.parse_adapter_choice(a.use_adapter) if a.use_adapter else None


def cmd_chat(a) -> int:
    api.chat(a.bundle, system=a.system, max_tokens=a.max_tokens, backend=a.backend, threads=a.threads,
             n_ctx=a.n_ctx, device=a.device, adapters=_use_adapters(a), **_sampling(a))
    return 0


def cmd_serve(a) -> int:
    api.serve(a.bundle, host=a.host, port=a.port, api_key=a.api_key, queue_size=a.queue_size,
              model_name=a.model_name, backend=a.backend, threads=a.threads, n_ctx=a.n_ctx, device=a.device,
              defaults=_sampling(a), adapters=_use_adapters(a))
    return 0


def cmd_eval(a) -> int:
    res = api.evaluate(a.bundle, text_file=a.text, ctx=a.ctx, chunks=a.chunks, sentences=a.sentences, images=a.images,
                          reference=a.reference, adapters=a.adapter or [], backend=a.backend, threads=a.threads,
                          record=not a.no_record, device=a.device, pruning_rate=a.pruning_rate,
                          use_adapters=_use_adapters(a),
                          progress=make_progress(a.quiet))
    if a.json:
        print(json.dumps(res, sort_keys=True))
    elif "agreement" in res:
        acc = (f"; accuracy {res['accuracy']:.4f} (float reference {res['accuracy_reference']:.4f})"
               if "accuracy" in res else "")
        print(f"{a.bundle}: {res['backend']} argmax agreement with the float reference {res['agreement']:.4f} over "
              f"{res['n_images']} images{acc}")
    elif "cosine_mean" in res:
        print(f"{a.bundle}: {res['backend']} cosine to the float reference: mean {res['cosine_mean']:.5f}, "
              f"min {res['cosine_min']:.5f} over {res['n_sentences']} sentences")
    else:
        using = "".join(f" +{n}:{w:g}" for n, w in (res.get("adapters") or {}).items())
        print(f"{a.bundle}: {res['backend']}{using} ppl {res['ppl']:.4f} (reference {res['ppl_reference']:.4f}), "
              f"KLD {res['kld_mean']:.3e}, top-1 {res['top1']:.4f} over {res['n_tokens_scored']} tokens, ctx {res['ctx']}")
    return 0


def cmd_add_adapter(a) -> int:
    entries = api.add_adapter(a.bundle, a.adapter, model=a.model)
    if not a.quiet:
        files = ", ".join(f"{e['path']} {e['bytes'] / 2**20:.2f} MiB" for e in entries)
        e = entries[0]
        size = f"rank {e['rank']}" if "rank" in e else f"{e['nnz']} sparse entries"
        print(f"added {e['method']} adapter {e['name']} ({size}, scale {e['scale']:g}) to {a.bundle}: {files}")
    return 0


def cmd_profile(a) -> int:
    res = api.profile(a.device, a.backend, a.threads, out=a.out, validate_plans=a.validate, model=a.model,
                      latency_profile=a.latency_profile, validate_dir=a.validate_dir, allow_noisy=a.allow_noisy,
                      quick=a.quick, clock=a.clock, prompt_tokens=a.prompt_tokens, context_tokens=a.context_tokens,
                      progress=make_progress(a.quiet), log=_log(a.quiet), kind=a.model_kind)
    if a.json:
        print(json.dumps({k: v for k, v in res.items() if k != "validation"}
                         | ({"validation": {k: v for k, v in res["validation"].items()
                                            if k in ("decode", "prefill", "memory_mape", "load_average")}}
                            if "validation" in res else {}), sort_keys=True))
        return 0
    n = res["noise"]
    print(f"latency profile {res['profile']}: {res['backend']} {res['kind']}s, {res['threads']} thread(s) on "
          f"{res['device']}; run-to-run spread {n['spread']:.1%} (limit {n['limit']:.0%}), load average "
          f"{res['load_average'].get('max_1min')}")
    v = res.get("validation")
    if v:
        for what in ("decode", "prefill"):
            if what not in v:
                continue
            s = v[what]
            label = what if res["kind"] == "decoder" else ("call of one image" if res["kind"] == "cnn" else
                                                           "call of batch 1")
            print(f"  {label}: {s['within']}/{s['plans']} held-out plans within tolerance ({s['share_within_10pct']:.0%} "
                  f"within 10%), MAPE {s['mape']:.1%}, device spread {s['device_spread_median']:.1%} (median)")
        print(f"  peak memory MAPE {v['memory_mape']:.1%}, {v['memory']['share_within_10pct']:.0%} within 10% "
              f"(median error {v['memory']['median_error']:+.1%}); report and plot in {res['validation_dir']}")
    return 0


def cmd_predict(a) -> int:
    pred = api.predict(a.path, latency_profile=a.latency_profile, backend=a.backend, model=a.model, threads=a.threads,
                       prompt_tokens=a.prompt_tokens, context_tokens=a.context_tokens, device=a.device)
    if a.json:
        print(json.dumps(pred.to_json(), sort_keys=True))
    elif pred.kind == "cnn":
        print(f"{a.path}: {pred.backend}, {pred.threads} thread(s): one image (batch 1) {pred.prefill_ms:.4f} ms, peak "
              f"memory {pred.peak_memory_bytes / 2**20:.0f} MiB")
    elif pred.decode_ms_per_token is None:
        print(f"{a.path}: {pred.backend}, {pred.threads} thread(s): one call of batch 1 x {pred.prompt_tokens} tokens "
              f"{pred.prefill_ms:.2f} ms, peak memory {pred.peak_memory_bytes / 2**20:.0f} MiB")
    else:
        terms = " + ".join(f"{k.removeprefix('peak_memory_').removesuffix('_bytes').replace('_', ' ')} "
                           f"{v / 2**20:.1f}" for k, v in pred.parts.items() if k.startswith("peak_memory_"))
        print(f"{a.path}: {pred.backend}, {pred.threads} thread(s): decode {pred.decode_ms_per_token:.3f} ms/token at "
              f"{pred.context_tokens} tokens of context, prefill of {pred.prompt_tokens} tokens "
              f"{pred.prefill_ms:.1f} ms, peak memory {pred.peak_memory_bytes / 2**20:.0f} MiB"
              + (f" ({terms} MiB)" if terms else ""))
    return 0


def cmd_inspect(a) -> int:
    info = api.inspect(a.path)
    if a.json:
        print(json.dumps(info, sort_keys=True))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other user error, with where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """Unknown options are reported by the command they were given to, so the hint names its --help."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            cmd = " ".join(c for c in (getattr(ns, "cmd", None), getattr(ns, "device_cmd", None)) if c)
            self.exit(2, f"{self.prog}: error: unrecognized arguments: {' '.join(extras)} "
                         f"(see {' '.join((self.prog, cmd))} --help)\n")
        return ns


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default; the examples after the options are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if isinstance(action, argparse._StoreFalseAction):
            return f"{text} (default: on)"
        return f"{text} (default: %(default)s)"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgeq", formatter_class=_Help,
                description="edgeq: an edge-deployment compiler. Compile a model into a bundle for a device "
                            "(export), then run, chat with, serve or evaluate the bundle.",
                epilog=_examples("edgeq export --target android -o out/",
                                 "edgeq chat out/",
                                 "edgeq serve out/ --port 8080"))
    p.add_argument("--version", action="version", version=f"edgeq {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *examples: str, fn=None):
        sp = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help,
                            epilog=_examples(*examples))
        if fn is not None:
            sp.set_defaults(fn=fn)
        return sp

    def use_adapter_option(sp, what: str = ""):
        sp.add_argument("--use-adapter", action="append", metavar="NAME[:WEIGHT]",
                        help="apply the bundle's separate LoRA adapter NAME (export --adapter-mode separate) with "
                             "WEIGHT (default weight: its scale in the manifest)" + what + "; repeat to add several "
                             "(default: none, the base model)")

    def adapter_option(sp, help_text):
        sp.add_argument("--adapter", action="append", metavar="DIR[:WEIGHT][=NAME]",
                        help=help_text + " (default: none)")

    merge_help = ("PEFT LoRA adapter folder (or Hub id org/name[@revision]) merged into the float weights before "
                  "anything else, optionally scaled by WEIGHT (default weight 1); repeat to merge several. With "
                  "--adapter-mode separate it is written beside the base instead, named NAME (default: the "
                  "folder's name), WEIGHT its default scale")
    model_help = ("GGUF file, Hugging Face model folder or Hub id org/name[@revision] (resolved through the HF cache; "
                  "default: the embedded SmolLM2-135M-Instruct)")
    quiet_help = "no progress bars or messages"

    def common_model(sp):
        sp.add_argument("--model", help="GGUF file, Hugging Face folder (Llama family, or a BERT encoder such as "
                                        "all-MiniLM-L6-v2), a Hub id org/name[@revision] or org/name/FILE.gguf "
                                        "(looked up in the HF cache, $HF_HOME; downloaded when online and "
                                        "HF_HUB_OFFLINE is unset), or a torch.export.save'd CNN (.pt2) "
                                        "(default: the embedded SmolLM2-135M-Instruct)")
        adapter_option(sp, merge_help)
        sp.add_argument("--target", default="cpu", help=f"device profile: {', '.join(PROFILES)}")
        sp.add_argument("--backend", choices=[*TARGETS, "all"],
                        help="runtime family; all: one artifact per backend the model kind supports "
                             "(default: the profile's choice for the model kind)")
        sp.add_argument("--quant", help="preset: " + "; ".join(f"{' '.join(t.presets)} ({t.name})"
                                                               for t in TARGETS.values())
                        + "; with --backend all one per backend, e.g. gguf=q4_0,onnx=int4 (default: the "
                          "profile's preset for the backend and model kind)")
        sp.add_argument("--plan", help="plan JSON (rules and per-tensor formats) to apply (default: none)")
        sp.add_argument("--adapter-mode", choices=["merged", "separate"], default="merged",
                        help="merged (default): adapters folded into the float weights, then quantized; separate: "
                             "the base quantized and calibrated alone, each adapter its own small file beside it, "
                             "switched at run time (edgeq run --use-adapter, runtime.load(adapters=...))")
        sp.add_argument("--quiet", action="store_true", help=quiet_help)

    def csv(kind):
        def parse(text: str):
            items = [t.strip() for t in text.split(",") if t.strip()]
            if kind in (int, float):
                try:
                    return [kind(t) for t in items]
                except ValueError:
                    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
            return [t.lower() for t in items]
        return parse

    def calib_text_options(sp):
        sp.add_argument("--calib-text", metavar="FILE|DIR",
                        help="your own calibration text (UTF-8; a folder: every file in it) for the importance "
                             "matrix, Fisher costs, static INT8 ranges and budgeted plans (default: pydoc's topics)")
        sp.add_argument("--calib-jsonl", metavar="FILE",
                        help="your own calibration chats, one {\"messages\": [{\"role\", \"content\"}, ...]} per "
                             "line, rendered with the model's chat template as the device will see them")

    def subset(text: str) -> tuple[int, int]:
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected I/N (the I-th of N disjoint window sets), got {text!r}") from None
        if not 0 <= i < n:
            raise argparse.ArgumentTypeError(f"--calib-subset {text}: I must be in 0..N-1")
        return i, n

    def pruning_rate_option(sp):
        sp.add_argument("--pruning-rate", type=float, metavar="R",
                        help="decoders exported with --pruning-rates: load at this rate (the share of the MLPs' "
                             "channels removed; one of the rates the bundle carries)")

    def calibration_options(sp):
        sp.add_argument("--no-calibration", dest="calibration", action="store_false",
                        help="no importance matrix: llama.cpp's plain quantization (default: calibrated)")
        sp.add_argument("--imatrix", help="llama.cpp imatrix file (GGUF or legacy .dat) to use instead of calibrating "
                                          "(default: computed from the calibration text)")
        sp.add_argument("--calib-windows", type=int, default=None, metavar="N",
                        help="512-token windows of calibration text (default 4; 8 with --pruning-rates, whose "
                             "channel orders are read from them)")
        sp.add_argument("--calib-subset", type=subset, default=(0, 1), metavar="I/N",
                        help="calibrate on the I-th of N disjoint sets of windows spread over the text (default 0/1: "
                             "all of them); measures how much a result depends on the calibration text")
        calib_text_options(sp)
        sp.add_argument("--no-requantize", action="store_true",
                        help="refuse a source whose weights are already quantized (a GGUF in Q4_1, say) instead of "
                             "quantizing them onto another grid (llama-quantize without --allow-requantize)")
        sp.add_argument("--calib-images", help="CNNs: .npz with an array 'images' (n, C, H, W) float32 to calibrate "
                                               "static int8 activation ranges on, the first 512 used (default: none)")

    def search_options(sp):
        calibration_options(sp)
        sp.add_argument("--budget-mb", type=float, help="budget: 10^6 bytes of all model files written (default: "
                                                        "none, a preset)")
        sp.add_argument("--bpw", type=float, help="budget: 8 x file bytes / source parameters (default: none, a "
                                                  "preset)")
        sp.add_argument("--method", default="ilp", choices=["ilp", "dynaquant"], help="allocator")
        sp.add_argument("--formats", type=csv(str), help="candidate formats, comma-separated (default: all the "
                                                         "backend carries)")
        sp.add_argument("--ranks", type=csv(int), default=[0],
                        help="low-rank error branch ranks to consider, e.g. 0,8,16 (gguf: a LoRA-adapter file beside "
                             "the model; onnx: two more MatMuls per branch in the model) (default: 0, none)")
        sp.add_argument("--lowrank-scaling", default="exact", choices=["exact", "diag", "identity"],
                        help="input scaling of the branches' SVD: E[xx^T]^1/2, its diagonal, or none")
        sp.add_argument("--cost", default="auto", choices=["auto", "output", "fisher"],
                        help="sensitivity: output error tr(dW C dW^T), or weighted by the output Fisher with "
                             "tokens weighted by gradient energy (a numpy backward, no torch needed); auto (the "
                             "default): fisher when calibration is on, else output")
        sp.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                        help="compensate each weight's quantization error block by block in its columns not yet "
                             "quantized, through each layer's input covariance (GPTQ with the format's own quantizer: the file stays a plain llama.cpp/onnx/tvm "
                             "file); calibrated plans only, fixed MLP widths (edgeq search's, a plan's keep) compensated after the "
                             "narrowing. Default: on for budgeted GGUF ILP plans with calibration (edgeq search: "
                             "off, as every measured label is then a compensated export), "
                             "and for a plan file that records it, off elsewhere; --no-gptq writes the plain quantization")
        sp.add_argument("--gptq-act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="GPTQ quantizes each weight's format blocks in order of decreasing input energy (the "
                             "default: lower held-out KLD at every measured budget); --no-gptq-act-order: in column order")
        sp.add_argument("--gptq-sequential", action=argparse.BooleanOptionalAction, default=True,
                        help="GPTQ takes each layer's input covariance from the model whose earlier layers are "
                             "already quantized (the default), or (--no-gptq-sequential) from the float model")
        sp.add_argument("--gptq-windows", type=int, metavar="N",
                        help="calibration windows GPTQ's writer takes each layer's input covariance from (default: 32, "
                             "or --calib-windows if more; the planner still prices through the calibration's)")
        sp.add_argument("--gptq-conditional", action="store_true",
                        help="GPTQ's quantizer weights each column by the part of its input the columns quantized "
                             "after it cannot pay back (the Schur complement's diagonal), not by E[x^2]")
        sp.add_argument("--gptq-aim", choices=["quantized", "float"], default="quantized",
                        help="what GPTQ fits each layer's output to: the layer's own output on the quantized model's "
                             "inputs (quantized, the default) or the float model's output (float: GPTAQ's "
                             "objective, so earlier layers' errors are paid back too)")
        sp.add_argument("--gptq-tokens", choices=["uniform", "fisher"], default="uniform",
                        help="how GPTQ's writer weights the calibration tokens in each layer's H: alike (uniform, "
                             "the default) or by how much that layer's output error at the token costs at the "
                             "logits (fisher: the output gradient's energy, from a numpy backward of the float "
                             "model over the writer's windows; each weight gets its own H)")
        sp.add_argument("--gptq-token-windows", type=int, metavar="N",
                        help="with --gptq-tokens fisher: the backward over N of the writer's windows only; the other "
                             "windows' tokens get those tokens' mean weight at their kind of position (a window's "
                             "first token, the attention sink, or a later one) (default: every window)")
        sp.add_argument("--ties", type=csv(str), default=[], help="tensors that must share a format: qkv,gate_up "
                                                                  "(default: none)")
        latency_options(sp)
        sp.add_argument("--latency-ms", type=float,
                        help="latency budget: the plan's predicted decode step (or prefill of --prompt-tokens) on the "
                             "profiled device may not exceed this many ms (needs --latency-profile)")
        sp.add_argument("--pruning-rates", type=csv(float), metavar="R,R,...",
                        help="decoders: sort every MLP's channels and record per-layer widths for these pruning rates "
                             "(shares of the MLPs' channels removed, e.g. 0,0.05,0.15,0.25,0.35); one model file, "
                             "the rate picked at load (edgeq run/eval --pruning-rate)")
        sp.add_argument("--prune-order", default="uniql",
                        choices=["uniql", "ridge", "leverage", "magnitude", "wanda", "random"],
                        help="how MLP channels are ordered: uniql (nested greedy removal of what least changes the "
                             "MLP output, by the covariance of the channels' contributions C x W^T W with its "
                             "cross terms; default), ridge (ridge leverage of C x W^T W), leverage (of C itself, the "
                             "seed paper's), magnitude (L1 of down's columns), wanda, random")
        sp.add_argument("--prune-alloc", default="uniql", choices=["uniql", "uniform"],
                        help="per-layer widths for a rate: uniql (layers that change the residual stream less are "
                             "pruned more; default) or uniform")
        sp.add_argument("--prune-ridge", type=float, metavar="F",
                        help="ridge and leverage orders: the ridge lambda as a multiple of the matrix's mean "
                             "eigenvalue (defaults 10 and 1, chosen on calibration text by bench/uniql.py)")
        sp.add_argument("--recover-steps", type=int, default=0, metavar="N",
                        help="with --pruning-rates: N steps of masked LoRA fine-tuning on the calibration text, a "
                             "rate sampled per step, merged into the weights (needs torch: pip install "
                             "'edgeq[search]'; default 0)")
        sp.add_argument("--prune-compensate", action="store_true",
                        help="with --pruning-rates (GGUF): at each rate give every down projection the bias "
                             "W_down[:, removed] . E[h_removed] over calibration (the removed channels' mean output; "
                             "the uniql, ridge and leverage orders then rank on the centered covariance)")
        sp.add_argument("--prune-attention", action="store_true",
                        help="with --pruning-rates: prune the attention's head dimensions at the same rate too (Q/K "
                             "RoPE pairs by the product of their norms, V/O by an SVD per KV group; ONNX only: "
                             "llama.cpp has one head size for all layers, TVM's library fixes it)")
        sp.add_argument("--prune-attention-ratio", type=csv(float), metavar="QK,V",
                        help="with --prune-attention: the Q/K and the V head dimensions' pruning rates as multiples "
                             "of the MLPs' (the rate then counts every family's parameters; default chosen by "
                             "bench/uniql.py --stage attention)")
        sp.add_argument("--prune-temperature", type=float, metavar="T",
                        help="uniql alloc: softmax temperature in units of the layer importances' spread (default "
                             "1, chosen by bench/uniql.py; 0 is uniform)")

    def latency_options(sp):
        sp.add_argument("--latency-profile", help="latency profile (edgeq profile) of the device: predicts the plan "
                                                  "(manifest `predicted`)")
        sp.add_argument("--prompt-tokens", type=int,
                        help="tokens of the prompt whose prefill is predicted (default 128); with --latency-ms the "
                             "budget bounds this prefill instead of a decode step")
        sp.add_argument("--context-tokens", type=int,
                        help="tokens already in the KV cache at the decode step predicted (default 64)")

    def bundle_runtime(sp, what: str, device_help: str = "tvm bundles: cpu or rpc://HOST:PORT, a TVM RPC server "
                                                         "(default: cpu)"):
        sp.add_argument("bundle", help="bundle folder (what edgeq export wrote)")
        sp.add_argument("--backend", help=f"which artifact of the bundle to {what} (default: the first)")
        sp.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for the runtime (default: the bundle's device profile's, e.g. 4 for "
                             "--target android or cpu, at most this machine's physical cores; all of them for a "
                             "profile that says auto; the EDGEQ_THREADS environment variable overrides it)")
        sp.add_argument("--n-ctx", type=int, metavar="N", help="context length in tokens (default: the bundle's)")
        sp.add_argument("--device", help=device_help)

    def sampling_options(sp, seed: int | None, title: str = "sampling"):
        g = sp.add_argument_group(f"{title} (llama.cpp's sampler on gguf, the same steps in edgeq's elsewhere)")
        g.add_argument("--temperature", type=float, default=0.0,
                       help="0: greedy, the most likely token (small models answer best so: see the README)")
        g.add_argument("--top-k", type=int, default=40,
                       help="at temperature > 0, keep the k most likely tokens; 0: all")
        g.add_argument("--top-p", type=float, default=0.95,
                       help="at temperature > 0, keep the most likely tokens up to this total probability; 1: all")
        g.add_argument("--min-p", type=float, default=0.05,
                       help="at temperature > 0, drop tokens less likely than this times the most likely; 0: none")
        g.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty on recently seen tokens; 1: none")
        g.add_argument("--repeat-last-n", type=int, default=64, metavar="N", help="tokens the penalty looks back at")
        g.add_argument("--seed", type=int, default=seed,
                       help="random seed for sampling" + (" (default: a random one)" if seed is None else ""))

    e = command("export", "compile a model into a bundle",
                "edgeq export --target android -o out/",
                "edgeq export --backend onnx --quant int4 -o out-onnx/",
                "edgeq export --budget-mb 95 --ranks 0,8,16 -o out-budget/", fn=cmd_export)
    common_model(e)
    search_options(e)
    e.add_argument("-o", "--out", required=True, help="bundle folder to write")
    e.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    e.add_argument("--n-ctx", type=int, metavar="N", help="context length recorded for the device (default: the "
                                                          "profile's, within the model's)")
    e.add_argument("--kv-dtype", choices=["f32", "f16", "q8_0"], help="KV-cache type (default: f32 for f32, else "
                                                                      "the profile's)")
    e.add_argument("--ndk-clang", help="tvm on android: the NDK's clang++ that links a .so (default: "
                                       "$EDGEQ_ANDROID_CLANG; without one, a .tar of objects)")
    e.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                   help="put bin/edgeq-run (a static aarch64 runner over llama.cpp, no Python needed) and a `run` "
                        "script in the bundle; default: on for android and linux-arm64 gguf decoders (built once "
                        "with the aarch64-linux-gnu cross toolchain, cached in ~/.cache/edgeq/native)")
    e.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="tvm: meta-schedule tuning trials in all (default 0: untuned, byte-identical); the "
                        "database is cached per profile in ~/.cache/edgeq/tvm-tune/ and reused")

    pl = command("plan", "write the plan an export would use (a preset, or a budgeted allocation)",
                 "edgeq plan --quant q4_k_m -o plan.json",
                 "edgeq plan --bpw 5 --method dynaquant -o plan.json",
                 "edgeq export --plan plan.json -o out/", fn=cmd_plan)
    common_model(pl)
    search_options(pl)
    pl.add_argument("-o", "--out", required=True, help="plan JSON to write")

    c = command("calibrate", "write llama.cpp's importance matrix (imatrix GGUF) from calibration text",
                "edgeq calibrate -o imatrix.gguf",
                "edgeq export --quant q4_k_m --imatrix imatrix.gguf -o out/", fn=cmd_calibrate)
    c.add_argument("--model", help=model_help)
    adapter_option(c, merge_help)
    c.add_argument("--calib-windows", type=int, default=4, metavar="N", help="512-token windows of calibration text")
    calib_text_options(c)
    c.add_argument("-o", "--out", required=True, help="imatrix file to write (.gguf)")
    c.add_argument("--quiet", action="store_true", help=quiet_help)

    r = command("run", "generate text with a bundle (streamed as it is decoded), or embed a sentence",
                'edgeq run out/ "The capital of France is"',
                'edgeq run out/ --chat "What is the capital of France?"',
                'edgeq run out/ --system "Answer in French." "Name a colour." --temperature 0.7 --seed 1', fn=cmd_run)
    bundle_runtime(r, "run", DEVICE_HELP)
    r.add_argument("prompt", help="text to continue, or with --chat the user's message")
    r.add_argument("--chat", action="store_true", help="send the prompt as a user message through the model's chat "
                                                       "template; stops at the end of the turn")
    r.add_argument("--system", help="system message (implies --chat) (default: none, the template's own)")
    r.add_argument("--max-tokens", type=int, default=64, metavar="N", help="most tokens to generate")
    r.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text; repeatable (default: "
                                                                   "none)")
    r.add_argument("--truncate", action="store_true", help="cut a prompt that does not fit the context (its "
                                                           "start) instead of refusing it")
    sampling_options(r, seed=0)
    pruning_rate_option(r)
    use_adapter_option(r)

    ch = command("chat", "chat with a decoder bundle in the terminal: history, streaming; /reset, /exit",
                 "edgeq chat out/",
                 'edgeq chat out/ --system "You are a terse assistant." --temperature 0.7 --seed 1',
                 "edgeq chat out/ --backend onnx --max-tokens 256 --repeat-penalty 1.1", fn=cmd_chat)
    bundle_runtime(ch, "chat with")
    ch.add_argument("--system", help="system message at the start of the conversation (default: none, the "
                                     "template's own)")
    ch.add_argument("--max-tokens", type=int, default=512, metavar="N", help="most tokens per reply")
    sampling_options(ch, seed=None)
    use_adapter_option(ch)

    sv = command("serve", "serve a bundle over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions "
                          "(streamed or not), /v1/embeddings, /v1/models, /health",
                 "edgeq serve out/",
                 "edgeq serve out/ --host 0.0.0.0 --port 9000 --api-key $KEY --queue-size 32",
                 "curl -s localhost:8080/v1/chat/completions -d '{\"messages\": [{\"role\": \"user\", "
                 "\"content\": \"Hi\"}]}'", fn=cmd_serve)
    bundle_runtime(sv, "serve")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free one, printed)")
    sv.add_argument("--api-key", default=os.environ.get("EDGEQ_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 (default: $EDGEQ_API_KEY, else none)")
    sv.add_argument("--queue-size", type=int, default=16, metavar="N",
                    help="requests that may wait while one runs; past it the server answers 503")
    sv.add_argument("--model-name", help="the model id clients send (default: the bundle folder's name; the "
                                         "model's own name is accepted too)")
    sampling_options(sv, seed=None, title="sampling for requests that leave it out")
    use_adapter_option(sv, " for requests that name none (a request's \"adapters\": {\"NAME\": WEIGHT} or "
                           "[\"NAME[:WEIGHT]\"] chooses its own; {} the base)")

    ev = command("eval", "fidelity of a bundle in its runtime vs the float reference",
                 "edgeq eval out/ --json",
                 "edgeq eval out/ --text my_eval.txt --ctx 512 --chunks 0",
                 "edgeq eval out-tvm/ --device rpc://127.0.0.1:9090", fn=cmd_eval)
    ev.add_argument("bundle", help="bundle folder (what edgeq export wrote)")
    ev.add_argument("--text", help="evaluation text file; for encoders one sentence per line (default: the held-out "
                                   "half of Python's pydoc text)")
    ev.add_argument("--images", help="CNNs: .npz with 'images' (n, C, H, W) float32 and optional 'labels' (n,) "
                                     "(default: none)")
    ev.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per scored window")
    ev.add_argument("--chunks", type=int, default=8, metavar="N", help="windows to score (0: all the text)")
    ev.add_argument("--sentences", type=int, default=256, metavar="N", help="encoders: sentences to score (0: all)")
    ev.add_argument("--reference", help="float source model, file or folder (default: the one the manifest names, "
                                        "if found; CNNs: the .pt2)")
    adapter_option(ev, "the adapter folders of the float reference: those the bundle merged at export, then those "
                       "--use-adapter applies (checked against the manifest's SHA-256)")
    use_adapter_option(ev)
    ev.add_argument("--backend", help="which artifact of the bundle to evaluate (default: the first)")
    ev.add_argument("--threads", type=int, default=1, help="CPU threads for the runtime")
    ev.add_argument("--device", help=DEVICE_HELP)
    pruning_rate_option(ev)
    ev.add_argument("--json", action="store_true", help="print one flat JSON object")
    ev.add_argument("--no-record", action="store_true", help="do not add the result to measurements.json")
    ev.add_argument("--quiet", action="store_true", help=quiet_help)

    aa = command("add-adapter", "add a LoRA or SHiRA adapter to a bundle beside its base (the base untouched)",
                 "edgeq add-adapter out/ ./sql-lora/=sql",
                 "edgeq add-adapter out/ ./chat-lora/:0.5=chat --model ./base/", fn=cmd_add_adapter)
    aa.add_argument("bundle", help="bundle folder (exported with --adapter-mode separate for onnx and tvm)")
    aa.add_argument("adapter", metavar="DIR[:WEIGHT][=NAME]",
                    help="PEFT adapter folder (or Hub id), its default scale WEIGHT and the NAME it is listed "
                         "under (default: the folder's name)")
    aa.add_argument("--model", help="the bundle's source model, needed only when the adapter saved full embedding "
                                    "or head weights (checked against them and the manifest's digest) (default: "
                                    "none)")
    aa.add_argument("--quiet", action="store_true", help="no messages")

    i = command("inspect", "describe a bundle (checksums verified), a GGUF file or a Hugging Face model folder",
                "edgeq inspect out/",
                "edgeq inspect model.gguf --json", fn=cmd_inspect)
    i.add_argument("path", help="bundle folder, GGUF file, .pt2 or Hugging Face folder")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    se = command("search", "search MLP widths x formats under latency and memory budgets (APQ); write the plan",
                 "edgeq search --latency-ms 20 --latency-profile prof.json -o plan.json",
                 "edgeq search --latency-ms 20 --budget-mb 80 --latency-profile prof.json -o plan.json "
                 "--expensive-labels 16", fn=cmd_search)
    common_model(se)
    search_options(se)
    se.add_argument("-o", "--out", required=True, help="plan JSON to write (then: edgeq export --plan)")
    g = se.add_argument_group("search")
    d = SearchSettings()
    g.add_argument("--population", type=int, default=d.population, help="candidates per generation")
    g.add_argument("--generations", type=int, default=d.generations, help="generations of evolution")
    g.add_argument("--mutation", type=float, default=d.mutation, help="chance to mutate each gene and width")
    g.add_argument("--cheap-labels", type=int, default=d.cheap_labels, metavar="N",
                   help="random configurations labelled by their summed Fisher + pruning cost (pre-training)")
    g.add_argument("--expensive-labels", type=int, default=d.expensive_labels, metavar="N",
                   help="configurations within the budgets exported and measured for real (KLD in the runtime) "
                        "to fine-tune the accuracy predictor (0: the cheap predictor alone)")
    g.add_argument("--finalists", type=int, default=d.finalists, metavar="N",
                   help="best configurations by the predictor measured for real at the end; the best measured "
                        "one is written (0: the predictor's best, unmeasured)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (same inputs and seed: same plan)")
    g.add_argument("--width-step", type=int, default=d.width_step, metavar="N",
                   help="MLP width menu step, then aligned to each layer's formats' blocks")
    g.add_argument("--max-prune", type=float, default=d.max_prune, metavar="R",
                   help="largest share of a layer's MLP channels the search may prune")
    g.add_argument("--menu", default=d.menu, choices=["fixed", "auto"],
                   help="fixed: --width-step and every format; auto: score width steps 16/32/64/256 x format sets "
                        "(all, 32-weight blocks, 256-weight blocks) by SpaceEvo's Q-T score (share of samples within "
                        "the budgets x predicted quality of the best) and search the best (the table: plan "
                        "search.menus)")
    g.add_argument("--supernet", choices=list(SUPERNETS),
                   help="search a CNN once-for-all supernet instead of --model: per-stage channel widths, elastic depth "
                        "and kernel size x int8/float per layer on onnxruntime, under --latency-ms (batch 1); digits: the digits CNN's, trained "
                        "here (seeded, about a minute); writes the plan and the subnet beside it as a .pt2 "
                        "(then: edgeq export --model PLAN.pt2 --plan PLAN.json). --latency-profile names its "
                        "per-layer latency table: read when the file exists, else measured and written there")
    g.add_argument("--supernet-scale", type=int, default=1, metavar="K",
                   help="--supernet: K times the network's channels in every stage (default 1)")
    g.add_argument("--search-threads", type=int, default=1, metavar="N",
                   help="--supernet: onnxruntime threads the latency table is measured with (default 1)")
    g.add_argument("--ray", metavar="ADDRESS",
                   help="measure the expensive labels as tasks on this Ray cluster (ray://host:10001, host:6379, or "
                        "local: a new local instance; needs pip install 'edgeq[ray]') (default: in this process)")

    pr = command("profile", "measure a latency profile of a device (once), optionally validate it",
                 "edgeq profile --backend gguf --clock cpu",
                 "edgeq profile --device ssh://user@board --backend onnx --validate 4", fn=cmd_profile)
    pr.add_argument("--device", default="local",
                    help="local (or cpu), ssh://user@host[:port], rpc://host:port, adb:SERIAL, qemu-arm64 "
                         "(default local)")
    pr.add_argument("--backend", default="gguf", choices=list(TARGETS), help="runtime to profile (default gguf)")
    pr.add_argument("--threads", type=int, default=1, help="threads the runtime uses (default 1)")
    pr.add_argument("--model-kind", choices=["decoder", "encoder", "cnn"],
                    help="what the micro-models are: decoder (default), encoder (BERT, onnx; calls of batch 1 at "
                         "32-256 tokens) or cnn (subnets of the digits supernet, onnx; one image); with "
                         "--latency-profile, checked against the profile")
    pr.add_argument("-o", "--out", help="also write the profile here (it is always cached in "
                                        "~/.cache/edgeq/profiles/)")
    pr.add_argument("--validate", type=int, default=0, metavar="K",
                    help="then export K held-out plans of --model with random per-tensor formats, run them on the "
                         "device and report the prediction's accuracy (validation.json, validation.png)")
    pr.add_argument("--validate-dir", help="folder for the held-out bundles and the report (default: beside the "
                                           "profile)")
    pr.add_argument("--model", help="model of the held-out plans (default: the embedded SmolLM2-135M-Instruct; "
                                    "encoders: all-MiniLM-L6-v2, whose widths an encoder profile also times)")
    pr.add_argument("--latency-profile", help="validate this profile instead of measuring a new one")
    pr.add_argument("--prompt-tokens", type=int, help="validation: prefill length (an encoder's sequence) timed "
                                                      "(default 128)")
    pr.add_argument("--context-tokens", type=int, help="validation: context of the decode steps timed (default 64)")
    pr.add_argument("--allow-noisy", action="store_true",
                    help="keep a profile although the device's run-to-run spread is above 5%%")
    pr.add_argument("--quick", action="store_true", help="two micro-model shapes, fewer rounds: a rough profile")
    pr.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall (default): the wall clock; cpu: the runtime's CPU time (one thread), which leaves out "
                         "time spent waiting for a core on a shared machine: an idle device's wall time")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.add_argument("--quiet", action="store_true", help=quiet_help)

    pd = command("predict", "predict a bundle's or a plan's prefill, decode step and peak memory",
                 "edgeq predict out/ --latency-profile ~/.cache/edgeq/profiles/PROFILE.json",
                 "edgeq predict plan.json --latency-profile prof.json --prompt-tokens 512", fn=cmd_predict)
    pd.add_argument("path", help="bundle folder, or plan JSON (then --model names the model)")
    latency_options(pd)
    pd.add_argument("--backend", help="which artifact of the bundle (or the plan's backend)")
    pd.add_argument("--model", help="plans: the model they are for (default: the embedded SmolLM2-135M-Instruct)")
    pd.add_argument("--threads", type=int, help="threads (must be the profile's)")
    pd.add_argument("--device", help="check first that the profile was measured on this device (local, ssh://...)")
    pd.add_argument("--json", action="store_true", help="print one flat JSON object")


    add_device_parser(sub, command)
    return p


def main(argv: list[str] | None = None) -> int:
    """Every user error is one line and exit status 2; anything else one line and 1. EDGEQ_DEBUG=1: tracebacks."""
    args = build_parser().parse_args(argv)
    if os.environ.get("EDGEQ_DEBUG", "") not in ("", "0"):
        return args.fn(args)
    try:
        return args.fn(args)
    except EdgeqError as exc:
        print(f"edgeq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                 # `edgeq run ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:                  # a file or the system refused (permissions, a full disk ...)
        print(f"edgeq: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:                # a bug: one line still, the traceback on request
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"edgeq: internal error: {type(exc).__name__}: {first} (EDGEQ_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
