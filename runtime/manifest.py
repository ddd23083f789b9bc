"""Open and verify a bundle's manifest: versions, paths and every artifact's SHA-256.

A bundle is untrusted input: it is copied to phones and boards and passes through hands on the way. A device
must refuse a damaged or altered bundle with one line naming the file, never run it and give a wrong answer
(or, for a TVM library, run code nobody exported), so:

* the manifest is read bounded and its structure checked before any field is used;
* every artifact path must be relative and stay inside the bundle (no `..`, no absolute path, no symbolic
  link that points out), and no file may be listed twice;
* every artifact's size and SHA-256 are checked before any backend is loaded;
* a runtime opens only files the manifest lists as artifacts (`listed_path`), so a field such as
  `tvm.library` cannot name a file the checksums did not cover;
* native code (a TVM library, loaded with dlopen) is hashed while it is copied to a private folder and the
  copy is what gets loaded (`verified_copy`), so the file cannot change between its check and its load.

Files the runtime never loads (the report, measurements, reference inputs and outputs) are not covered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.fs import sha256_file

BUNDLE_FORMAT = "edgeq-bundle"
BUNDLE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_MANIFEST_BYTES = 64 << 20
MAX_ARTIFACTS = 10_000
MODEL_KINDS = ("decoder", "encoder", "cnn")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(EdgeqError):
    """The bundle is damaged, incomplete, altered or from an incompatible edgeq."""


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    """The manifest, its structure checked (every field a runtime reads has the type it expects)."""
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    if not bundle.is_dir():
        raise BundleError(bundle, "not a bundle folder")
    if not path.is_file():
        raise BundleError(bundle, "no manifest.json (not an edgeq bundle, or an unfinished export)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(path, "manifest is implausibly large")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(path, f"not valid JSON ({_one_line(exc)})") from None
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise BundleError(path, f"not an {BUNDLE_FORMAT} manifest")
    version = m.get("version")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise BundleError(path, f"unknown manifest version {version!r} (this runtime reads version "
                                f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    check_structure(m, path)
    return m


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_structure(m: dict[str, Any], path: Path) -> None:
    """The fields runtimes and `edgeq inspect` read, with their types; each problem is one line."""
    arts = m.get("artifacts")
    if not isinstance(arts, list) or not arts:
        raise BundleError(path, "manifest lists no artifacts")
    if len(arts) > MAX_ARTIFACTS:
        raise BundleError(path, f"manifest lists {len(arts)} artifacts (more than {MAX_ARTIFACTS})")
    seen: dict[str, int] = {}
    for i, a in enumerate(arts):
        if not isinstance(a, dict):
            raise BundleError(path, f"artifacts[{i}] is not an object")
        for key in ("path", "sha256", "backend", *(("role",) if "role" in a else ())):
            if not isinstance(a.get(key), str):
                raise BundleError(path, f"artifacts[{i}].{key} is missing or not a string")
        if type(a.get("bytes")) is not int or a["bytes"] < 0:
            raise BundleError(path, f"artifacts[{i}].bytes is missing or not a non-negative integer")
        if not _SHA256.match(a["sha256"]):
            raise BundleError(path, f"artifacts[{i}].sha256 is not a SHA-256 hex digest")
        key = _normal_path(a["path"], path)
        if key in seen:
            raise BundleError(path, f"artifact {a['path']!r} is listed twice (artifacts[{seen[key]}] and "
                                    f"artifacts[{i}])")
        seen[key] = i
        if a.get("role") == LORA_ROLE:
            _check_lora_entry(a, i, path)
    model = m.get("model")
    if not isinstance(model, dict) or model.get("kind") not in MODEL_KINDS:
        raise BundleError(path, f"model.kind must be one of {', '.join(MODEL_KINDS)}")
    for key, typ in (("tokenizer", dict), ("target", dict), ("source", dict), ("plan", dict),
                     ("runtime_versions", dict), ("n_ctx", int), ("kv_cache_dtype", str), ("tvm", dict)):
        v = m.get(key)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
            raise BundleError(path, f"{key} must be a JSON {'object' if typ is dict else typ.__name__}")
    if m.get("n_ctx") is not None and not 0 < m["n_ctx"] <= 1 << 24:
        raise BundleError(path, f"n_ctx {m['n_ctx']} is out of range")
    for key in ("spec", "tokenizer_json"):
        v = (m.get("tokenizer") or {}).get(key)
        if v is not None and not isinstance(v, str):
            raise BundleError(path, f"tokenizer.{key} must be a file name")


LORA_ROLE = "lora"       # a user's LoRA adapter kept apart from the base (export --adapter-mode separate)
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _check_lora_entry(a: dict[str, Any], i: int, path: Path) -> None:
    if not isinstance(a.get("name"), str) or not _ADAPTER_NAME.match(a["name"]):
        raise BundleError(path, f"artifacts[{i}].name is missing or not an adapter name")
    s = a.get("scale")
    if type(s) not in (int, float) or s != s or abs(s) == float("inf"):
        raise BundleError(path, f"artifacts[{i}].scale is missing or not a finite number")
    if not isinstance(a.get("applies_to"), str):
        raise BundleError(path, f"artifacts[{i}].applies_to is missing or not a file name")


def lora_adapters(manifest: dict[str, Any], backend: str) -> dict[str, dict[str, Any]]:
    """The users' adapters a bundle holds for one backend, by name."""
    return {a["name"]: a for a in manifest["artifacts"] if a.get("role") == LORA_ROLE and a["backend"] == backend}


def verified_file(bundle: Path, manifest: dict[str, Any], rel: str, what: str) -> Path:
    """A listed artifact whose size and SHA-256 are checked now, just before a runtime reads it (an adapter
    opened long after the bundle was loaded)."""
    p = listed_path(bundle, manifest, rel, what)
    entry = artifact_entry(manifest, rel)
    if not p.is_file():
        raise BundleError(bundle / rel, "artifact listed in the manifest is missing")
    if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
        raise BundleError(bundle / rel, "checksum error: SHA-256 does not match the manifest")
    return p


def _normal_path(rel: str, manifest_path: Path) -> str:
    """A manifest path as a key, refused when it is absolute or climbs out (`..`)."""
    if not rel or "\0" in rel or "\\" in rel:
        raise BundleError(manifest_path, f"artifact path {rel!r} is not a plain relative path")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(manifest_path, f"artifact path {rel!r} escapes the bundle")
    return str(p)


def artifact_path(bundle: Path, rel: str) -> Path:
    """The file `rel` names inside the bundle; refused when it lies outside it (`..`, an absolute path, a
    symbolic link pointing out)."""
    bundle = Path(bundle)
    _normal_path(rel, bundle / "manifest.json")
    root = bundle.resolve()
    p = (root / rel).resolve()
    if root not in p.parents:
        raise BundleError(bundle / "manifest.json", f"artifact path {rel!r} escapes the bundle")
    return p


def listed_path(bundle: Path, manifest: dict[str, Any], rel: Any, what: str) -> Path:
    """A file a runtime is about to open: it must be one of the manifest's artifacts, whose checksums
    `verify_artifacts` covers; a field naming anything else is refused."""
    if not isinstance(rel, str):
        raise BundleError(bundle / "manifest.json", f"{what} is not a file name")
    key = _normal_path(rel, bundle / "manifest.json")
    if not any(_normal_path(a["path"], bundle / "manifest.json") == key for a in manifest["artifacts"]):
        raise BundleError(bundle / "manifest.json", f"{what} {rel!r} is not an artifact the manifest lists "
                                                    "(unverified files are never loaded)")
    return artifact_path(bundle, rel)


def verify_artifacts(bundle: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Every artifact present, a regular file inside the bundle, of its size and SHA-256."""
    bundle = Path(bundle)
    for a in manifest["artifacts"]:
        p = artifact_path(bundle, a["path"])
        if not p.exists():
            raise BundleError(bundle / a["path"], "artifact listed in the manifest is missing")
        if not p.is_file():
            raise BundleError(bundle / a["path"], "artifact listed in the manifest is not a regular file")
        size = p.stat().st_size
        if size != a["bytes"]:
            raise BundleError(bundle / a["path"], f"checksum error: size {size} != {a['bytes']} bytes in the "
                                                  "manifest")
        if sha256_file(p) != a["sha256"]:
            raise BundleError(bundle / a["path"], "checksum error: SHA-256 does not match the manifest")


def artifact_entry(manifest: dict[str, Any], rel: str) -> dict[str, Any]:
    key = str(PurePosixPath(rel))
    return next(a for a in manifest["artifacts"] if str(PurePosixPath(a["path"])) == key)


def verified_copy(bundle: Path, manifest: dict[str, Any], rel: str, what: str, into: Path) -> Path:
    """Copy a listed artifact into the private folder `into`, hashing the bytes copied; the copy is returned
    only if they match the manifest. Native code is loaded from this copy, so what runs is what was checked
    even if the bundle's file changes after `verify_artifacts` read it."""
    src = listed_path(bundle, manifest, rel, what)
    entry = artifact_entry(manifest, rel)
    dst = into / src.name
    h = hashlib.sha256()
    n = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            b = fi.read(1 << 22)
            if not b:
                break
            h.update(b)
            fo.write(b)
            n += len(b)
    if n != entry["bytes"] or h.hexdigest() != entry["sha256"]:
        dst.unlink(missing_ok=True)
        raise BundleError(bundle / rel, "checksum error: SHA-256 does not match the manifest")
    return dst


def private_dir(prefix: str) -> Path:
    """A folder only this user can read or write (mkdtemp's 0700), for verified copies."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_private_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def check_runtime_version(manifest: dict[str, Any], dist: str) -> None:
    """A newer or older runtime library usually loads a bundle fine, but say so: figures may differ."""
    import warnings
    from importlib import metadata

    want = (manifest.get("runtime_versions") or {}).get(dist)
    try:
        have = metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise BundleError(None, f"this bundle needs {dist} {want or ''} and it is not installed") from None
    if want and want != have:
        warnings.warn(f"bundle was exported and checked with {dist} {want}; this device has {have}", stacklevel=3)


def pick_artifact(bundle: Path, manifest: dict[str, Any], backend: str | None) -> dict[str, Any]:
    models = [a for a in manifest["artifacts"] if a.get("role", "model") == "model"]
    if backend is not None:
        models = [a for a in models if a["backend"] == backend]
        if not models:
            have = sorted({a["backend"] for a in manifest["artifacts"] if a.get("role", "model") == "model"})
            raise BundleError(bundle, f"bundle has no {backend} model (it has: {', '.join(have)})")
    if not models:
        raise BundleError(bundle, "bundle has no model artifact")
    return models[0]


@dataclass(frozen=True)
class Pruning:
    """A pruning rate a bundle carries: each layer's MLP width (a prefix of its sorted channels) and alignment."""

    rate: float
    widths: list[int]
    align: list[int]
    full: list[int]
    # --prune-attention bundles: each layer's Q/K and V head widths (dimensions per head), else None
    qk: list[int] | None = None
    v: list[int] | None = None
    # --prune-compensate bundles: each layer's down-projection bias at this rate (float32, hidden wide), else None
    bias: list[np.ndarray] | None = None


BIAS_MAX = 1e4          # |bias| bound: a removed channel's mean output, far below this in any float model


def encode_bias(values: np.ndarray) -> str:
    """One layer's bias as the pruning table stores it: base64 of little-endian float32 (exact, a third of JSON's
    decimal digits)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode_biases(where: Path, entry: dict[str, Any], n_layers: int, width: int) -> list[np.ndarray]:
    """A rate's per-layer biases, checked: one per layer, each exactly `width` finite float32 within ±BIAS_MAX (the
    length checked before decoding, so a damaged table cannot make the reader allocate more than the model's size)."""
    rate = entry.get("rate")
    b = entry.get("bias")
    chars = 4 * -(-4 * width // 3)
    if not isinstance(b, list) or len(b) != n_layers or any(not isinstance(x, str) or len(x) != chars for x in b):
        raise BundleError(where, f"pruning table of rate {rate}: bias must be {n_layers} base64 strings of {width} "
                                 "float32")
    out = []
    for x in b:
        try:
            v = np.frombuffer(base64.b64decode(x, validate=True), dtype="<f4").astype(np.float32)
        except (ValueError, binascii.Error):
            raise BundleError(where, f"pruning table of rate {rate}: bias is not base64") from None
        if v.shape != (width,) or not np.all(np.isfinite(v)) or np.abs(v).max(initial=0) > BIAS_MAX:
            raise BundleError(where, f"pruning table of rate {rate}: bias values are not {width} finite numbers "
                                     f"within ±{BIAS_MAX:g}")
        out.append(v)
    return out


def pick_pruning(bundle: Path, manifest: dict[str, Any], rate: float | None) -> Pruning | None:
    """The bundle's widths at `rate`, checked before anything is loaded; None for the full model (no rate, or 0)."""
    if rate is None:
        return None
    table = manifest.get("pruning_rates")
    if not table:
        if rate == 0:
            return None
        raise BundleError(bundle, f"carries no pruning rates (pruning rate {rate:g} asked); export it with "
                                  "--pruning-rates")
    rates = table.get("rates") or []
    for entry in rates:
        if abs(float(entry["rate"]) - float(rate)) < 1e-9:
            widths, align, full = entry["widths"], table["align"], table["full"]
            att = table.get("attention")
            checks = [(widths, align, full)]
            if att:
                checks += [(entry.get("qk"), att.get("align_qk"), att.get("full_qk")),
                           (entry.get("v"), att.get("align_v"), att.get("full_v"))]
            if any(not all(isinstance(x, list) for x in (w, a, f)) or not (len(w) == len(a) == len(f) == len(full))
                   or any(not isinstance(x, int) or not isinstance(s, int) or s < 1 or not 0 < x <= y or x % s
                          for x, s, y in zip(w, a, f)) for w, a, f in checks):
                raise BundleError(bundle / "manifest.json", f"pruning table of rate {rate:g} is inconsistent")
            if all(w == f for w, _, f in checks):
                return None
            bias = None
            if table.get("compensate"):
                width = (manifest.get("model") or {}).get("config", {}).get("hidden_size")
                if not isinstance(width, int) or width < 1:
                    raise BundleError(bundle / "manifest.json", "pruning table with biases but no model hidden_size")
                bias = decode_biases(bundle / "manifest.json", entry, len(full), width)
            return Pruning(float(rate), list(widths), list(align), list(full),
                           *((list(entry["qk"]), list(entry["v"])) if att else (None, None)), bias=bias)
    have = ", ".join(f"{float(e['rate']):g}" for e in rates)
    raise BundleError(bundle, f"carries pruning rates {have}, not {rate:g}")
