"""`rpc://host:port`: a TVM RPC server (on a phone: the TVM RPC app; on a board: `python -m tvm.exec.rpc_server`).

TVM RPC runs no Python on the device: the host verifies the bundle, uploads
its compiled library, and drives it remotely; the device measures time with
TVM's own timers. So this device runs TVM bundles only, and runs them through
the TVM runtime backend of edgeq.runtime with a remote device. That backend is
being built (issue 5); until it is merged, `run` says so and the HIL tests for
rpc devices skip with that reason after a real connection check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeq.devices.base import Device, DeviceError, RunResult
from edgeq.errors import EdgeqError


class RpcDevice(Device):
    def __init__(self, spec: str):
        u = urlsplit(spec)
        if not u.hostname or not u.port:
            raise EdgeqError(None, f"device {spec!r}: expected rpc://host:port")
        super().__init__(spec)
        self.host, self.port = u.hostname, u.port
        self.session = None

    def connect(self):
        if self.session is None:
            try:
                from tvm import rpc
            except ImportError:
                raise DeviceError(None, f"{self.name}: the host needs apache-tvm to speak TVM RPC") from None
            try:
                self.session = rpc.connect(self.host, self.port, session_timeout=0)
            except Exception as exc:        # tvm raises its own error types for refused or dropped connections
                raise DeviceError(None, f"{self.name} is unreachable: {str(exc).strip().splitlines()[-1]}") from None
        return self.session

    def probe_device(self) -> dict[str, Any]:
        self.connect()
        try:
            from edgeq.runtime import tvm_backend  # noqa: F401  (the TVM runtime backend, issue 5)
        except ImportError:
            raise DeviceError(None, f"{self.name}: reachable, but this edgeq has no TVM runtime backend yet") from None
        return {"machine": "tvm-rpc", "python": None, "backends": ["tvm"]}

    def push(self, bundle: Path) -> str:
        return str(Path(bundle).resolve())       # verified and uploaded by the TVM backend when run

    def run(self, device_bundle: str, op: str, args: dict[str, Any] | None = None, backend: str | None = None,
            threads: int = 1, n_ctx: int | None = None, timeout: float = 1800) -> RunResult:
        raise DeviceError(None, f"{self.name}: running TVM bundles over RPC needs the TVM runtime backend (issue 5)")
