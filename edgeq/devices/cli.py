"""`edgeq device`: set up the emulated device, probe any device."""

from __future__ import annotations

import json
import sys
import time

from edgeq.core.errors import EdgeqError
from edgeq.devices import open_device
from edgeq.devices.qemu_arm64 import setup
from edgeq.native.runner import build_runner
from edgeq.targets.profiles import get_profile


def _setup_bare(jobs: int | None, log) -> dict:
    """qemu-arm64-bare needs only the native runner (built once into ~/.cache/edgeq/native) and its empty root."""
    t0 = time.perf_counter()
    runner = build_runner(get_profile("android").native_march, jobs=jobs, log=log)
    probe = open_device("qemu-arm64-bare").probe()
    return {**probe, "runner": str(runner.path), "runner_bytes": runner.path.stat().st_size,
            "runner_build": runner.info, "setup_seconds": round(time.perf_counter() - t0, 1)}


def cmd_setup(a) -> int:
    if a.device not in ("qemu-arm64", "qemu-arm64-bare"):
        raise EdgeqError(None, f"only qemu-arm64 and qemu-arm64-bare are set up by edgeq; {a.device!r} is a real "
                               "device")
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr))
    if a.device == "qemu-arm64-bare":
        info = _setup_bare(a.jobs, log)
    else:
        info = setup(force=a.force, jobs=a.jobs, log=log)
    print(json.dumps(info, indent=1))
    return 0


def cmd_probe(a) -> int:
    dev = open_device(a.device)
    try:
        print(json.dumps(dev.probe(), indent=1))
    finally:
        dev.close()
    return 0


def add_device_parser(sub, command) -> None:
    """`command(name, help, *examples)` makes a subcommand parser the way the main CLI does (help and examples)."""
    d = command("device", "devices for hardware-in-the-loop tests: set up the emulated one, probe any",
                "edgeq device setup qemu-arm64",
                'edgeq device probe "ssh://pi@raspberrypi.local"')
    dsub = d.add_subparsers(dest="device_cmd", required=True, metavar="COMMAND")
    what = ("build an emulated arm64 device once into ~/.cache/edgeq/devices (qemu-arm64-bare: the native runner, "
            "into ~/.cache/edgeq/native)")
    s = dsub.add_parser("setup", help=what, description=what,
                        formatter_class=d.formatter_class,
                        epilog="examples:\n  edgeq device setup qemu-arm64\n  edgeq device setup qemu-arm64 --force\n"
                               "  edgeq device setup qemu-arm64-bare")
    s.add_argument("device", help="qemu-arm64 or qemu-arm64-bare")
    s.add_argument("--force", action="store_true", help="rebuild from scratch")
    s.add_argument("--jobs", type=int, help="compile jobs for the llama.cpp cross-build (default: all cores)")
    s.add_argument("--quiet", action="store_true", help="no progress messages")
    s.set_defaults(fn=cmd_setup)
    p = dsub.add_parser("probe", help="reach a device; print its machine, Python and runtimes",
                        description="reach a device; print its machine, Python and runtimes",
                        formatter_class=d.formatter_class,
                        epilog="examples:\n  edgeq device probe local\n  edgeq device probe rpc://127.0.0.1:9090")
    p.add_argument("device", help="local, ssh://user@host[:port], adb:SERIAL, rpc://host:port, qemu-arm64, "
                                  "qemu-arm64-bare")
    p.set_defaults(fn=cmd_probe)
