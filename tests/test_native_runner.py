"""The native runner: `edgeq export --target android` puts a static aarch64 `bin/edgeq-run` and a `run` script in
the bundle; under qemu-aarch64, in a root holding nothing but the emulator and the bundle (qemu-arm64-bare), it
reproduces the host runtime's greedy ids on the same bundle and refuses a bundle with one changed byte before
loading anything.

The runner is cross-built once per edgeq and llama.cpp version into ~/.cache/edgeq/native (minutes, see
edgeq/native/runner.py); with the cache present this module takes about a minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgeq import runtime
from edgeq.api import ExportOptions, export
from edgeq.bundle.reference import read_reference
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import sha256_file
from edgeq.devices import checks, open_device
from edgeq.native import llama_source
from edgeq.native.runner import build_runner, check_static_aarch64, interpreter

MARCH = "armv8.2-a+dotprod"
# x86 and arm64 llama.cpp differ with an f16 KV cache: measured on this bundle, position 0 agrees to 1e-7 and
# later ones by up to 0.1 (with an f32 cache, 5e-7; probably the K·Q product: x86's sgemm takes f32 Q as it is,
# arm64 without FP16 arithmetic rounds it to f16), with both equally far from the float reference. So: logits within LOGIT_ATOL, a position's argmax
# may differ only where the host's two candidates are within NEAR_TIE, and the device no further from the float
# reference than the host (+10 %).
LOGIT_ATOL = 0.25
NEAR_TIE = 2 * LOGIT_ATOL


def _runner_or_skip():
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
    try:
        return build_runner(MARCH)
    except EdgeqError as exc:
        if llama_source.missing_cross_tools():
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def android_bundle(tmp_path_factory, tiny_decoder_dir) -> Path:
    _runner_or_skip()
    out = tmp_path_factory.mktemp("native") / "android"
    export(ExportOptions(model=str(tiny_decoder_dir), target="android", quant="q8_0", out=str(out),
                         calibration=False))
    return out


@pytest.fixture(scope="module")
def bare():
    dev = open_device("qemu-arm64-bare")
    yield dev
    dev.close()


def test_android_bundle_holds_only_static_aarch64_executables(android_bundle):
    m = json.loads((android_bundle / "manifest.json").read_text())
    listed = {a["path"]: a for a in m["artifacts"]}
    assert listed["bin/edgeq-run"]["role"] == "runner" and listed["run"]["role"] == "launcher"
    for rel in ("bin/edgeq-run", "run"):
        assert sha256_file(android_bundle / rel) == listed[rel]["sha256"]
        assert (android_bundle / rel).stat().st_mode & 0o111
    elves = [p for p in android_bundle.rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"]
    assert [p.relative_to(android_bundle).as_posix() for p in elves] == ["bin/edgeq-run"]
    for p in elves:
        check_static_aarch64(p)
        assert interpreter(p) is None
    assert m["native"]["static"] and m["native"]["march"] == MARCH and m["native"]["runner"] == "bin/edgeq-run"
    script = (android_bundle / "run").read_text()
    assert script.startswith("#!/system/bin/sh\n")          # Android has no /bin/sh
    assert subprocess.run(["sh", "-n", str(android_bundle / "run")]).returncode == 0


def test_launcher_passes_the_prompt_and_options_through(android_bundle, tmp_path):
    """The `run` script's own logic, in this host's POSIX sh: this machine cannot exec an aarch64 file from a
    shell (no binfmt_misc), so bin/edgeq-run is replaced by a script that prints the argv it was given; the runner
    itself is exercised under qemu by the tests below."""
    copy = tmp_path / "b"
    shutil.copytree(android_bundle, copy)
    exe = copy / "bin" / "edgeq-run"
    exe.write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]" "$a"; done\n')
    exe.chmod(0o755)
    launcher = ["sh", str(copy / "run")]
    prompt = "It's \"quoted\" & $HOME -x"
    got = subprocess.run([*launcher, prompt, "--max-tokens", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert got.stdout == f"[--bundle][{copy}][--prompt][{prompt}][--max-tokens][3]"
    got = subprocess.run([*launcher, "--json"], capture_output=True, text=True, cwd="/")
    assert got.stdout == f"[--bundle][{copy}][--json]"
    exe.chmod(0o644)                 # adb push without mode bits: the launcher makes it executable
    assert subprocess.run([*launcher, "--verify-only"], capture_output=True, text=True).returncode == 0


def test_cached_runner_is_the_bundles_runner(android_bundle):
    """A second export takes the cached build: same bytes, so bundles stay byte-identical."""
    r = build_runner(MARCH)
    assert sha256_file(r.path) == sha256_file(android_bundle / "bin/edgeq-run") == r.info["sha256"]


def test_runner_in_a_bare_root_matches_the_host_runtime(android_bundle, bare):
    probe = bare.probe()
    if probe["isolation"] == "chroot":       # nothing but the emulator in the device's root: no Python, no libc
        assert probe["root_entries"] == ["qemu-aarch64-static", "tmp"]
    res = checks.run_reference(bare, android_bundle, n_ctx=256, decode_tokens=8)
    assert res.ok, res.error
    assert res.response["machine"] == "aarch64" and res.response["python"] is None
    assert all(res.result["tokenized_ids_match"])         # llama.cpp's tokenizer on the device, same ids
    assert 0 < res.peak_rss_bytes < 256 << 20             # the runner's (and the emulator's), not its parent's
    ids, ref = read_reference(android_bundle / "reference")
    with runtime.load(android_bundle, threads=1, n_ctx=256) as s:
        for i, x in enumerate(ids):
            host = s.logits(x)
            dev = np.load(res.outputs / f"logits_{i}.npy")
            assert dev.shape == host.shape
            assert np.abs(dev[0] - host[0]).max() < 1e-4            # no attention yet: the same numbers
            assert np.abs(dev - host).max() < LOGIT_ATOL
            assert np.abs(dev - ref[i]).mean() <= 1.1 * np.abs(host - ref[i]).mean() + 1e-3
            am = res.result["argmax"][i]
            for k, (a, b) in enumerate(zip(host.argmax(-1).tolist(), am)):
                assert a == b or abs(host[k, a] - host[k, b]) < NEAR_TIE, (i, k, a, b, host[k, a], host[k, b])
            assert res.result["greedy"][i] == s.generate_ids(x, 8)     # greedy continuation: the same ids
    # and the bundle's float reference, judged as on every HIL device
    checks.assert_outputs_match(android_bundle, res)


def test_quantized_kv_cache_is_applied_as_on_the_host(tiny_decoder_dir, bare, tmp_path):
    """kv_cache_dtype q8_0 (with flash attention, which llama.cpp needs to quantize V): the host's greedy ids."""
    out = tmp_path / "kvq8"
    export(ExportOptions(model=str(tiny_decoder_dir), target="android", quant="q8_0", kv_dtype="q8_0", out=str(out),
                         calibration=False, check=False))
    res = checks.run_reference(bare, out, n_ctx=256, decode_tokens=8)
    assert res.ok, res.error
    assert res.response["native"]["kv_cache_dtype"] == "q8_0"
    ids, _ = read_reference(out / "reference")
    with runtime.load(out, threads=1, n_ctx=256) as s:
        assert res.result["greedy"] == [s.generate_ids(x, 8) for x in ids]


def test_runner_continues_a_prompt_like_the_host(android_bundle, bare):
    prompt = "The capital of France is"
    res = bare.run(bare.push(android_bundle), "generate", {"prompt": prompt, "max_tokens": 12})
    assert res.ok, res.error
    with runtime.load(android_bundle, threads=1) as s:
        want = s.generate_ids(s.tokenize(prompt, add_special=True, parse_special=False), 12)
        assert res.result["ids"] == want and res.result["text"] == s.detokenize(want)


def test_runner_samples_like_the_host(tiny_decoder_dir, bare, tmp_path):
    """Temperature, top-k, top-p and a repeat penalty through llama.cpp's sampler chain: with the same seed, the
    host runtime's tokens. The synthetic model's distributions are nearly flat (hundreds of tokens within the
    top-p mass), so a draw flips on logits that differ in the second decimal (the f16 K-cache difference above):
    with an f32 KV cache the first draws can be compared (measured: the first 9 agree, the 10th flips)."""
    out = tmp_path / "kvf32"
    export(ExportOptions(model=str(tiny_decoder_dir), target="android", quant="q8_0", kv_dtype="f32", out=str(out),
                         calibration=False, check=False))
    prompt = "The capital of France is"
    sampling = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "repeat_penalty": 1.3}
    remote = bare.push(out)

    def device(seed: int) -> list[int]:
        res = bare.run(remote, "generate", {"prompt": prompt, "max_tokens": 6, **sampling, "seed": seed})
        assert res.ok, res.error
        return res.result["ids"]

    with runtime.load(out, threads=1) as s:
        ids = s.tokenize(prompt, add_special=True, parse_special=False)
        want = s.generate_ids(ids, 6, **sampling, seed=7)
        assert want != s.generate_ids(ids, 6)                 # not the greedy tokens: the draws are compared
    assert device(7) == want == device(7)                     # the host's draws, and the same ones again
    assert device(8) != want                                  # another seed, other draws


def test_runner_chat_uses_the_models_template(android_bundle, bare):
    res = bare.run(bare.push(android_bundle), "generate", {"prompt": "hello", "max_tokens": 6, "chat": True})
    assert res.ok, res.error
    with runtime.load(android_bundle, threads=1) as s:
        ids = s.tokenize(s.chat_prompt("hello"), add_special=True, parse_special=True)
        assert res.result["ids"] == s.generate_ids(ids, 6)


def _flip(bundle: Path, dst: Path, rel: str) -> Path:
    shutil.copytree(bundle, dst)
    p = dst / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return dst


def test_one_changed_byte_is_refused_before_loading(android_bundle, bare, tmp_path):
    bad = bare.push(_flip(android_bundle, tmp_path / "bad", "model.gguf"))
    # --verbose lets llama.cpp log: had it opened the model, its loader's lines would be on stderr too
    proc = bare.exec_native([f"{bad}/bin/edgeq-run", "--bundle", bad, "--json", "--verbose"], timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"edgeq-run: {bad}/model.gguf: checksum error: SHA-256 does not match the manifest"]
    # the HIL view of the same refusal
    res = checks.run_reference(bare, tmp_path / "bad")
    assert "checksum error" in checks.assert_checksum_error(res)


def test_altered_manifest_is_refused_in_one_line(android_bundle, bare, tmp_path):
    dst = tmp_path / "escape"
    shutil.copytree(android_bundle, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["artifacts"][0]["path"] = "../model.gguf"
    (dst / "manifest.json").write_text(json.dumps(m))
    remote = bare.push(dst)
    proc = bare.exec_native([f"{remote}/bin/edgeq-run", "--bundle", remote, "--json"], timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"edgeq-run: {remote}/manifest.json: artifact path '../model.gguf' escapes the bundle"]


def test_no_cross_toolchain_is_one_line_before_any_work(tiny_decoder_dir, tmp_path):
    """A machine without the cross toolchain (PATH without it) and without a cached runner: the default android
    export stops with one line saying what to install, or --no-native, and writes nothing."""
    import sys

    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "EDGEQ_NATIVE_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "edgeq.cli", "export", "--model", str(tiny_decoder_dir), "--target",
                        "android", "--quant", "q8_0", "-o", str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "apt-get install" in lines[0] and "g++-aarch64-linux-gnu" in lines[0] and "--no-native" in lines[0]
    assert not (tmp_path / "out").exists()


def test_native_is_refused_where_there_is_no_runner(tiny_decoder_dir, tmp_path):
    with pytest.raises(EdgeqError, match="the cpu profile has no native runner"):
        export(ExportOptions(model=str(tiny_decoder_dir), target="cpu", native=True, out=str(tmp_path / "a")))
    with pytest.raises(EdgeqError, match="no native runner for decoders on the onnx backend"):
        export(ExportOptions(model=str(tiny_decoder_dir), target="android", backend="onnx", native=True,
                             out=str(tmp_path / "b")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
