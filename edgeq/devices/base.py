"""What every device offers the HIL tests: probe, push a bundle, run the on-device runner, pull its results.

Most devices are a shell plus file copies (local, ssh, adb, qemu-arm64):
`ShellDevice` does all the work once, and a backend only says how to run a
command and copy a folder. A device that is not a shell (TVM RPC) implements
`Device` directly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edgeq
import edgeq.runtime
from edgeq.core.errors import EdgeqError
from edgeq.runtime.manifest import read_manifest

BACKEND_MODULES = {"gguf": "llama_cpp", "onnx": "onnxruntime", "tvm": "tvm"}
# the runner's own files: the runtime package and the few edgeq modules it imports
RUNTIME_MODULES = ("__init__.py", "core/__init__.py", "core/errors.py", "core/fs.py", "core/cache.py")


class DeviceError(EdgeqError):
    """The device could not be reached or did not answer as the runner promises."""


@dataclass
class RunResult:
    """What the runner reported, and the folder its output files were pulled into on the host."""

    ok: bool
    response: dict[str, Any]
    outputs: Path
    wall_s: float

    @property
    def error(self) -> str | None:
        return self.response.get("error")

    @property
    def result(self) -> dict[str, Any]:
        return self.response.get("result") or {}

    @property
    def latency_s(self) -> list[float]:
        return list(self.response.get("latency_s") or [])

    @property
    def peak_rss_bytes(self) -> int | None:
        """The runner's peak resident memory on the device; None where the device cannot say (TVM RPC)."""
        v = self.response.get("peak_rss_bytes")
        return None if v is None else int(v)


class Device(ABC):
    def __init__(self, spec: str, emulated: bool = False):
        self.spec = spec
        self.emulated = emulated          # latency there says nothing about real hardware
        self._probe: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @property
    def name(self) -> str:
        """The spec without its query string: keys and paths stay out of messages and test ids."""
        return self.spec.split("?", 1)[0]

    @abstractmethod
    def probe_device(self) -> dict[str, Any]:
        """Reach the device; {"machine", "python", "backends": [...]}, or raise DeviceError saying why not."""

    def probe(self) -> dict[str, Any]:
        if self._probe is None:
            self._probe = self.probe_device()
        return self._probe

    def unreachable_reason(self) -> str | None:
        try:
            self.probe()
        except DeviceError as exc:
            return str(exc)
        return None

    def profile(self) -> str:
        """The device profile (`--target`) to export bundles for this device with."""
        return {"aarch64": "linux-arm64", "arm64": "linux-arm64"}.get(self.probe().get("machine"), "cpu")

    def facts(self) -> dict[str, Any]:
        """The device's CPU (model, flags), cores and runtime versions (runtime/latency.device_facts): what a
        latency profile is valid for."""
        raise DeviceError(None, f"{self.name} cannot report its CPU")

    def missing_backend_reason(self, backend: str) -> str | None:
        have = self.probe().get("backends", [])
        if backend not in have:
            return f"{self.name} cannot run {backend} bundles (it has: {', '.join(have) or 'no runtime'})"
        return None

    @abstractmethod
    def push(self, bundle: Path) -> str:
        """Copy a bundle onto the device (once per content); its path there."""

    @abstractmethod
    def run(self, device_bundle: str, op: str, args: dict[str, Any] | None = None, backend: str | None = None,
            threads: int | None = 1, n_ctx: int | None = None, timeout: float = 1800,
            pruning_rate: float | None = None) -> RunResult:
        """Run one op of the runner on a pushed bundle and pull its results (`pruning_rate`: one the bundle
        carries; `threads` None: the bundle's profile's)."""

    def close(self) -> None:
        pass


def bundle_digest(bundle: Path) -> str:
    """A name for a bundle's exact content: a bundle with one altered byte is pushed again, never reused."""
    h = hashlib.sha256()
    for p in sorted(bundle.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(bundle).as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def native_runner_of(bundle: Path) -> tuple[str, str] | None:
    """The native runner a bundle carries (its path inside the bundle, from the manifest's `native`) and the
    backend whose model it runs, or None."""
    try:
        section = read_manifest(bundle).get("native")
    except EdgeqError:
        return None          # the device's runner says what is wrong with the bundle
    if isinstance(section, dict) and isinstance(section.get("runner"), str) and isinstance(section.get("runs"), str):
        return section["runner"], section["runs"]
    return None


def stage_runtime(dst: Path) -> Path:
    """The runner's code as a folder to copy onto a device: edgeq/{a few modules} and edgeq/runtime/."""
    pkg = dst / "edgeq"
    (pkg / "runtime").mkdir(parents=True)
    src = Path(edgeq.__file__).parent
    for name in RUNTIME_MODULES:
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, pkg / name)
    for f in sorted(Path(edgeq.runtime.__file__).parent.glob("*.py")):
        shutil.copy2(f, pkg / "runtime" / f.name)
    return dst


PROBE = ("import json, platform, importlib.util as u; "
         f"mods = {json.dumps(BACKEND_MODULES)}; "
         "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
         "'backends': sorted(b for b, m in mods.items() if u.find_spec(m) is not None)}))")


FACTS = ("import json; from edgeq.runtime import runtime_dists; from edgeq.runtime.latency import device_facts; "
         "print(json.dumps(device_facts(runtime_dists())))")


class ShellDevice(Device, ABC):
    """A device reached by running commands and copying folders."""

    python: list[str]

    def __init__(self, spec: str, python: list[str], root: str = "/tmp/edgeq-hil", emulated: bool = False):
        super().__init__(spec, emulated)
        self.python = python
        self.session_dir = f"{root.rstrip('/')}/s-{uuid.uuid4().hex[:12]}"
        self._pushed: dict[str, str] = {}
        # pushed bundle -> (its native runner, e.g. bin/edgeq-run; the backend whose model it runs), if any
        self._native: dict[str, tuple[str, str]] = {}
        self._code: str | None = None
        self._host_tmp = Path(tempfile.mkdtemp(prefix="edgeq-hil-"))

    # --- what a backend provides -------------------------------------------------------------------
    @abstractmethod
    def exec(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60):
        """Run argv on the device; a CompletedProcess (text) whatever the exit status."""

    @abstractmethod
    def put(self, local_dir: Path, remote_dir: str) -> None:
        """Copy a folder's content to `remote_dir` (created)."""

    @abstractmethod
    def get(self, remote_dir: str, local_dir: Path) -> None:
        """Copy a device folder's content into `local_dir` (created)."""

    def device_env(self) -> dict[str, str]:
        """Variables the device's Python needs (a PYTHONPATH here is appended to the runner's)."""
        return {}

    def remove(self, remote: str) -> None:
        self.exec(["rm", "-rf", remote], timeout=60)

    # --- shared ------------------------------------------------------------------------------------
    def probe_device(self) -> dict[str, Any]:
        try:
            res = self.exec([*self.python, "-c", PROBE], env=self.device_env(), timeout=120)
        except OSError as exc:
            raise DeviceError(None, f"{self.name} is unreachable: {exc}") from None
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
            raise DeviceError(None, f"{self.name} is unreachable: {why}")
        try:
            return json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise DeviceError(None, f"{self.name}: its Python did not answer the probe ({res.stdout[:200]!r})") from None

    def facts(self) -> dict[str, Any]:
        code = self._runtime_code()
        extra = self.device_env()
        env = {**extra, "PYTHONPATH": ":".join(p for p in (code, extra.get("PYTHONPATH")) if p),
               "PYTHONDONTWRITEBYTECODE": "1"}
        res = self.exec([*self.python, "-c", FACTS], env=env, timeout=120)
        try:
            return json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
            raise DeviceError(None, f"{self.name} did not report its CPU: {why}") from None

    def _runtime_code(self) -> str:
        if self._code is None:
            local = stage_runtime(Path(tempfile.mkdtemp(dir=self._host_tmp)))
            self._code = f"{self.session_dir}/py"
            self.put(local, self._code)
        return self._code

    def push(self, bundle: Path) -> str:
        bundle = Path(bundle)
        if not (bundle / "manifest.json").is_file():
            raise EdgeqError(bundle, "not a bundle (no manifest.json)")
        key = bundle_digest(bundle)
        if key not in self._pushed:
            remote = f"{self.session_dir}/bundles/{key}"
            self.put(bundle, remote)
            self._pushed[key] = remote
            runner = native_runner_of(bundle)
            if runner is not None:
                self._native[remote] = runner
        return self._pushed[key]

    def exec_native(self, argv: list[str], timeout: float = 60):
        """Run a native executable of a pushed bundle (no Python, no environment)."""
        return self.exec(argv, timeout=timeout)

    def run(self, device_bundle: str, op: str, args: dict[str, Any] | None = None, backend: str | None = None,
            threads: int | None = 1, n_ctx: int | None = None, timeout: float = 1800,
            pruning_rate: float | None = None) -> RunResult:
        """`threads` None: the bundle's profile's, resolved on the device (edgeq.runtime.load)."""
        code = self._runtime_code()
        job = uuid.uuid4().hex[:12]
        local = self._host_tmp / job
        (local / "req").mkdir(parents=True)
        req = {"bundle": device_bundle, "op": op, "args": args or {}, "backend": backend, "threads": threads,
               "n_ctx": n_ctx, **({"pruning_rate": pruning_rate} if pruning_rate is not None else {})}
        (local / "req" / "request.json").write_text(json.dumps(req) + "\n", encoding="utf-8")
        work = f"{self.session_dir}/jobs/{job}"
        self.put(local / "req", work)
        extra = self.device_env()
        env = {**extra, "PYTHONPATH": ":".join(p for p in (code, extra.get("PYTHONPATH")) if p),
               **({"OMP_NUM_THREADS": str(threads)} if threads is not None else {}),
               "OPENBLAS_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        proc = self.exec([*self.python, "-m", "edgeq.runtime.remote", work], env=env, timeout=timeout)
        wall = time.perf_counter() - t0
        out = local / "out"
        try:
            self.get(f"{work}/out", out)
            response = json.loads((out / "response.json").read_text(encoding="utf-8"))
        except (OSError, DeviceError, json.JSONDecodeError):
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise DeviceError(None, f"{self.name}: the runner gave no response: {why}") from None
        finally:
            self.remove(work)
        return RunResult(bool(response.get("ok")), response, out, wall)

    def close(self) -> None:
        try:
            self.remove(self.session_dir)
        except (OSError, DeviceError):
            pass
        shutil.rmtree(self._host_tmp, ignore_errors=True)
