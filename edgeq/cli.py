"""The `edgeq` command line.

Vocabulary: --target is a device profile, --backend a runtime family,
--quant a preset; "format" is always a quantization format.
Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from edgeq import __version__, api, runtime
from edgeq.compile.options import ExportOptions
from edgeq.core.errors import EdgeqError
from edgeq.core.progress import make_progress
from edgeq.devices.cli import add_device_parser
from edgeq.targets.profiles import PROFILES
from edgeq.targets.registry import TARGETS


def _log(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))


def _options(a, out: str = "out") -> ExportOptions:
    """ExportOptions from the options `export` and `plan` share."""
    return ExportOptions(
        model=a.model, target=a.target, backend=a.backend, quant=a.quant, plan=a.plan, out=out,
        force=getattr(a, "force", False), n_ctx=getattr(a, "n_ctx", None), kv_dtype=getattr(a, "kv_dtype", None),
        calibration=a.calibration, imatrix=a.imatrix, calib_windows=a.calib_windows, budget_mb=a.budget_mb,
        bpw=a.bpw, method=a.method, formats=a.formats, ranks=a.ranks, ties=a.ties, lowrank_scaling=a.lowrank_scaling,
        cost=a.cost,
        adapters=getattr(a, "adapter", None) or [], adapter_mode=getattr(a, "adapter_mode", None) or "merged",
        calib_images=getattr(a, "calib_images", None),
        calib_text=getattr(a, "calib_text", None), calib_jsonl=getattr(a, "calib_jsonl", None),
        allow_requantize=not getattr(a, "no_requantize", False),
        ndk_clang=getattr(a, "ndk_clang", None),
        tune_trials=getattr(a, "tune_trials", 0) or 0,
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
        files = ", ".join(f"{x['path']} {x['bytes'] / 2**20:.2f} MiB" for x in m["artifacts"] if x["role"] != "tokenizer")
        formats = next(x["formats"] for x in m["artifacts"] if x["role"] == "model")
        print(f"wrote {a.out}: {files} ({sum(x['bytes'] for x in m['artifacts'] if x['role'] != 'tokenizer') / 1e6:.3f} "
              f"MB), {m['model']['bits_per_weight']:.3f} bpw, formats {formats}; "
              f"{_check_summary(res['measurements'].get('reference_check', {}))}")
    return 0


def cmd_plan(a) -> int:
    plan = api.plan(_options(a), out=a.out, progress=make_progress(a.quiet), log=_log(a.quiet))
    if not a.quiet:
        extra = ""
        if plan.search and (a.budget_mb is not None or a.bpw is not None):
            s = plan.search
            extra = (f"; {s['method']}: {s['predicted_mb']:.3f} MB ({s['predicted_bpw']:.3f} bpw) for a budget of "
                     f"{s['budget_mb']:.3f} MB, predicted error {s['predicted_error']:.4g}")
        print(f"wrote {a.out}: {len(plan.tensors)} tensors, formats {plan.format_counts()}{extra}")
    return 0


def cmd_calibrate(a) -> int:
    im, info = api.calibrate(a.out, a.model, a.adapter or [], a.calib_windows, progress=make_progress(a.quiet),
                             calib_text=a.calib_text, calib_jsonl=a.calib_jsonl, log=_log(a.quiet))
    if not a.quiet:
        print(f"wrote {a.out}: llama.cpp imatrix, {len(im.entries)} entries from {info.get('tokens')} tokens "
              f"({im.chunk_count} chunks of {im.chunk_size})")
    return 0


def cmd_run(a) -> int:
    use = runtime.parse_adapter_choice(a.use_adapter) if a.use_adapter else None
    with runtime.load(a.bundle, backend=a.backend, threads=a.threads, device=a.device, adapters=use) as s:
        if hasattr(s, "embed"):   # encoder bundles (onnx, tvm): the sentence's embedding, and on tvm its latency
            res = {"backend": s.backend_name, "embedding": [round(float(x), 6) for x in s.embed(a.prompt)]}
            if hasattr(s, "time"):
                res["latency"] = s.time(s.encoder_inputs([s.tokenize(a.prompt)]))
            print(json.dumps(res))
            return 0
        text = s.generate(a.prompt, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed, chat=a.chat)
    print(text if a.chat else a.prompt + text)
    return 0


def cmd_eval(a) -> int:
    res = api.evaluate(a.bundle, text_file=a.text, ctx=a.ctx, chunks=a.chunks, sentences=a.sentences, images=a.images,
                          reference=a.reference, adapters=a.adapter or [], backend=a.backend, threads=a.threads,
                          record=not a.no_record, device=a.device,
                          use_adapters=runtime.parse_adapter_choice(a.use_adapter) if a.use_adapter else None,
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
        print(f"added adapter {entries[0]['name']} (rank {entries[0]['rank']}, scale {entries[0]['scale']:g}) to "
              f"{a.bundle}: {files}")
    return 0


def cmd_inspect(a) -> int:
    info = api.inspect(a.path)
    if a.json:
        print(json.dumps(info, sort_keys=True))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeq", description="edge-deployment compiler")
    p.add_argument("--version", action="version", version=f"edgeq {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def use_adapter_option(sp):
        sp.add_argument("--use-adapter", action="append", metavar="NAME[:WEIGHT]",
                        help="apply the bundle's separate LoRA adapter NAME (export --adapter-mode separate) with "
                             "WEIGHT (default: its scale in the manifest); repeat to add several")

    def adapter_option(sp, help_text):
        sp.add_argument("--adapter", action="append", metavar="DIR[:WEIGHT][=NAME]", help=help_text)

    merge_help = ("PEFT LoRA adapter folder (or Hub id org/name[@revision]) merged into the float weights before "
                  "anything else, optionally scaled by WEIGHT (default 1); repeat to merge several. With "
                  "--adapter-mode separate it is written beside the base instead, named NAME (default: the "
                  "folder's name), WEIGHT its default scale")
    model_help = ("GGUF file, Hugging Face model folder or Hub id org/name[@revision] (resolved through the HF cache; "
                  "default: the embedded SmolLM2-135M-Instruct)")

    def common_model(sp):
        sp.add_argument("--model", help="GGUF file, Hugging Face folder (Llama family, or a BERT encoder such as "
                                        "all-MiniLM-L6-v2), a Hub id org/name[@revision] or org/name/FILE.gguf "
                                        "(looked up in the HF cache, $HF_HOME; downloaded when online and "
                                        "HF_HUB_OFFLINE is unset), or a torch.export.save'd CNN (.pt2) "
                                        "(default: the embedded SmolLM2-135M-Instruct)")
        adapter_option(sp, merge_help)
        sp.add_argument("--target", default="cpu", help=f"device profile: {', '.join(PROFILES)} (default cpu)")
        sp.add_argument("--backend", choices=[*TARGETS, "all"],
                        help="runtime family (default: the profile's choice); all: one artifact per backend the "
                             "model kind supports")
        sp.add_argument("--quant", help="preset: " + "; ".join(f"{' '.join(t.presets)} ({t.name})"
                                                               for t in TARGETS.values())
                        + "; with --backend all one per backend, e.g. gguf=q4_0,onnx=int4")
        sp.add_argument("--plan", help="plan JSON (rules and per-tensor formats) to apply")
        sp.add_argument("--adapter-mode", choices=["merged", "separate"], default="merged",
                        help="merged (default): adapters folded into the float weights, then quantized; separate: "
                             "the base quantized and calibrated alone, each adapter its own small file beside it, "
                             "switched at run time (edgeq run --use-adapter, runtime.load(adapters=...))")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or messages")

    def csv(kind):
        def parse(text: str):
            items = [t.strip() for t in text.split(",") if t.strip()]
            if kind is int:
                try:
                    return [int(t) for t in items]
                except ValueError:
                    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
            return [t.lower() for t in items]
        return parse

    def calib_text_options(sp):
        sp.add_argument("--calib-text", metavar="FILE|DIR",
                        help="your own calibration text (UTF-8; a folder: every file in it) for the importance "
                             "matrix, Fisher costs, static INT8 ranges and budgeted plans (default: pydoc's topics)")
        sp.add_argument("--calib-jsonl", metavar="FILE",
                        help="your own calibration chats, one {\"messages\": [{\"role\", \"content\"}, ...]} per "
                             "line, rendered with the model's chat template as the device will see them")

    def calibration_options(sp):
        sp.add_argument("--no-calibration", dest="calibration", action="store_false",
                        help="no importance matrix: llama.cpp's plain quantization")
        sp.add_argument("--imatrix", help="llama.cpp imatrix file (GGUF or legacy .dat) to use instead of calibrating")
        sp.add_argument("--calib-windows", type=int, default=4, help="512-token windows of calibration text (default 4)")
        calib_text_options(sp)
        sp.add_argument("--no-requantize", action="store_true",
                        help="refuse a source whose weights are already quantized (a GGUF in Q4_1, say) instead of "
                             "quantizing them onto another grid (llama-quantize without --allow-requantize)")
        sp.add_argument("--calib-images", help="CNNs: .npz with an array 'images' (n, C, H, W) float32 to calibrate "
                                               "static int8 activation ranges on (the first 512 are used)")

    def search_options(sp):
        calibration_options(sp)
        sp.add_argument("--budget-mb", type=float, help="budget: 10^6 bytes of all model files written")
        sp.add_argument("--bpw", type=float, help="budget: 8 x file bytes / source parameters")
        sp.add_argument("--method", default="ilp", choices=["ilp", "dynaquant"], help="allocator (default ilp)")
        sp.add_argument("--formats", type=csv(str), help="candidate formats, comma-separated (default: all the backend carries)")
        sp.add_argument("--ranks", type=csv(int), default=[0],
                        help="low-rank error branch ranks to consider, e.g. 0,8,16 (gguf: a LoRA-adapter file beside "
                             "the model; onnx: two more MatMuls per branch in the model)")
        sp.add_argument("--lowrank-scaling", default="exact", choices=["exact", "diag", "identity"],
                        help="input scaling of the branches' SVD: E[xx^T]^1/2, its diagonal, or none (default exact)")
        sp.add_argument("--cost", default="auto", choices=["auto", "output", "fisher"],
                        help="sensitivity: output error tr(dW C dW^T), or weighted by the output Fisher with "
                             "tokens weighted by gradient energy (needs torch); auto (default): fisher when torch "
                             "is installed and calibration is on, else output")
        sp.add_argument("--ties", type=csv(str), default=[], help="tensors that must share a format: qkv,gate_up")

    e = sub.add_parser("export", help="compile a model into a bundle")
    common_model(e)
    search_options(e)
    e.add_argument("-o", "--out", required=True, help="bundle folder to write")
    e.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    e.add_argument("--n-ctx", type=int, help="context length recorded for the device")
    e.add_argument("--kv-dtype", choices=["f32", "f16", "q8_0"], help="KV-cache type (default: f32 for f32, else f16)")
    e.add_argument("--ndk-clang", help="tvm on android: the NDK's clang++ that links a .so (default: "
                                       "$EDGEQ_ANDROID_CLANG; without one, a .tar of objects)")
    e.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="tvm: meta-schedule tuning trials in all (default 0: untuned, byte-identical); the "
                        "database is cached per profile in ~/.cache/edgeq/tvm-tune/ and reused")
    e.set_defaults(fn=cmd_export)

    pl = sub.add_parser("plan", help="write the plan an export would use (a preset, or a budgeted allocation)")
    common_model(pl)
    search_options(pl)
    pl.add_argument("-o", "--out", required=True, help="plan JSON to write")
    pl.set_defaults(fn=cmd_plan)

    c = sub.add_parser("calibrate", help="write llama.cpp's importance matrix (imatrix GGUF) from calibration text")
    c.add_argument("--model", help=model_help)
    adapter_option(c, merge_help)
    c.add_argument("--calib-windows", type=int, default=4, help="512-token windows of calibration text (default 4)")
    calib_text_options(c)
    c.add_argument("-o", "--out", required=True, help="imatrix file to write (.gguf)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=cmd_calibrate)

    r = sub.add_parser("run", help="generate text with a bundle")
    r.add_argument("bundle")
    r.add_argument("prompt")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--backend", help="which artifact of the bundle to run")
    r.add_argument("--device", help="tvm bundles: cpu (default) or rpc://HOST:PORT (a TVM RPC server)")
    use_adapter_option(r)
    r.set_defaults(fn=cmd_run)

    ev = sub.add_parser("eval", help="fidelity of a bundle in its runtime vs the float reference")
    ev.add_argument("bundle")
    ev.add_argument("--text", help="evaluation text file (default: held-out pydoc text shipped with Python); "
                                   "for encoders one sentence per line")
    ev.add_argument("--images", help="CNNs: .npz with 'images' (n, C, H, W) float32 and optional 'labels' (n,)")
    ev.add_argument("--ctx", type=int, default=512)
    ev.add_argument("--chunks", type=int, default=8, help="windows to score (0: all the text)")
    ev.add_argument("--sentences", type=int, default=256, help="encoders: sentences to score (0: all)")
    ev.add_argument("--reference", help="float source model, file or folder (default: the one the manifest names, "
                                        "if found; CNNs: the .pt2)")
    adapter_option(ev, "the adapter folders of the float reference: those the bundle merged at export, then those "
                       "--use-adapter applies (checked against the manifest's SHA-256)")
    use_adapter_option(ev)
    ev.add_argument("--backend", help="which artifact of the bundle to evaluate")
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--device", help="tvm bundles: cpu (default) or rpc://HOST:PORT (a TVM RPC server)")
    ev.add_argument("--json", action="store_true", help="print one flat JSON object")
    ev.add_argument("--no-record", action="store_true", help="do not add the result to measurements.json")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(fn=cmd_eval)

    aa = sub.add_parser("add-adapter", help="add a LoRA adapter to a bundle beside its base (the base untouched)")
    aa.add_argument("bundle", help="bundle folder (exported with --adapter-mode separate for onnx and tvm)")
    aa.add_argument("adapter", metavar="DIR[:WEIGHT][=NAME]",
                    help="PEFT LoRA adapter folder (or Hub id), its default scale WEIGHT and the NAME it is listed "
                         "under (default: the folder's name)")
    aa.add_argument("--model", help="the bundle's source model, needed only when the adapter saved full embedding "
                                    "or head weights (checked against them and the manifest's digest)")
    aa.add_argument("--quiet", action="store_true")
    aa.set_defaults(fn=cmd_add_adapter)

    i = sub.add_parser("inspect", help="describe a bundle, a GGUF file or a Hugging Face model folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    add_device_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except EdgeqError as exc:
        print(f"edgeq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
