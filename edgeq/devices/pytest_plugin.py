"""pytest plugin (entry point `pytest11`): run bundles on the devices named by `--edgeq-device`.

    pytest --edgeq-device local --edgeq-device ssh://pi@board --edgeq-device rpc://phone:9090

Devices also come from EDGEQ_DEVICES (comma- or space-separated). A test that
takes the `edgeq_device` fixture runs once per device; one that also takes
`edgeq_backend` runs once per device × backend (`@pytest.mark.hil(backends=[...])`
narrows the backends; default gguf, onnx, tvm), with ids like `[local-gguf]`.
A device that cannot be reached, or lacks the runtime a backend needs, skips
its tests with the reason; with no device configured they skip as well.
Bundles to check can be given with `--edgeq-bundle PATH` (fixture `edgeq_bundle`).

The `hil` fixture holds the checks (edgeq.devices.checks): outputs against the
bundle's reference outputs, latency against the host's, peak memory.
"""

from __future__ import annotations

import os
import re

import pytest

ALL_BACKENDS = ("gguf", "onnx", "tvm")


def pytest_addoption(parser) -> None:
    g = parser.getgroup("edgeq", "edgeq hardware-in-the-loop tests")
    g.addoption("--edgeq-device", action="append", default=[], dest="edgeq_devices", metavar="SPEC",
                help="device to run HIL tests on (repeatable; also EDGEQ_DEVICES): local, ssh://user@host[:port], "
                     "adb:SERIAL, rpc://host:port, qemu-arm64")
    g.addoption("--edgeq-bundle", action="append", default=[], dest="edgeq_bundles", metavar="PATH",
                help="bundle folder for the edgeq_bundle fixture (repeatable; also EDGEQ_BUNDLES)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "hil(backends=None): hardware-in-the-loop test, run on each --edgeq-device "
                                       "(× backend when it takes edgeq_backend)")


def _split_env(name: str) -> list[str]:
    return [s for s in re.split(r"[,\s]+", os.environ.get(name, "")) if s]


def configured_devices(config) -> list[str]:
    seen: dict[str, None] = {}
    for s in [*(config.getoption("edgeq_devices") or []), *_split_env("EDGEQ_DEVICES")]:
        seen.setdefault(s.strip(), None)
    return list(seen)


def device_id(spec: str) -> str:
    """A short test id: the spec without its query string (keys and paths stay out of test names)."""
    return spec.split("?", 1)[0]


def pytest_generate_tests(metafunc) -> None:
    names = metafunc.fixturenames
    if "edgeq_device" in names:
        specs = configured_devices(metafunc.config)
        marker = metafunc.definition.get_closest_marker("hil")
        backends = list((marker.kwargs.get("backends") if marker else None) or ALL_BACKENDS)
        skip = pytest.mark.skip(reason="no device configured (--edgeq-device SPEC or EDGEQ_DEVICES)")
        if "edgeq_backend" in names:
            params = [pytest.param(s, b, id=f"{device_id(s)}-{b}") for s in specs for b in backends]
            metafunc.parametrize(("edgeq_device", "edgeq_backend"),
                                 params or [pytest.param(None, None, id="no-device", marks=skip)], indirect=True)
        else:
            params = [pytest.param(s, id=device_id(s)) for s in specs]
            metafunc.parametrize("edgeq_device", params or [pytest.param(None, id="no-device", marks=skip)],
                                 indirect=True)
    if "edgeq_bundle" in names:
        paths = [*metafunc.config.getoption("edgeq_bundles"), *_split_env("EDGEQ_BUNDLES")]
        params = [pytest.param(p, id=os.path.basename(os.path.normpath(p))) for p in paths]
        metafunc.parametrize("edgeq_bundle", params or [pytest.param(
            None, id="no-bundle", marks=pytest.mark.skip(reason="no bundle given (--edgeq-bundle PATH)"))],
            indirect=True)


class _Devices:
    """One Device per spec for the whole session; probed once, closed at the end."""

    def __init__(self):
        self.open: dict[str, object] = {}

    def get(self, spec: str):
        from edgeq.devices import open_device

        if spec not in self.open:
            self.open[spec] = open_device(spec)
        return self.open[spec]

    def close(self) -> None:
        for d in self.open.values():
            d.close()


@pytest.fixture(scope="session")
def _edgeq_devices():
    devs = _Devices()
    yield devs
    devs.close()


@pytest.fixture
def edgeq_device(request, _edgeq_devices):
    """The device of this parametrisation; skipped with the reason when it cannot be reached."""
    dev = _edgeq_devices.get(request.param)
    why = dev.unreachable_reason()
    if why:
        pytest.skip(why)
    return dev


@pytest.fixture
def edgeq_backend(request, edgeq_device):
    """The backend of this parametrisation; skipped when the device lacks its runtime."""
    why = edgeq_device.missing_backend_reason(request.param)
    if why:
        pytest.skip(why)
    return request.param


@pytest.fixture
def edgeq_bundle(request):
    from pathlib import Path

    return Path(request.param)


@pytest.fixture(scope="session")
def hil():
    """The checks: `hil.run_reference(device, bundle)`, `hil.assert_outputs_match(bundle, result)`, ..."""
    from edgeq.devices import checks

    return checks
