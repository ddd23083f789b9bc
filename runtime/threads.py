"""How many threads the runtime computes with when the caller does not say.

The bundle's device profile (the manifest's `target.threads`) says how many threads suit the device: android 4
(the big cores of a phone), `auto` for a device whose core count is known only where it runs. A profile's count
is never taken above the physical cores of the machine the bundle runs on: llama.cpp's and onnxruntime's
threads spin at each barrier, and more threads than cores (a phone's bundle tried on a 2-core laptop) make
every step wait on a descheduled thread. `EDGEQ_THREADS` in the environment overrides the profile (a process
sharing its machine; tests that time nothing run at 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgeq.runtime.manifest import BundleError

ENV = "EDGEQ_THREADS"
AUTO = "auto"
SYS_CPU = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """The physical cores this process may run on (its CPU affinity; SMT siblings counted once), from Linux's
    CPU topology; the logical CPU count where that cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def checked_threads(threads: Any, what: str = "threads") -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BundleError(None, f"{what} {threads!r} is not a positive integer")
    return threads


def default_threads(bundle: Path, manifest: dict[str, Any]) -> int:
    """The thread count for a bundle loaded without one: EDGEQ_THREADS, else its profile's (`auto`: the
    physical cores), at most the physical cores."""
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            return checked_threads(int(env), ENV)
        except ValueError:
            raise BundleError(None, f"{ENV}={env!r} is not a positive integer") from None
    wanted = (manifest.get("target") or {}).get("threads", AUTO)
    cores = physical_cores()
    if wanted == AUTO:
        return cores
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise BundleError(bundle / "manifest.json", f"target.threads {wanted!r} is neither a positive integer nor "
                                                    f"{AUTO!r}")
    return min(wanted, cores)
