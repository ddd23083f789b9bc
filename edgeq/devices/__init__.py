"""Devices the hardware-in-the-loop tests run bundles on, named by one string each:

    local                      this machine, the runner in a separate clean process
    ssh://user@host[:port]     any Linux box with Python and the runtime extra (?python=, ?key=, ?known_hosts=)
    adb:SERIAL                 an Android device through adb (untested: no device here)
    rpc://host:port            a TVM RPC server (phones run the TVM RPC app), for TVM bundles
    qemu-arm64                 an emulated arm64 Linux (`edgeq device setup qemu-arm64` builds it once)
    qemu-arm64-bare            an emulated arm64 with nothing installed: bundles run by their native runner
"""

from __future__ import annotations

from edgeq.core.errors import EdgeqError
from edgeq.devices.base import Device, DeviceError, RunResult

__all__ = ["open_device", "Device", "DeviceError", "RunResult"]


def open_device(spec: str) -> Device:
    """The device a spec names; nothing is contacted until it is probed or used."""
    spec = spec.strip()
    if spec == "local":
        from edgeq.devices.local import LocalDevice

        return LocalDevice(spec)
    if spec.startswith("ssh://"):
        from edgeq.devices.ssh import SshDevice

        return SshDevice(spec)
    if spec.startswith("adb:"):
        from edgeq.devices.adb import AdbDevice

        return AdbDevice(spec)
    if spec.startswith("rpc://"):
        from edgeq.devices.rpc import RpcDevice

        return RpcDevice(spec)
    if spec == "qemu-arm64":
        from edgeq.devices.qemu_arm64 import QemuArm64Device

        return QemuArm64Device(spec)
    if spec == "qemu-arm64-bare":
        from edgeq.devices.native import QemuArm64BareDevice

        return QemuArm64BareDevice(spec)
    raise EdgeqError(None, f"unknown device {spec!r} (local, ssh://user@host[:port], adb:SERIAL, rpc://host:port, "
                           "qemu-arm64, qemu-arm64-bare)")
