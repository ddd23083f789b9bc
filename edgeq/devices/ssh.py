"""`ssh://user@host[:port]`: any Linux box with Python 3 and the runtime extra (`pip install edgeq[runtime]`).

Options ride in the query string: `python=` (the device's interpreter,
default python3), `key=` (an identity file), `known_hosts=` (a host-key file;
default: the user's, new keys accepted once), `dir=` (work folder on the
device, default /tmp/edgeq-hil). Folders travel as tar streams over the one
connection, so the device needs only ssh, tar and Python.
"""

from __future__ import annotations

import shlex
import subprocess
import tarfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from edgeq.core.errors import EdgeqError
from edgeq.devices.base import DeviceError, ShellDevice


class SshDevice(ShellDevice):
    def __init__(self, spec: str):
        u = urlsplit(spec)
        if not u.hostname:
            raise EdgeqError(None, f"device {spec!r}: expected ssh://user@host[:port]")
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        self.target = f"{u.username}@{u.hostname}" if u.username else u.hostname
        self.opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]
        if u.port:
            self.opts += ["-p", str(u.port)]
        if q.get("key"):
            self.opts += ["-i", q["key"], "-o", "IdentitiesOnly=yes"]
        if q.get("known_hosts"):
            self.opts += ["-o", f"UserKnownHostsFile={q['known_hosts']}"]
        self.opts += ["-o", "StrictHostKeyChecking=accept-new"]
        super().__init__(spec, [q.get("python", "python3")], root=q.get("dir", "/tmp/edgeq-hil"))

    def shell_line(self, argv: list[str], env: dict[str, str] | None) -> str:
        """One command line for the remote shell (what adb shares)."""
        pre = ["env", *[f"{k}={v}" for k, v in (env or {}).items()]] if env else []
        return "cd / && " + " ".join(shlex.quote(a) for a in [*pre, *argv])

    def _ssh(self, line: str, timeout: float, **kw):
        try:
            return subprocess.run(["ssh", *self.opts, self.target, line], timeout=timeout, **kw)
        except subprocess.TimeoutExpired:
            raise DeviceError(None, f"{self.name}: command ran past {timeout:.0f} s") from None

    def exec(self, argv, env=None, timeout=60):
        return self._ssh(self.shell_line(argv, env), timeout, capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def put(self, local_dir: Path, remote_dir: str) -> None:
        line = f"mkdir -p {shlex.quote(remote_dir)} && tar -C {shlex.quote(remote_dir)} -xf -"
        proc = subprocess.Popen(["ssh", *self.opts, self.target, line], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tf:
                for p in sorted(Path(local_dir).iterdir()):
                    tf.add(p, arcname=p.name)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise DeviceError(None, f"{self.name}: copy to {remote_dir} failed: {(err.strip().splitlines() or ['?'])[-1]}")

    def get(self, remote_dir: str, local_dir: Path) -> None:
        line = f"tar -C {shlex.quote(remote_dir)} -cf - ."
        proc = subprocess.Popen(["ssh", *self.opts, self.target, line], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
                tf.extractall(local_dir, filter="data")
        except tarfile.TarError:
            pass
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise DeviceError(None, f"{self.name}: copy from {remote_dir} failed: {(err.strip().splitlines() or ['?'])[-1]}")
