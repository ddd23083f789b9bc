"""edgeq's Python API, one function per command of the CLI (`edgeq.export`, `edgeq.plan`, ...).

Options are those of the command line, as an `ExportOptions` or as keywords (`quant="q4_k_m"`); the CLI
only parses arguments and calls these. Running a bundle is `edgeq.runtime` (what a device installs).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edgeq.bundle.inspect import inspect_path
from edgeq.compile import pipeline
from edgeq.compile.add_adapter import add_adapter as add_adapter_to_bundle
from edgeq.compile.options import ExportOptions
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import atomic_write, output_lock
from edgeq.core.plan import Plan
from edgeq.evaluate.bundle import evaluate_bundle
from edgeq.importers.calibration_text import calibration_source
from edgeq.importers.imatrix import Imatrix, write_imatrix
from edgeq.importers.torch_export import import_module
from edgeq.passes import Context
from edgeq.passes.calibrate import calibrate as run_calibration
from edgeq.passes.calibrate import imatrix_from_calibration

__all__ = ["ExportOptions", "add_adapter", "calibrate", "evaluate", "export", "export_module", "inspect", "plan"]


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
