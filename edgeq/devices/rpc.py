"""`rpc://host:port`: a TVM RPC server (on a phone: the TVM RPC app; on a board: `python -m tvm.exec.rpc_server`).

TVM RPC runs no Python on the device: the runner runs on the host and
`edgeq.runtime.load(..., device="rpc://host:port")` (the TVM backend, issue 5)
verifies the bundle here, uploads its library and weights, and calls it there.
So this device runs TVM bundles only; latencies include the network round
trips, and the device's peak memory is not measured (`peak_rss_bytes` is None).
Until the TVM runtime backend is in this edgeq, the probe says so and HIL tests
for rpc devices skip with that reason (after a real connection check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edgeq.core.errors import EdgeqError
from edgeq.devices.base import Device, DeviceError, RunResult


class RpcDevice(Device):
    def __init__(self, spec: str):
        u = urlsplit(spec)
        if not u.hostname or not u.port:
            raise EdgeqError(None, f"device {spec!r}: expected rpc://host:port")
        super().__init__(spec)
        self.host, self.port = u.hostname, u.port
        # what the server runs on: not discoverable over RPC, so named (?target=android; default the host's cpu)
        self.target = (parse_qs(u.query).get("target") or ["cpu"])[-1]

    def check_connection(self) -> None:
        """Open a session and close it again: a TVM RPC server serves one session at a time, so holding this one
        would block the TVM backend's own."""
        try:
            from tvm import rpc
        except ImportError:
            raise DeviceError(None, f"{self.name}: the host needs apache-tvm to speak TVM RPC") from None
        try:
            sess = rpc.connect(self.host, self.port, session_timeout=60)
        except Exception as exc:        # tvm raises its own error types for refused or dropped connections
            raise DeviceError(None, f"{self.name} is unreachable: {str(exc).strip().splitlines()[-1]}") from None
        del sess
        import gc

        gc.collect()

    def probe_device(self) -> dict[str, Any]:
        self.check_connection()
        try:
            from edgeq.runtime import tvm_backend  # noqa: F401  (the TVM runtime backend, issue 5)
        except ImportError:
            raise DeviceError(None, f"{self.name}: reachable, but this edgeq has no TVM runtime backend yet") from None
        return {"machine": "tvm-rpc", "python": None, "backends": ["tvm"]}

    def profile(self) -> str:
        return self.target

    def push(self, bundle: Path) -> str:
        return str(Path(bundle).resolve())       # the TVM backend uploads what it needs when it loads

    def run(self, device_bundle: str, op: str, args: dict[str, Any] | None = None, backend: str | None = None,
            threads: int = 1, n_ctx: int | None = None, timeout: float = 1800,
            pruning_rate: float | None = None) -> RunResult:
        import json
        import tempfile
        import time

        from edgeq.runtime import remote

        work = Path(tempfile.mkdtemp(prefix="edgeq-rpc-"))
        req = {"bundle": device_bundle, "op": op, "args": args or {}, "backend": backend or "tvm",
               "threads": threads, "n_ctx": n_ctx, "device": f"rpc://{self.host}:{self.port}",
               **({"pruning_rate": pruning_rate} if pruning_rate is not None else {})}
        (work / "request.json").write_text(json.dumps(req) + "\n", encoding="utf-8")
        t0 = time.perf_counter()
        resp = remote.execute(work)
        resp.update(peak_rss_bytes=None, machine="tvm-rpc")     # those figures are the host's, not the device's
        return RunResult(bool(resp.get("ok")), resp, work / "out", time.perf_counter() - t0)
