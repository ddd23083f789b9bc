"""edgeq's Python API, one function per command of the CLI (`edgeq.export`, `edgeq.plan`, ...).

Options are those of the command line, as an `ExportOptions` or as keywords (`quant="q4_k_m"`); the CLI
only parses arguments and calls these. Running a bundle is `edgeq.runtime` (what a device installs).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edgeq import runtime
from edgeq.bundle.inspect import inspect_path
from edgeq.compile import pipeline
from edgeq.compile.add_adapter import add_adapter as add_adapter_to_bundle
from edgeq.compile.options import ExportOptions, bundle_n_ctx
from edgeq.compile.search import search as search_plan
from edgeq.compile.search_cnn import CnnSearchOptions, run_search as run_cnn_search, save_search
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import atomic_write, output_lock
from edgeq.core.plan import Plan, load_plan
from edgeq.evaluate.bundle import evaluate_bundle
from edgeq.importers.calibration_text import calibration_source
from edgeq.importers.imatrix import Imatrix, write_imatrix
from edgeq.importers.torch_export import import_module
from edgeq.passes import Context
from edgeq.passes.calibrate import calibrate as run_calibration
from edgeq.passes.calibrate import imatrix_from_calibration
from edgeq.runtime.terminal_chat import chat_loop

from edgeq.predictor.measure import device_for, profile_device
from edgeq.predictor.model import Prediction
from edgeq.predictor.predict import (
    check_runtime_here,
    latency_profile_backend,
    open_profile,
    predict_bundle,
    predict_workload,
)
from edgeq.predictor.profile import cached_profile_path, load_profile
from edgeq.predictor.validate import ValidationSettings, validate
from edgeq.predictor.workload import graph_workload

__all__ = ["ExportOptions", "add_adapter", "calibrate", "chat", "evaluate", "export", "export_module", "inspect",
           "plan", "predict", "profile", "serve"]


def _options(opts: ExportOptions | None, kwargs: dict[str, Any]) -> ExportOptions:
    return replace(opts or ExportOptions(), **kwargs)


def export(opts: ExportOptions | None = None, *, progress: Callable | None = None,
           log: Callable[[str], None] = lambda s: None, **options) -> dict:
    """`edgeq export`: compile a model into a bundle folder (`out`); returns its manifest and measurements."""
    return pipeline.export(_options(opts, options), progress=progress, log=log)


def plan(opts: ExportOptions | None = None, *, out: str | os.PathLike | None = None,
         progress: Callable | None = None, log: Callable[[str], None] | None = None, **options) -> Plan:
    """`edgeq plan`: the plan an export with these options would use, written to `out` when given."""
    if out is None:
        return pipeline.plan(_options(opts, options), progress=progress, log=log)
    _check_output_file(out)
    with output_lock(out):      # written whole (a temporary file renamed into place), one writer at a time
        p = pipeline.plan(_options(opts, options), progress=progress, log=log)
        p.save(out)
    return p


def search(opts: ExportOptions | None = None, *, out: str | os.PathLike | None = None,
           progress: Callable | None = None, log: Callable[[str], None] | None = None, ray: str | None = None,
           **options) -> Plan:
    """`edgeq search`: MLP widths x formats by evolution under the latency (predicted) and byte (exact) budgets;
    the plan `edgeq export --plan` writes, saved to `out` when given. `ray`: measure the expensive labels on the
    Ray cluster at that address ("local": a new local instance)."""
    if out is None:
        return search_plan(_options(opts, options), progress=progress, log=log, ray=ray)
    _check_output_file(out)
    with output_lock(out):
        p = search_plan(_options(opts, options), progress=progress, log=log, ray=ray)
        p.save(out)
    return p


def search_supernet(opts: CnnSearchOptions, *, out: str | os.PathLike, progress: Callable | None = None,
                    log: Callable[[str], None] | None = None, supernet=None) -> tuple[Plan, Path]:
    """`edgeq search --supernet`: a CNN supernet's stage widths x int8/float under a latency limit on onnxruntime;
    writes the plan to `out` and the subnet beside it (`out` with suffix .pt2). Returns (plan, model path)."""
    _check_output_file(out)
    with output_lock(out):
        s = run_cnn_search(opts, progress=progress, log=log, supernet=supernet)
        try:
            _, model = save_search(s, out)
            return s.plan(s.result.best), model
        finally:
            s.models.close()


def _check_output_file(out: str | os.PathLike) -> None:
    parent = Path(out).parent
    if parent.exists() and not parent.is_dir():
        raise EdgeqError(parent, "is a file")
    if Path(out).is_dir():
        raise EdgeqError(out, "is a folder, expected a file to write")


def calibrate(out: str | os.PathLike, model: str | None = None, adapters: list[str] = (), calib_windows: int = 4,
              progress: Callable | None = None, calib_text: str | None = None, calib_jsonl: str | None = None,
              log: Callable[[str], None] | None = None) -> tuple[Imatrix, dict[str, Any]]:
    """`edgeq calibrate`: llama.cpp's importance matrix (imatrix GGUF) from the calibration text (pydoc's, or the
    user's `calib_text` / `calib_jsonl`); returns it and what it was computed on."""
    _check_output_file(out)
    source = calibration_source(calib_text, calib_jsonl)
    with output_lock(out):      # written whole (a temporary file renamed into place), one writer at a time
        _, graph = pipeline.import_and_merge(model, list(adapters), Context(backend="gguf"), log)
        cal = run_calibration(graph, n_windows=calib_windows, progress=progress, source=source,
                              warn=None if log is None else (lambda s: log(f"edgeq: {s}")))
        im = imatrix_from_calibration(graph, cal)
        atomic_write(out, lambda tmp: write_imatrix(tmp, im))
    return im, cal.info


def add_adapter(bundle: str | os.PathLike, adapter: str, model: str | None = None) -> list[dict[str, Any]]:
    """`edgeq add-adapter`: a LoRA adapter (`DIR[:WEIGHT][=NAME]`) written beside the bundle's base for each of its
    backends and listed in its manifest (replaced atomically); returns the new manifest entries."""
    return add_adapter_to_bundle(bundle, adapter, model)


def evaluate(bundle: str | os.PathLike, **options) -> dict:
    """`edgeq eval`: a bundle's fidelity in its own runtime against the float source model."""
    return evaluate_bundle(bundle, **options)


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """`edgeq inspect`: a bundle (checksums verified), a GGUF file, a .pt2 or a Hugging Face folder."""
    return inspect_path(path)


def export_module(module, example, out: str | os.PathLike, quant: str | None = None, calib_images=None,
                  target: str = "cpu", plan: str | None = None, force: bool = False, check: bool = True,
                  name: str | None = None, progress: Callable | None = None, backend: str = "onnx") -> dict:
    """Export a torch CNN (eval mode, `example` one NCHW float32 batch) to an ONNX (or `backend="tvm"`) bundle,
    like `edgeq export`.

    `calib_images`: an .npz path (array `images`) or an (n, C, H, W) array; static `int8` needs it."""
    graph = import_module(module, example, name=name or type(module).__name__)
    opts = ExportOptions(target=target, backend=backend, quant=quant, plan=plan, out=os.fspath(out), force=force,
                         check=check, calib_images=calib_images)
    return pipeline.export(opts, progress=progress, graph=graph)


def chat(bundle: str | os.PathLike, system: str | None = None, max_tokens: int = 512, backend: str | None = None,
         threads: int | None = None, n_ctx: int | None = None, device: str | None = None, adapters=None,
         **sampling) -> int:
    """`edgeq chat`: a conversation with a decoder bundle on this terminal (stdin/stdout); returns the number of
    replies. Sampling settings are `edgeq.runtime.SamplingParams` keywords; `adapters` the bundle's LoRA adapters
    to apply (`runtime.load`'s)."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    with runtime.load(bundle, backend=backend, threads=threads, n_ctx=n_ctx, device=device, adapters=adapters) as s:
        if not hasattr(s, "stream"):
            raise EdgeqError(bundle, "edgeq chat needs a decoder bundle")
        if sys.stdin.isatty():
            print(f"edgeq chat: {s.manifest['model'].get('name')} on {s.backend_name}, context {s.n_ctx} tokens. "
                  "/reset forgets the conversation, /exit ends it.", file=sys.stderr)
        return chat_loop(s, system=system, max_tokens=max_tokens, sampling=sampling,
                         prompt="> " if sys.stdin.isatty() else "")


def serve(bundle: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080, **options) -> None:
    """`edgeq serve`: an OpenAI-compatible HTTP server for the bundle until interrupted (options: those of
    `edgeq.runtime.server.serve`: api_key, queue_size, model_name, backend, threads, n_ctx, device, defaults)."""
    try:
        from edgeq.runtime.server import serve as serve_bundle
    except ImportError as exc:
        raise EdgeqError(None, f"edgeq serve needs the server packages ({exc.name} is missing): "
                               "pip install 'edgeq[serve]'") from None
    serve_bundle(bundle, host, port, **options)


def profile(device: str = "local", backend: str = "gguf", threads: int = 1, out: str | os.PathLike | None = None,
            validate_plans: int = 0, model: str | None = None, latency_profile: str | os.PathLike | None = None,
            validate_dir: str | os.PathLike | None = None, allow_noisy: bool = False, quick: bool = False,
            clock: str = "wall",
            prompt_tokens: int | None = None, context_tokens: int | None = None, progress: Callable | None = None,
            log: Callable[[str], None] = lambda s: None, kind: str | None = None) -> dict[str, Any]:
    """`edgeq profile`: measure a latency profile of `device` for a backend, thread count and model kind (default
    decoder; cached in ~/.cache/edgeq/profiles/, also written to `out`), or take `latency_profile`; with
    `validate_plans` K, check it on K held-out plans run on the device."""
    if out is not None and Path(out).is_dir():
        raise EdgeqError(out, "is a folder; -o names the profile file to write")
    if latency_profile is not None:
        path = Path(latency_profile)
        prof = load_profile(path)
        prof.check_use(backend, threads, path, kind)
    else:
        prof = profile_device(device, backend, threads, quick=quick, allow_noisy=allow_noisy, clock=clock,
                              progress=progress, log=log, kind=kind or "decoder", model=model)
        path = cached_profile_path(prof.device, backend, threads, prof.clock, prof.kind)
        for p in (path, out):
            if p is not None:
                Path(p).parent.mkdir(parents=True, exist_ok=True)
                prof.save(p)
        path = Path(out) if out is not None else path
    _, _, fitted = open_profile(path, backend, threads, prof.kind)
    res: dict[str, Any] = {"profile": str(path), "backend": backend, "kind": prof.kind, "threads": threads,
                           "device": prof.device.get("cpu"),
                           "noise": prof.noise, "load_average": prof.load_average, "fit": fitted.fit_report()}
    if validate_plans:
        folder = Path(validate_dir) if validate_dir else path.with_name(path.stem + "-validation")
        settings = ValidationSettings(**{k: v for k, v in (("prompt_tokens", prompt_tokens),
                                                            ("context_tokens", context_tokens)) if v is not None})
        res["validation"] = validate(path, prof, device, validate_plans, folder, model, settings, progress, log)
        res["validation_dir"] = str(folder)
    return res


def predict(path: str | os.PathLike, latency_profile: str | os.PathLike | None = None, backend: str | None = None,
            model: str | None = None, threads: int | None = None, prompt_tokens: int | None = None,
            context_tokens: int | None = None, device: str | None = None) -> Prediction:
    """`edgeq predict`: a bundle's or a plan's prefill, decode step and peak memory on the profiled device
    (`device`: check first that the profile was measured on that device)."""
    path = Path(path)
    if device is not None:
        check_profile_device(latency_profile, device, backend, threads)
    if path.is_dir():
        return predict_bundle(path, latency_profile, backend, threads, prompt_tokens, context_tokens)
    if not path.is_file():
        raise EdgeqError(path, "no such bundle folder or plan file")
    backend = backend or load_plan(path).backend or (
        latency_profile_backend(latency_profile) if latency_profile else "gguf")
    # formats and widths are all a prediction reads: no calibration, and no compensated writing a plan may record
    opts = ExportOptions(model=model, backend=backend, plan=os.fspath(path), calibration=False, gptq=False)
    c = pipeline.prepare(opts, None, None, several_allowed=False)
    prof_path, prof, fitted = open_profile(latency_profile, backend, threads, c.graph.kind)
    check_runtime_here(prof, prof_path)
    decision = pipeline.decide_all(c, opts, branches=False)[backend]
    t = c.inputs[backend]
    w = graph_workload(decision.graph or c.graph, decision.plan, bundle_n_ctx(c.graph, c.profile, opts),
                       t.target.kv_cache_dtype(t.preset, c.profile, None), backend=backend)
    return predict_workload(fitted, w, prompt_tokens, context_tokens)


def check_profile_device(latency_profile: str | os.PathLike | None, device: str, backend: str | None,
                         threads: int | None) -> None:
    """Refuse a latency profile measured on another device than `device` (another CPU, flags or core count)."""
    if latency_profile is None:
        raise EdgeqError(None, "--device checks a --latency-profile; give one")
    prof = load_profile(latency_profile)
    dev = device_for(device)
    try:
        facts = dev.facts()
    finally:
        dev.close()
    prof.check_device(facts, dev.name, latency_profile)
