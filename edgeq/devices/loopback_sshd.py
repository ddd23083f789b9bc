"""A real sshd on 127.0.0.1 (a free port, throw-away keys, its own config; foreground, no daemon).

The ssh device's tests and CI run against it; a person can too:

    python -m edgeq.devices.loopback_sshd /tmp/sshd     # prints the ssh:// spec, serves until interrupted

It logs in as the current user with a key made for it, and runs commands with
this interpreter unless another is given.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgeq.core.errors import EdgeqError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackSshd:
    def __init__(self, folder: str | os.PathLike, python: str | None = None):
        self.folder = Path(folder)
        self.python = python or sys.executable
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def spec(self) -> str:
        f = self.folder
        return (f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}?key={f}/id_ed25519"
                f"&known_hosts={f}/known_hosts&python={self.python}")

    def start(self, timeout: float = 20) -> str:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            raise EdgeqError(None, "sshd is not installed (apt-get install openssh-server)")
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        for key in ("host_ed25519", "id_ed25519"):
            if not (f / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeq-hil", "-f", str(f / key)],
                               check=True)
        shutil.copy(f / "id_ed25519.pub", f / "authorized_keys")
        (f / "authorized_keys").chmod(0o600)
        # OpenSSH refuses to start without its privilege-separation folder
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.port = _free_port()
        (f / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {f}/host_ed25519",
            f"AuthorizedKeysFile {f}/authorized_keys", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
            "PidFile none", "X11Forwarding no", "PrintMotd no", "LogLevel ERROR", ""]), encoding="utf-8")
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(f / "sshd_config")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(f / "sshd.log", "wb"))
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                log = (f / "sshd.log").read_text(errors="replace").strip().splitlines()
                raise EdgeqError(f / "sshd_config", f"sshd exited: {log[-1] if log else self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self.spec
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise EdgeqError(f / "sshd_config", f"sshd did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LoopbackSshd":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m edgeq.devices.loopback_sshd FOLDER [PYTHON]", file=sys.stderr)
        return 2
    with LoopbackSshd(argv[0], argv[1] if len(argv) > 1 else None) as d:
        print(d.spec, flush=True)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        try:
            d.proc.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
