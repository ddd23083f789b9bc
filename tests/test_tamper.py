"""Tamper evidence: altered bundles are refused before anything is loaded, on every backend and every face of the
runtime: `edgeq.runtime.load`, `edgeq run` and the HIL runner (`python -m edgeq.runtime.remote`, what a device
runs; here through the `local` device, a separate clean process).

Each alteration keeps the rest of the bundle intact, and the ones that move a file keep its bytes, so only the
check under test can catch it: a changed byte (SHA-256), a `../` path, an absolute path and a symbolic link out
of the bundle (all with the genuine bytes outside), an artifact listed twice, a missing artifact, an unknown
manifest version, and a manifest field naming a file the checksums do not cover.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeq import runtime
from edgeq.devices import open_device
from edgeq.runtime.manifest import BundleError

BACKENDS = ["gguf", "onnx", "tvm"]


def _model(m: dict) -> dict:
    return next(a for a in m["artifacts"] if a.get("role", "model") == "model")


def _edit(dst: Path, fn) -> None:
    m = json.loads((dst / "manifest.json").read_text())
    fn(m)
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))


def _byte(dst: Path) -> str:
    p = dst / _model(json.loads((dst / "manifest.json").read_text()))["path"]
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    return f"{p.name}: checksum error: SHA-256 does not match the manifest"


def _move_out(dst: Path) -> tuple[Path, str]:
    """The model file moved next to the bundle, bytes unchanged."""
    name = _model(json.loads((dst / "manifest.json").read_text()))["path"]
    outside = dst.parent / f"outside-{name}"
    shutil.move(dst / name, outside)
    return outside, name


def _dotdot(dst: Path) -> str:
    outside, name = _move_out(dst)
    _edit(dst, lambda m: _model(m).update(path=f"../{outside.name}"))
    return f"artifact path '../{outside.name}' escapes the bundle"


def _absolute(dst: Path) -> str:
    outside, name = _move_out(dst)
    _edit(dst, lambda m: _model(m).update(path=str(outside)))
    return "escapes the bundle"


def _symlink(dst: Path) -> str:
    outside, name = _move_out(dst)
    os.symlink(outside, dst / name)
    return f"artifact path '{name}' escapes the bundle"


def _twice(dst: Path) -> str:
    _edit(dst, lambda m: m["artifacts"].append(dict(_model(m))))
    return "is listed twice"


def _missing(dst: Path) -> str:
    name = _model(json.loads((dst / "manifest.json").read_text()))["path"]
    (dst / name).unlink()
    return f"{name}: artifact listed in the manifest is missing"


def _version(dst: Path) -> str:
    _edit(dst, lambda m: m.update(version=2))
    return "unknown manifest version 2"


def _unlisted(dst: Path) -> str:
    """A manifest field pointed at a copy of a file that no artifact entry (so no checksum) covers."""
    m = json.loads((dst / "manifest.json").read_text())
    if m.get("tvm"):
        shutil.copy(dst / m["tvm"]["library"], dst / "other.so")
        _edit(dst, lambda m: m["tvm"].update(library="other.so"))
        return "tvm.library 'other.so' is not an artifact the manifest lists"
    key = "spec" if "spec" in m["tokenizer"] else "tokenizer_json"
    shutil.copy(dst / m["tokenizer"][key], dst / "other.json")
    _edit(dst, lambda m: m["tokenizer"].update({key: "other.json"}))
    return f"tokenizer.{key} 'other.json' is not an artifact the manifest lists"


TAMPER = {"byte": _byte, "dotdot": _dotdot, "absolute": _absolute, "symlink": _symlink, "twice": _twice,
          "missing": _missing, "version": _version, "unlisted": _unlisted}


@pytest.fixture(scope="module")
def tampered(hil_bundles, tmp_path_factory):
    made: dict[tuple[str, str], tuple[Path, str]] = {}

    def get(backend: str, kind: str) -> tuple[Path, str]:
        if (backend, kind) not in made:
            dst = tmp_path_factory.mktemp(f"tamper-{backend}-{kind}") / "b"
            shutil.copytree(hil_bundles(backend), dst)
            made[backend, kind] = dst, TAMPER[kind](dst)
        return made[backend, kind]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
def test_untampered_bundles_load(backend, hil_bundles):
    with runtime.load(hil_bundles(backend)) as s:
        assert s.backend_name == backend


@pytest.mark.parametrize("kind", list(TAMPER))
@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_load_refuses(backend, kind, tampered):
    bundle, msg = tampered(backend, kind)
    with pytest.raises(BundleError) as e:
        runtime.load(bundle)
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["byte", "dotdot", "symlink"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_edgeq_run_refuses_with_exit_status_2(backend, kind, tampered):
    bundle, msg = tampered(backend, kind)
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", "run", str(bundle), "A sentence."],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeq: error: ") and msg in lines[0], res.stderr


@pytest.fixture(scope="module")
def local_device():
    dev = open_device("local")
    yield dev
    dev.close()


@pytest.mark.parametrize("kind", ["byte", "dotdot", "symlink", "unlisted"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hil_runner_refuses_on_the_device(backend, kind, tampered, local_device):
    bundle, msg = tampered(backend, kind)
    if kind in ("dotdot", "symlink"):     # the genuine bytes beside the bundle on the device too
        outside = next(bundle.parent.glob("outside-*"))
        remote = local_device.push(bundle)
        shutil.copy(outside, Path(local_device.host_path(remote)).parent / outside.name)
        if kind == "symlink":
            link = Path(local_device.host_path(remote)) / outside.name.removeprefix("outside-")
            link.unlink()
            link.symlink_to(Path(local_device.host_path(remote)).parent / outside.name)
        res = local_device.run(remote, "reference")
    else:
        res = local_device.run(local_device.push(bundle), "reference")
    assert not res.ok and res.response["error_type"] == "BundleError" and res.response["user_error"]
    assert msg in res.error and "\n" not in res.error


def test_hil_runner_exit_status_is_2(tampered, tmp_path):
    bundle, msg = tampered("gguf", "byte")
    (tmp_path / "request.json").write_text(json.dumps({"bundle": str(bundle), "op": "reference"}))
    res = subprocess.run([sys.executable, "-m", "edgeq.runtime.remote", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and msg in res.stderr
