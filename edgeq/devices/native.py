"""Bundles run by their own native runner (bin/edgeq-run) on a device: no Python there, nothing installed.

`run_native` turns a HIL op into one runner command and its JSON into the `RunResult` the Python runner
(runtime/remote.py) gives, so the same checks (devices/checks.py) judge both: `reference` writes the logits of
the bundle's reference prompts as .npy files, `generate` continues a prompt. The runner refuses a damaged bundle
with one line and exit status 2 before anything is loaded; that comes back as a `BundleError` response.

`qemu-arm64-bare` is the emulated phone: a root folder holding only a static qemu-aarch64 (the CPU) and the
pushed bundles, entered with chroot when this process may (root), so the runner provably finds no Python, no
libc and no shared library; otherwise qemu-user with that folder as its library prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from edgeq.devices.base import DeviceError, RunResult, ShellDevice
from edgeq.devices.local import FolderDevice

QEMU = "qemu-aarch64-static"
SHELL = "/bin/sh"         # on the host, not the device
NATIVE_OPS = ("reference", "generate")
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")   # generate args


def native_argv(runner: str, bundle: str, op: str, args: dict[str, Any], threads: int | None, n_ctx: int | None,
                out: str) -> list[str]:
    """`threads` None: the runner's default, the manifest's target.threads."""
    argv = [runner, "--bundle", bundle, "--json", *(["--threads", str(threads)] if threads else []),
            *(["--n-ctx", str(n_ctx)] if n_ctx else [])]
    if op == "reference":
        return [*argv, "--logits-out", out, "--max-tokens", str(int(args.get("decode_tokens", 8)))]
    if op == "generate":
        sampling = [a for k in SAMPLING if k in args for a in (f"--{k.replace('_', '-')}", str(args[k]))]
        return [*argv, "--prompt", str(args["prompt"]), "--max-tokens", str(int(args.get("max_tokens", 32))),
                *(["--chat"] if args.get("chat") else []), *sampling]
    raise DeviceError(None, f"the native runner has no op {op!r} (it runs {', '.join(NATIVE_OPS)})")


def response_of(proc: subprocess.CompletedProcess, op: str, runner: str, backend: str) -> dict[str, Any]:
    """The runner's exit status and JSON as the Python runner's response."""
    if proc.returncode != 0:
        line = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        line = line.removeprefix("edgeq-run: ")
        return {"ok": False, "error": line, "error_type": "BundleError" if proc.returncode == 2 else "RunnerError",
                "user_error": proc.returncode == 2}
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": f"the native runner printed no JSON ({proc.stdout[:200]!r})",
                "error_type": "RunnerError", "user_error": False}
    peak = out.get("peak_rss_bytes")
    common = {"ok": True, "load_s": out["timings_ms"]["load"] / 1000, "backend": backend, "machine": "aarch64",
              "python": None, "runtime_file": runner, "peak_rss_bytes": peak if peak and peak > 0 else None,
              "native": {k: out[k] for k in ("edgeq_version", "llama_cpp_python_version", "n_ctx", "threads",
                                             "kv_cache_dtype", "timings_ms")}}
    if op == "generate":
        g = out["generation"]
        return {**common, "result": {"text": g["text"], "ids": g["ids"]},
                "latency_s": [(g["timings"]["prompt_ms"] + g["timings"]["generate_ms"]) / 1000]}
    refs = out["reference"]
    per_token = [r["timings"]["generate_ms"] / 1000 / (len(r["greedy"]) - 1) for r in refs if len(r["greedy"]) > 1]
    return {**common, "latency_s": [r["timings"]["prompt_ms"] / 1000 for r in refs],
            "result": {"kind": "logits", "files": [f"logits_{i}.npy" for i in range(len(refs))],
                       "n_inputs": len(refs), "prefill_tokens": [len(r["token_ids"]) for r in refs],
                       "decode_s_per_token": statistics.median(per_token) if per_token else None,
                       "argmax": [r["argmax"] for r in refs], "greedy": [r["greedy"] for r in refs],
                       "tokenized_ids_match": [r.get("tokenized_ids_match") for r in refs]}}


def run_native(device: ShellDevice, device_bundle: str, native: tuple[str, str], op: str,
               args: dict[str, Any] | None, threads: int | None, n_ctx: int | None, timeout: float,
               pruning_rate: float | None = None) -> RunResult:
    """One op by the bundle's runner on the device; its outputs pulled into a host folder."""
    job = uuid.uuid4().hex[:12]
    local = device._host_tmp / job
    (local / "out").mkdir(parents=True)
    work = f"{device.session_dir}/jobs/{job}"
    device.put(local, work)
    runner, backend = native
    exe = f"{device_bundle}/{runner}"
    argv = native_argv(exe, device_bundle, op, args or {}, threads, n_ctx, f"{work}/out")
    if pruning_rate:                     # the runner runs the full model only: it refuses another rate in one line
        argv += ["--pruning-rate", repr(float(pruning_rate))]
    t0 = time.perf_counter()
    proc = device.exec_native(argv, timeout=timeout)
    wall = time.perf_counter() - t0
    try:
        response = response_of(proc, op, exe, backend)
        out = local / "pulled"
        device.get(f"{work}/out", out)
    finally:
        device.remove(work)
    return RunResult(bool(response.get("ok")), response, out, wall)


class QemuArm64BareDevice(FolderDevice):
    """An arm64 Linux with nothing installed, emulated: only native-runner bundles run here."""

    def __init__(self, spec: str = "qemu-arm64-bare"):
        base = os.environ.get("EDGEQ_DEVICE_CACHE") or Path.home() / ".cache" / "edgeq" / "devices"
        self.bare_root = Path(base) / "qemu-arm64-bare" / "root"
        # the commands run with an empty environment (no PATH): absolute paths
        self.chroot_exe = shutil.which("chroot") if hasattr(os, "geteuid") and os.geteuid() == 0 else None
        self.chroot = self.chroot_exe is not None
        if self.chroot:      # the device's own paths, inside the root
            super().__init__(spec, [], self.bare_root, root="/tmp/edgeq-hil", emulated=True)
        else:                # host paths under the root (qemu-user sees the host's files too)
            super().__init__(spec, [], Path("/"), root=str(self.bare_root / "tmp" / "edgeq-hil"), emulated=True)

    def profile(self) -> str:
        return "android"         # the emulated phone: bundles as `edgeq export --target android` writes them

    def _make_root(self) -> None:
        qemu = shutil.which(QEMU)
        if qemu is None:
            raise DeviceError(None, f"{self.name} is unreachable: {QEMU} is not installed "
                                    "(apt-get install qemu-user-static)")
        (self.bare_root / "tmp").mkdir(parents=True, exist_ok=True)
        dst = self.bare_root / QEMU
        if not dst.exists() or dst.stat().st_size != Path(qemu).stat().st_size:
            shutil.copy2(qemu, dst)        # the emulator is static: it needs nothing in the root either

    def exec_native(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [self.chroot_exe, str(self.bare_root), f"/{QEMU}", *argv] if self.chroot else [shutil.which(QEMU), *argv]
        # started from a fresh fork of a small shell: peak RSS (getrusage, the runner's measure where the root has
        # no /proc) is kept across exec, so a process exec'ed straight from this one would count its memory too
        return self.exec([SHELL, "-c", '"$@" & wait $!', "sh", *cmd], env={}, timeout=timeout)

    def exec(self, argv, env=None, timeout=60):
        try:
            return subprocess.run(argv, env=env or {}, capture_output=True, text=True, timeout=timeout, cwd="/")
        except subprocess.TimeoutExpired:
            raise DeviceError(None, f"{self.name}: {' '.join(argv[-3:])} ran past {timeout:.0f} s") from None

    def probe_device(self) -> dict[str, Any]:
        self._make_root()
        entries = sorted(p.name for p in self.bare_root.iterdir())
        if self.chroot:
            res = self.exec([self.chroot_exe, str(self.bare_root), f"/{QEMU}", "-version"], timeout=60)
            if res.returncode != 0:
                raise DeviceError(None, f"{self.name} is unreachable: chroot into {self.bare_root} failed: "
                                        f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
        return {"machine": "aarch64", "python": None, "backends": ["gguf"], "runner": "native (bin/edgeq-run)",
                "isolation": "chroot" if self.chroot else "qemu-user library prefix", "root": str(self.bare_root),
                "root_entries": entries}

    def run(self, device_bundle, op, args=None, backend=None, threads=1, n_ctx=None, timeout=1800,
            pruning_rate=None) -> RunResult:
        native = self._native.get(device_bundle)
        if native is None:
            raise DeviceError(None, f"{self.name} runs only bundles with a native runner (export for android or "
                                    "linux-arm64 with --native); this one has none")
        return run_native(self, device_bundle, native, op, args, threads, n_ctx, timeout, pruning_rate)
