"""Hardware-in-the-loop: bundles pushed to devices, run there by edgeq.runtime, checked against their references.

Two kinds of tests live here:
- the HIL matrix, run on every device given with `--edgeq-device` (or EDGEQ_DEVICES) × backend, and skipped
  when none is given (`.ci/run` gives local, a loopback sshd and qemu-arm64);
- tests that always run: the local device and a real sshd started here on 127.0.0.1, and the plugin's own
  behaviour (ids, skips) in an inner pytest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgeq.devices import checks, open_device
from edgeq.devices.base import ShellDevice

pytest_plugins = ["pytester"]


def _flip_byte(bundle: Path, dst: Path) -> Path:
    """A copy of the bundle with one byte of its model file altered (its manifest untouched)."""
    import json

    shutil.copytree(bundle, dst)
    m = json.loads((dst / "manifest.json").read_text())
    model = dst / next(a["path"] for a in m["artifacts"] if a.get("role", "model") == "model")
    with open(model, "r+b") as f:
        f.seek(model.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    return dst


@pytest.fixture(scope="session")
def host_runs(hil_bundles):
    """The same reference run on the host (the `local` device), for latency comparisons."""
    dev = open_device("local")
    runs: dict[str, object] = {}

    def get(backend: str):
        if backend not in runs:
            runs[backend] = checks.run_reference(dev, hil_bundles(backend))
        return runs[backend]

    yield get
    dev.close()


# --- the HIL matrix: every --edgeq-device x backend --------------------------------------------------------

@pytest.mark.hil
def test_bundle_matches_its_reference_on_device(edgeq_device, edgeq_backend, hil_bundles, hil):
    bundle = hil_bundles(edgeq_backend, edgeq_device.profile())
    res = hil.run_reference(edgeq_device, bundle)
    figures = hil.assert_outputs_match(bundle, res)
    assert res.response["backend"] == edgeq_backend
    # the runner ran the runtime pushed with it, on the device's own machine (TVM RPC: the host drives the device)
    if isinstance(edgeq_device, ShellDevice):
        assert "/edgeq-hil/" in res.response["runtime_file"]
    assert res.response["machine"] == edgeq_device.probe()["machine"]
    assert len(res.latency_s) == res.result["n_inputs"] >= 2 and min(res.latency_s) > 0
    if res.peak_rss_bytes is not None:       # TVM RPC cannot measure it
        hil.assert_peak_memory(bundle, res)
    if edgeq_backend == "gguf":
        assert figures["n_positions"] == sum(res.result["prefill_tokens"]) and res.result["decode_s_per_token"] > 0


@pytest.mark.hil
def test_altered_byte_is_a_checksum_error_on_device(edgeq_device, edgeq_backend, hil_bundles, hil, tmp_path):
    bad = _flip_byte(hil_bundles(edgeq_backend, edgeq_device.profile()), tmp_path / "bad")
    res = hil.run_reference(edgeq_device, bad)
    assert "checksum error" in hil.assert_checksum_error(res)


@pytest.mark.hil
def test_latency_against_the_host(edgeq_device, edgeq_backend, hil_bundles, host_runs, hil):
    why = hil.latency_skip_reason(edgeq_device)
    if why:
        pytest.skip(why)
    bundle = hil_bundles(edgeq_backend, edgeq_device.profile())
    res = hil.run_reference(edgeq_device, bundle)
    # generous: this checks the plumbing (same code, same machine for local and loopback ssh), not speed
    got = hil.assert_latency(bundle, res, host_runs(edgeq_backend), factor=10.0)
    assert got["device_s"] > 0 and got["host_s"] > 0


@pytest.mark.hil
def test_latency_against_the_prediction(edgeq_device, edgeq_backend, tmp_path, hil, record_property):
    """Measured latency on the device against the bundle's prediction from the device's own latency profile
    (`edgeq profile --device SPEC`, cached); the ratio is reported (junit property, and the output)."""
    why = hil.latency_skip_reason(edgeq_device)
    if why:
        pytest.skip(why)
    if edgeq_backend not in ("gguf", "onnx"):
        pytest.skip(f"latency profiles cover decoders on gguf and onnx, not {edgeq_backend} yet")
    from edgeq.api import ExportOptions, export
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
    from edgeq.predictor.profile import cached_profile_path

    facts = edgeq_device.facts()
    found = [p for p in (cached_profile_path(facts, edgeq_backend, 1, c) for c in ("wall", "cpu")) if p and p.is_file()]
    profile = found[0] if found else None
    if profile is None:
        pytest.skip(f"no latency profile of {edgeq_device.name} for {edgeq_backend}: run `edgeq profile --device "
                    f"{edgeq_device.name} --backend {edgeq_backend}` once")
    cfg = tiny_config(vocab_size=4096, hidden_size=512, intermediate_size=1536, n_layers=8, n_heads=8, n_kv_heads=2,
                      tied_embeddings=True, context_length=512)
    src = graph_to_hf_folder(random_llama(cfg, seed=1, scale=0.05), tmp_path / "m", byte_level_spec(4096))
    quant = {"gguf": "q4_0", "onnx": "int4"}[edgeq_backend]
    bundle = tmp_path / "b"
    export(ExportOptions(model=str(src), backend=edgeq_backend, quant=quant, out=str(bundle), calibration=False,
                         check=False, latency_profile=str(profile)))
    got = hil.measure_prediction(edgeq_device, bundle)
    for k in ("decode_ratio", "prefill_ratio"):
        record_property(k, round(got[k], 4))
    print(f"{edgeq_device.name} {edgeq_backend}: measured/predicted decode {got['decode_ratio']:.3f}, "
          f"prefill {got['prefill_ratio']:.3f} ({got['measured']} vs {got['predicted']})")
    # the device is the profile's: a plan outside the profile's micro-models is still predicted within 2x
    assert 0.5 < got["decode_ratio"] < 2.0 and 0.5 < got["prefill_ratio"] < 2.0, got


@pytest.fixture(scope="session")
def real_bundles(session_tmp):
    """The acceptance bundles: SmolLM2 for `android` (its default gguf preset)."""
    from edgeq.api import ExportOptions, export

    made: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in made:
            out = session_tmp("hil-smollm") / "android"
            # uncalibrated: the device check is about running the bundle, not about its quality
            export(ExportOptions(target="android", out=str(out), calibration=False))
            made[backend] = out
        return made[backend]

    return get


# MiniLM int8 (the onnx acceptance bundle) is already the matrix's onnx bundle, and the matrix's tvm bundle for an
# arm64 device is a linux-arm64 one
@pytest.mark.hil(backends=["gguf"])
def test_real_models_match_their_reference_on_emulated_arm64(edgeq_device, edgeq_backend, real_bundles, hil):
    if not edgeq_device.emulated:
        pytest.skip(f"the real-model check is for the emulated arm64 device; the small bundles cover {edgeq_device.name}")
    bundle = real_bundles(edgeq_backend)
    res = hil.run_reference(edgeq_device, bundle, decode_tokens=2)
    assert res.response["machine"] == "aarch64"
    figures = hil.assert_outputs_match(bundle, res)
    print(f"{edgeq_device.name} {edgeq_backend}: {figures}, peak {res.peak_rss_bytes / 2**20:.0f} MiB")


# --- always run: local and a loopback sshd, driven directly ---------------------------------------------------

@pytest.fixture(scope="session")
def loopback_ssh(session_tmp):
    from edgeq.devices.loopback_sshd import LoopbackSshd

    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        pytest.skip("sshd is not installed (apt-get install openssh-server; install.sh does it)")
    with LoopbackSshd(session_tmp("sshd")) as sshd:
        yield sshd.spec


@pytest.mark.parametrize("which", ["local", "ssh"])
def test_gguf_bundle_runs_and_tamper_is_refused(which, request, hil_bundles, tmp_path):
    spec = "local" if which == "local" else request.getfixturevalue("loopback_ssh")
    dev = open_device(spec)
    try:
        assert dev.probe()["backends"][:1] == ["gguf"]
        bundle = hil_bundles("gguf")
        good = checks.run_reference(dev, bundle)
        figures = checks.assert_outputs_match(bundle, good)
        # the same machine and library: the device reproduces the host's own export-time check exactly
        host = checks.host_check(bundle)
        assert figures["kld_mean"] == pytest.approx(host["kld_mean"], rel=1e-5) and figures["top1"] == host["top1"]
        bad = checks.run_reference(dev, _flip_byte(bundle, tmp_path / "bad"))
        assert "checksum error" in checks.assert_checksum_error(bad)
        gen = dev.run(dev.push(bundle), "generate", {"prompt": "the cat", "max_tokens": 4})
        assert gen.ok and isinstance(gen.result["text"], str)
    finally:
        dev.close()


def test_unknown_device_is_one_clear_error():
    from edgeq.core.errors import EdgeqError

    with pytest.raises(EdgeqError, match="unknown device 'phone'"):
        open_device("phone")


def test_plugin_parametrises_devices_by_backend_and_skips_unreachable(pytester, monkeypatch):
    pytester.makepyfile(test_inner="""
        import pytest

        @pytest.mark.hil(backends=["gguf", "onnx"])
        def test_pair(edgeq_device, edgeq_backend):
            assert edgeq_backend in edgeq_device.probe()["backends"]

        def test_device_only(edgeq_device):
            assert edgeq_device.probe()["python"]
    """)
    monkeypatch.setenv("EDGEQ_DEVICES", "ssh://nobody@127.0.0.1:1")
    r = pytester.runpytest("-p", "no:cacheprovider", "-rs", "-v", "--edgeq-device", "local")
    r.assert_outcomes(passed=3, skipped=3)
    out = r.stdout.str()
    for tid in ["test_pair[local-gguf]", "test_pair[local-onnx]", "test_device_only[local]",
                "test_pair[ssh://nobody@127.0.0.1:1-gguf]", "test_device_only[ssh://nobody@127.0.0.1:1]"]:
        assert tid in out, tid
    assert "ssh://nobody@127.0.0.1:1 is unreachable" in out


def test_plugin_skips_without_devices(pytester, monkeypatch):
    pytester.makepyfile(test_inner="""
        def test_x(edgeq_device, edgeq_backend):
            raise AssertionError("must not run")
    """)
    monkeypatch.delenv("EDGEQ_DEVICES", raising=False)
    r = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    r.assert_outcomes(skipped=1)
    assert "no device configured" in r.stdout.str()


def test_users_own_bundle_through_the_plugin(pytester, hil_bundles, monkeypatch):
    """The README's recipe: a user's test, their bundle (--edgeq-bundle), their device (--edgeq-device)."""
    pytester.makepyfile(test_mine="""
        import pytest

        @pytest.mark.hil
        def test_my_bundle_on_device(edgeq_device, edgeq_bundle, hil):
            res = hil.run_reference(edgeq_device, edgeq_bundle)
            hil.assert_outputs_match(edgeq_bundle, res)
            hil.assert_peak_memory(edgeq_bundle, res)
    """)
    monkeypatch.delenv("EDGEQ_DEVICES", raising=False)
    r = pytester.runpytest("-p", "no:cacheprovider", "-v", "--edgeq-device", "local",
                           "--edgeq-bundle", str(hil_bundles("gguf")))
    r.assert_outcomes(passed=1)
    assert "test_my_bundle_on_device[local-b]" in r.stdout.str()
