"""`adb:SERIAL`: an Android device through adb. UNTESTED here (no device, no adb in CI).

It is the ssh device with adb's transport: the same shell line (`adb shell`
runs it), folders copied with `adb push` / `adb pull`, and a writable work
folder (default /data/local/tmp/edgeq-hil). A bundle with a native runner
(`edgeq export --target android`, bin/edgeq-run) runs by that runner, so the
phone needs nothing installed; the same commands run it under qemu-arm64-bare
in CI. Other bundles need a Python with the runtime extra on the phone, e.g.
Termux's (`?python=` as for ssh; default /data/data/com.termux/files/usr/bin/python).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs

from edgeq.devices.base import DeviceError, RunResult, ShellDevice
from edgeq.devices.native import run_native
from edgeq.devices.ssh import SshDevice

TERMUX_PYTHON = "/data/data/com.termux/files/usr/bin/python"


class AdbDevice(ShellDevice):
    shell_line = SshDevice.shell_line

    def __init__(self, spec: str):
        serial, _, query = spec[len("adb:"):].partition("?")
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        self.adb = ["adb", *(["-s", serial] if serial else [])]
        super().__init__(spec, [q.get("python", TERMUX_PYTHON)], root=q.get("dir", "/data/local/tmp/edgeq-hil"))

    def _adb(self, args: list[str], timeout: float):
        if shutil.which("adb") is None:
            raise DeviceError(None, f"{self.name} is unreachable: adb is not installed")
        try:
            return subprocess.run([*self.adb, *args], capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DeviceError(None, f"{self.name}: adb {args[0]} ran past {timeout:.0f} s") from None

    def exec(self, argv, env=None, timeout=60):
        return self._adb(["shell", self.shell_line(argv, env)], timeout)

    def _check(self, res, what: str) -> None:
        if res.returncode != 0:
            raise DeviceError(None, f"{self.name}: {what} failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")

    def exec_native(self, argv: list[str], timeout: float = 60):
        # adb push keeps the mode bits on most versions; where it does not, the runner is made executable first
        chmod = f"chmod 755 {shlex.quote(argv[0])} 2>/dev/null; "
        return self._adb(["shell", chmod + self.shell_line(argv, None)], timeout)

    def probe_device(self):
        """The phone's Python runtime if it has one (Termux), else what a native runner needs: an arm64 kernel."""
        try:
            return super().probe_device()
        except DeviceError as no_python:
            res = self._adb(["shell", "uname -m"], 60)
            machine = res.stdout.strip()
            if res.returncode != 0 or machine not in ("aarch64", "arm64"):
                raise no_python from None
            return {"machine": "aarch64", "python": None, "backends": ["gguf"], "runner": "native (bin/edgeq-run)"}

    def profile(self) -> str:
        return "android"

    def run(self, device_bundle, op, args=None, backend=None, threads=1, n_ctx=None, timeout=1800,
            pruning_rate=None) -> RunResult:
        native = self._native.get(device_bundle)
        if native is not None and backend in (None, native[1]):
            return run_native(self, device_bundle, native, op, args, threads, n_ctx, timeout, pruning_rate)
        return super().run(device_bundle, op, args, backend, threads, n_ctx, timeout, pruning_rate)

    def put(self, local_dir: Path, remote_dir: str) -> None:
        self._check(self._adb(["shell", f"mkdir -p '{remote_dir}'"], 60), f"mkdir {remote_dir}")
        self._check(self._adb(["push", f"{local_dir}/.", remote_dir], 1800), f"push to {remote_dir}")

    def get(self, remote_dir: str, local_dir: Path) -> None:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        self._check(self._adb(["pull", f"{remote_dir}/.", str(local_dir)], 1800), f"pull of {remote_dir}")
