"""`adb:SERIAL`: an Android device through adb. UNTESTED here (no device, no adb in CI).

It is the ssh device with adb's transport: the same shell line (`adb shell`
runs it), folders copied with `adb push` / `adb pull`. The device needs a
Python with the runtime extra, e.g. Termux's (`?python=` as for ssh; default
/data/data/com.termux/files/usr/bin/python), and a writable work folder
(default /data/local/tmp/edgeq-hil).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs

from edgeq.devices.base import DeviceError, ShellDevice
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

    def put(self, local_dir: Path, remote_dir: str) -> None:
        self._check(self._adb(["shell", f"mkdir -p '{remote_dir}'"], 60), f"mkdir {remote_dir}")
        self._check(self._adb(["push", f"{local_dir}/.", remote_dir], 1800), f"push to {remote_dir}")

    def get(self, remote_dir: str, local_dir: Path) -> None:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        self._check(self._adb(["pull", f"{remote_dir}/.", str(local_dir)], 1800), f"pull of {remote_dir}")
