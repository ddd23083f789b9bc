"""`local`: the runner in a separate process on this machine, with a clean environment.

Only PATH, HOME and what the runner needs are passed on, so a test cannot pass
because of something the host process set up (an imported module, a variable).
The device's Python is this interpreter unless EDGEQ_LOCAL_PYTHON names another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from edgeq.devices.base import DeviceError, ShellDevice


class FolderDevice(ShellDevice):
    """A device whose file system is a folder of this machine (`local`: "/", `qemu-arm64`: its root folder)."""

    def __init__(self, spec: str, python: list[str], host_root: Path, root: str, emulated: bool = False,
                 env: dict[str, str] | None = None):
        super().__init__(spec, python, root=root, emulated=emulated)
        self.host_root = Path(host_root)
        self.env = env or {}

    def host_path(self, remote: str) -> Path:
        return self.host_root / remote.lstrip("/")

    def exec(self, argv, env=None, timeout=60):
        clean = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        try:
            return subprocess.run(argv, env={**clean, **(env or {})}, capture_output=True, text=True,
                                  timeout=timeout, cwd="/")
        except subprocess.TimeoutExpired:
            raise DeviceError(None, f"{self.name}: {' '.join(argv[-3:])} ran past {timeout:.0f} s") from None

    def device_env(self) -> dict[str, str]:
        return dict(self.env)

    def remove(self, remote: str) -> None:
        shutil.rmtree(self.host_path(remote), ignore_errors=True)

    def put(self, local_dir: Path, remote_dir: str) -> None:
        dst = self.host_path(remote_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local_dir, dst, symlinks=True, dirs_exist_ok=True)   # links stay links, as in tar over ssh

    def get(self, remote_dir: str, local_dir: Path) -> None:
        src = self.host_path(remote_dir)
        if not src.is_dir():
            raise DeviceError(None, f"{self.name}: {remote_dir} does not exist on the device")
        shutil.copytree(src, local_dir, dirs_exist_ok=True)


class LocalDevice(FolderDevice):
    def __init__(self, spec: str = "local"):
        python = os.environ.get("EDGEQ_LOCAL_PYTHON") or sys.executable
        import tempfile

        super().__init__(spec, [python], Path("/"), root=f"{tempfile.gettempdir()}/edgeq-hil")
