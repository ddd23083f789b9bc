"""Open and verify a bundle's manifest: versions, paths and every artifact's SHA-256.

A device must refuse a damaged bundle with a checksum error, never run it and
give a wrong answer, so verification happens before any backend is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.core.errors import EdgeqError
from edgeq.core.fs import sha256_file

BUNDLE_FORMAT = "edgeq-bundle"
BUNDLE_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20


class BundleError(EdgeqError):
    """The bundle is damaged, incomplete or from an incompatible edgeq."""


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(path, f"not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise BundleError(path, f"not an {BUNDLE_FORMAT} manifest")
    version = m.get("version")
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise BundleError(path, f"bundle version {version} is newer than this runtime supports ({BUNDLE_VERSION})")
    if not isinstance(m.get("artifacts"), list) or not m["artifacts"]:
        raise BundleError(path, "manifest lists no artifacts")
    return m


def artifact_path(bundle: Path, rel: str) -> Path:
    p = (bundle / rel).resolve()
    if Path(rel).is_absolute() or bundle.resolve() not in p.parents:
        raise BundleError(bundle / "manifest.json", f"artifact path {rel!r} escapes the bundle")
    return p


def verify_artifacts(bundle: str | os.PathLike, manifest: dict[str, Any]) -> None:
    bundle = Path(bundle)
    for a in manifest["artifacts"]:
        p = artifact_path(bundle, a["path"])
        if not p.is_file():
            raise BundleError(p, "artifact listed in the manifest is missing")
        if p.stat().st_size != a["bytes"]:
            raise BundleError(p, f"checksum error: size {p.stat().st_size} != {a['bytes']} bytes in the manifest")
        if sha256_file(p) != a["sha256"]:
            raise BundleError(p, "checksum error: SHA-256 does not match the manifest")


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
            if not (len(widths) == len(align) == len(full)) or any(
                    not isinstance(w, int) or not 0 < w <= f or w % a for w, a, f in zip(widths, align, full)):
                raise BundleError(bundle / "manifest.json", f"pruning table of rate {rate:g} is inconsistent")
            return None if widths == full else Pruning(float(rate), list(widths), list(align), list(full))
    have = ", ".join(f"{float(e['rate']):g}" for e in rates)
    raise BundleError(bundle, f"carries pruning rates {have}, not {rate:g}")
