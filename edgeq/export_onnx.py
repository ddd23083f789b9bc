"""`edgeq export --backend onnx`: decide (preset, user plan, legalize, calibrate), lower, check, write a bundle.

Kept apart from the GGUF flow in pipeline.py; it shares the bundle layout
(manifest, reference inputs with float outputs, measurements, report) and the
atomic staging.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.bundle_tail import copy_encoder_tokenizer, file_artifact, finish_bundle
from edgeq.errors import EdgeqError
from edgeq.fsutil import sha256_file, staged_dir
from edgeq.ir import Graph
from edgeq.passes import Context, run_passes
from edgeq.passes.assign_preset import preset_plan
from edgeq.passes.calibrate_ranges import CalibrateRanges
from edgeq.plan import Plan

MODEL_FILE = "model.onnx"
REFERENCE_SENTENCES = (
    "The capital of France is Paris.",
    "A function returns a value to its caller.",
    "Quantization stores each weight in fewer bits.",
    "short",
)
SOURCE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json",
                "sentence_bert_config.json")


def source_digest(path: Path) -> tuple[str, int]:
    """SHA-256 of a model: of the file, or for a folder of (name, file hash) for the files that define the model."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    h = hashlib.sha256()
    total = 0
    for rel in SOURCE_FILES:
        f = path / rel
        if f.is_file():
            h.update(f"{rel}\0{sha256_file(f)}\n".encode())
            total += f.stat().st_size
    return h.hexdigest(), total


def encoder_tokenizer(graph: Graph):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(graph.metadata["tokenizer_json"])
    tok.no_padding()
    tok.enable_truncation(graph.config.context_length)
    return tok


def calibration_inputs(graph: Graph, n: int = 128) -> tuple[list[np.ndarray], str]:
    if graph.kind == "encoder":
        from edgeq.texts import calibration_sentences

        tok = encoder_tokenizer(graph)
        return [np.array(tok.encode(s).ids, dtype=np.int64) for s in calibration_sentences(n)], \
            f"{n} sentences of pydoc_data.topics (even-indexed topics)"
    if graph.kind == "decoder":
        from edgeq.passes.calibrate import calibration_tokens, calibration_windows
        from edgeq.texts import CALIBRATION_TEXT_NAME

        tokens, bos, add_bos = calibration_tokens(graph)
        wins = calibration_windows(tokens, 512, 4, bos, add_bos)
        return [np.array(w, dtype=np.int64) for w in wins], f"{len(wins)} windows of 512 tokens of {CALIBRATION_TEXT_NAME}"
    raise EdgeqError(None, f"no default calibration data for {graph.kind} models; pass calibration inputs")


def decide_onnx(graph: Graph, preset: str, user_plan: Plan | None, plan_path: str | None, ctx: Context,
                calibration: list[np.ndarray] | None = None, calibration_source: str | None = None,
                percentile: float | None = 99.999, opts=None) -> Plan:
    """Preset, the user's rules, legalize; then calibration where the plan's formats need it: static INT8 ranges
    (in the plan), and the importance matrix for formats that take one (int4: in ctx.analysis['calibration'],
    as for GGUF; `opts` carries --no-calibration / --imatrix / --calib-windows)."""
    plan = preset_plan(graph, preset, user_plan, plan_path, ctx)
    if graph.kind == "cnn":
        return _decide_cnn_ranges(graph, plan, ctx, calibration, calibration_source, percentile)
    if any(d.format == "int8" and d.act_range is None for d in plan.tensors.values()):
        if calibration is None:
            calibration, calibration_source = calibration_inputs(graph)
        _, plan = run_passes([CalibrateRanges(calibration, calibration_source or "calibration inputs", percentile)],
                             graph, plan, ctx)
    from edgeq.passes.calibrate import imatrix_calibration

    imatrix_calibration(graph, plan, ctx, opts)
    return plan


CALIB_MAX_IMAGES = 512          # the whitepaper calibrates on 100-500 samples


def cnn_calibration(graph: Graph, calib_images) -> tuple[list[np.ndarray] | None, str | None]:
    """Calibration images for a CNN: an .npz path (array `images`, NCHW float32) or an array; the first 512 are used."""
    if calib_images is None:
        return None, None
    if isinstance(calib_images, (str, os.PathLike)):
        from edgeq.images import read_images

        images, _ = read_images(calib_images, graph.config.image_shape)
        name = Path(calib_images).name
    else:
        images = np.asarray(calib_images)
        if images.ndim != 4 or tuple(images.shape[1:]) != graph.config.image_shape or not len(images):
            raise EdgeqError("calib_images", f"array has shape {images.shape}; expected (n, "
                                             f"{', '.join(map(str, graph.config.image_shape))}) float32")
        images = images.astype(np.float32)
        name = "calibration array"
    images = images[:CALIB_MAX_IMAGES]
    return [images], f"{name} ({len(images)} images)"


def _decide_cnn_ranges(graph: Graph, plan: Plan, ctx: Context, calibration, calibration_source,
                       percentile) -> Plan:
    """Static int8 CNNs get a calibrated range per activation (the plan's `activations`) unless the plan has them."""
    from edgeq.targets.onnx.cnn import activation_params

    if plan.activations is None and any(d.format == "int8" for d in plan.tensors.values()):
        if calibration is None:
            raise EdgeqError(None, "static int8 needs calibration images: pass --calib-images FILE.npz (array 'images' "
                                   f"of shape (n, {', '.join(map(str, graph.config.image_shape))}) float32), or use "
                                   "--quant int8-dyn")
        _, plan = run_passes([CalibrateRanges(calibration, calibration_source or "calibration images", percentile)],
                             graph, plan, ctx)
        plan.calibration = {"activations": "per-tensor [min, max] of each quantized activation, "
                                           f"{'min/max' if percentile is None else f'{percentile} percentile of |x|'}",
                            "source": calibration_source, "images": int(sum(len(x) for x in calibration))}
    activation_params(graph, plan)          # a plan naming an activation the model lacks fails here, before writing
    return plan


def graph_digest(graph: Graph) -> str:
    """SHA-256 of what a network computes (ops, attributes, weight names, shapes and bytes), however it was saved."""
    h = hashlib.sha256()
    h.update(json.dumps([[n.op, n.inputs, n.outputs, n.attrs] for n in graph.nodes], sort_keys=True).encode())
    for name, t in graph.weights.items():
        arr = np.ascontiguousarray(t.numpy(), dtype="<f4")
        h.update(f"\0{name}\0{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def source_name(path: Path, given: str | None) -> str:
    from edgeq.models.minilm import MINILM_NAME

    if given == MINILM_NAME:
        return MINILM_NAME
    if given is None:
        from edgeq.models.default import DEFAULT_NAME

        return DEFAULT_NAME
    return path.name


def runtime_versions() -> dict[str, str]:
    from edgeq.pipeline import runtime_versions as versions

    return versions(("onnxruntime", "onnx"))


def export_onnx(opts, graph: Graph, model_path: Path, profile, user_plan: Plan | None, preset: str,
                progress: Callable | None, log: Callable[[str], None], timings: dict[str, float],
                t_start: float) -> dict:
    ctx = Context(backend="onnx", profile=profile, progress=progress)
    t0 = time.perf_counter()
    calib, calib_source = (None, None)
    if graph.kind == "cnn":
        calib, calib_source = cnn_calibration(graph, getattr(opts, "calib_images", None))
    plan = decide_onnx(graph, preset, user_plan, opts.plan, ctx, calib, calib_source, opts=opts)
    timings["passes"] = time.perf_counter() - t0
    log(f"exporting {graph.metadata.get('name')} ({graph.n_params:,} params) for {profile.name} as onnx {preset}")

    source = source_record(graph, model_path, opts.model)
    ref_images = cnn_reference_images(graph, calib) if graph.kind == "cnn" else None
    with staged_dir(opts.out, opts.force) as tmp:
        t0 = time.perf_counter()
        artifacts = write_onnx(graph, plan, tmp, progress)
        timings["lower"] = time.perf_counter() - t0
        tokenizer = copy_encoder_tokenizer(graph, tmp, artifacts) if graph.kind == "encoder" else {}
        reference = {"path": "reference", "inputs": len(REFERENCE_SENTENCES) if ref_images is None else len(ref_images),
                     **({} if ref_images is None else {"images": "calibration images" if calib else
                                                       "seeded uniform noise in [0, 1)"})}
        manifest, measurements = finish_bundle(
            tmp, graph, plan, ctx, profile, versions=runtime_versions(), source=source,
            n_ctx=int(getattr(graph.config, "context_length", 0)) or None, kv_cache_dtype=None, artifacts=artifacts,
            tokenizer=tokenizer, sections={}, reference=reference, check=opts.check, ref_images=ref_images,
            timings=timings, t_start=t_start)
    return {"out": str(opts.out), "manifest": manifest, "measurements": measurements}


def source_record(graph: Graph, model_path: Path | None, given: str | None) -> dict[str, Any]:
    if graph.kind == "cnn":
        # a CNN is identified by what it computes, so a module exported through the API and the same module
        # saved as a .pt2 (decomposed or not) are the same source for `edgeq eval --reference`
        rec: dict[str, Any] = {"name": model_path.name if model_path else graph.metadata.get("name"),
                               "sha256": graph_digest(graph), "sha256_of": "the imported graph (ops, attributes, weights)",
                               "bytes": 4 * graph.n_params}
        if model_path is not None:
            rec["file_sha256"] = sha256_file(model_path)
        return {**rec, "license": graph.metadata.get("license"), "adapters": []}
    src_sha, src_bytes = source_digest(model_path)
    return {"name": source_name(model_path, given), "sha256": src_sha, "bytes": src_bytes,
            "license": graph.metadata.get("license"), "adapters": []}


REFERENCE_IMAGES = 8


def cnn_reference_images(graph: Graph, calib: list[np.ndarray] | None) -> np.ndarray:
    """The images a CNN bundle carries with their float logits: the first calibration images, else seeded noise."""
    if calib is None:
        return np.random.default_rng(0).random((REFERENCE_IMAGES, *graph.config.image_shape), dtype=np.float32)
    return np.ascontiguousarray(calib[0][:REFERENCE_IMAGES], dtype=np.float32)


def cnn_reference_and_check(graph: Graph, bundle: Path, measurements: dict, check: bool, x: np.ndarray) -> None:
    """Float reference logits for the reference images, and the runtime's on the same images."""
    from edgeq import runtime
    from edgeq.executor import Executor

    ref = Executor(graph).run_inputs({"images": x})["logits"]
    folder = bundle / "reference"
    folder.mkdir()
    np.save(folder / "images.npy", x)
    np.save(folder / "logits.npy", ref.astype(np.float32))
    if check:
        with runtime.load(bundle, threads=max(1, min(4, os.cpu_count() or 1))) as s:
            got = s.run({"images": x})["logits"]
        measurements["reference_check"] = {
            "backend": s.backend_name, "agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
            "max_abs_diff": float(np.abs(got - ref).max()), "n_inputs": int(len(x))}


def write_onnx(graph: Graph, plan: Plan, folder: Path, progress: Callable | None = None,
               **options) -> list[dict[str, Any]]:
    """Lower and save `model.onnx` (and its external data past 2 GB) into `folder`; the manifest's artifact entries."""
    from edgeq.targets.onnx import lower_onnx, save_model

    model = lower_onnx(graph, plan, progress=progress, **options)
    files = save_model(model, folder / MODEL_FILE)
    del model
    return [file_artifact(f, "model" if f.name == MODEL_FILE else "model_data", "onnx",
                          plan.format_counts() if f.name == MODEL_FILE else {}) for f in files]


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    return np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))


def encoder_reference_and_check(graph: Graph, bundle: Path, measurements: dict, check: bool) -> None:
    """Float reference embeddings for a few sentences (so a device can check itself), and the runtime's."""
    from edgeq import runtime
    from edgeq.executor import Executor

    tok = encoder_tokenizer(graph)
    ids = [tok.encode(s).ids for s in REFERENCE_SENTENCES]
    ex = Executor(graph)
    ref = np.stack([ex.embed(i) for i in ids])
    folder = bundle / "reference"
    folder.mkdir()
    (folder / "inputs.json").write_text(json.dumps({"sentences": list(REFERENCE_SENTENCES), "token_ids": ids},
                                                   indent=1) + "\n", encoding="utf-8")
    np.save(folder / "embeddings.npy", ref.astype(np.float32))
    if check:
        with runtime.load(bundle, threads=max(1, min(4, os.cpu_count() or 1))) as s:
            got = s.embed(list(REFERENCE_SENTENCES))
        c = cosines(ref, got)
        measurements["reference_check"] = {"backend": s.backend_name, "cosine_mean": float(c.mean()),
                                           "cosine_min": float(c.min()), "n_inputs": int(c.size)}
