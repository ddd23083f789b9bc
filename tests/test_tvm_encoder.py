"""The TVM backend on encoders, for real: Relax lowered from the IR, built with LLVM, run by the TVM runtime
(locally and through a real TVM RPC server on loopback), compared with the reference executor.

A small random BERT (models/synthetic.py) serves most checks; all-MiniLM-L6-v2 is compiled twice
(f32 and int8) for the acceptance figures.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from edgeq.core.executor import Executor                                  # noqa: E402
from edgeq.evaluate.encoder import cosines
from edgeq.importers.hf_bert import encoder_tokenizer             # noqa: E402
from edgeq.importers.hf_bert import import_hf_folder                       # noqa: E402
from edgeq.api import ExportOptions, export                     # noqa: E402

EDGEQ = [sys.executable, "-m", "edgeq.cli"]
SENTENCES = ["The capital of France is Paris.", "a function returns a value", "ok",
             "It is the model of a value, and that is it!"]
EM_AARCH64 = 183


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgeq.models.recipes.synthetic import write_bert_folder

    return write_bert_folder(tmp_path_factory.mktemp("tinybert") / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_graph(tiny):
    return import_hf_folder(tiny)


@pytest.fixture(scope="module")
def tiny_bundles(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("tvm-tiny")
    out = {}
    for q in ("f32", "f16", "int8", "int4"):
        export(ExportOptions(model=str(tiny), backend="tvm", quant=q, out=str(root / q)))
        out[q] = root / q
    return out


@pytest.fixture(scope="module")
def rpc_server():
    """A real `python -m tvm.exec.rpc_server` on a free loopback port, killed at teardown."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("TVM RPC server did not start")
                time.sleep(0.3)
        yield f"rpc://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _ids(graph, texts):
    tok = encoder_tokenizer(graph)
    return [tok.encode(t).ids for t in texts]


@pytest.mark.parametrize("quant,floor", [("f32", 0.999999), ("f16", 0.99999), ("int8", 0.999), ("int4", 0.99)])
def test_tiny_bundle_matches_reference(tiny_bundles, tiny_graph, quant, floor):
    from edgeq import runtime

    ids = _ids(tiny_graph, SENTENCES)
    ex = Executor(tiny_graph)
    ref = np.stack([ex.embed(i) for i in ids])
    with runtime.load(tiny_bundles[quant]) as s:
        assert s.backend_name == "tvm"
        got = s.embed_ids(ids)                          # one padded batch: lengths differ
        alone = np.stack([s.embed_ids([i])[0] for i in ids])
        by_text = s.embed(SENTENCES)
    c = cosines(ref, got)
    assert c.min() >= floor, (quant, c)
    np.testing.assert_allclose(got, alone, atol=2e-5)    # padding changes nothing
    np.testing.assert_allclose(by_text, got, atol=1e-6)
    if quant == "f32":
        np.testing.assert_allclose(got, ref, atol=2e-5)
    meas = json.loads((tiny_bundles[quant] / "measurements.json").read_text())
    assert meas["reference_check"]["backend"] == "tvm" and meas["reference_check"]["cosine_min"] >= floor


def test_formats_and_exact_bytes(tiny_bundles, tiny_graph):
    """Each matmul weight is stored in its plan format; the weights file holds exactly the bytes the formats say."""
    from safetensors.numpy import load_file

    from edgeq.core.formats import get_format
    from edgeq.core.formats.int4_groups import int4_dequantize_groups

    for quant, fmt in (("f32", "f32"), ("f16", "f16"), ("int8", "int8_g32"), ("int4", "int4_g32")):
        m = json.loads((tiny_bundles[quant] / "manifest.json").read_text())
        arrays = load_file(str(tiny_bundles[quant] / "params.safetensors"))
        name = "encoder.layer.0.intermediate.dense.weight"
        assert m["plan"]["tensors"][name]["format"] == fmt
        stored = sum(a.nbytes for k, a in arrays.items() if k in (name, name + ".scale"))
        assert stored == get_format(fmt).nbytes(tiny_graph.weights[name].shape)
        assert m["tvm"]["param_names"] == list(arrays) or sorted(m["tvm"]["param_names"]) == sorted(arrays)
    # int4: the stored nibbles and scales decode to the format's reference round trip
    arrays = load_file(str(tiny_bundles["int4"] / "params.safetensors"))
    w = tiny_graph.weights[name].numpy()
    from edgeq.targets.tvm.int4_vnni import plain_order
    from edgeq.targets.tvm.ops import unpanel

    packed, scale = unpanel(plain_order(arrays[name])), unpanel(arrays[name + ".scale"])
    dq = int4_dequantize_groups(packed.T, scale.T)
    np.testing.assert_array_equal(dq, get_format("int4_g32").roundtrip(w))
    # int8: q8_0's codes (each 4-input chunk in operand order) and block scales decode to the format's round trip
    from edgeq.core.formats.int8_groups import int8_dequantize_groups

    a8 = load_file(str(tiny_bundles["int8"] / "params.safetensors"))
    n_p, k, p = a8[name].shape
    plain = a8[name].reshape(n_p, k // 4, p, 4).transpose(0, 1, 3, 2).reshape(n_p, k, p)     # g32_order undone
    dq8 = int8_dequantize_groups(unpanel(plain).T, unpanel(a8[name + ".scale"]).T)
    np.testing.assert_array_equal(dq8, get_format("int8_g32").roundtrip(w))


def test_int4_dequantize_is_inside_the_matmul(tiny_graph):
    """No float copy of an int4 weight exists at any level: the kernel decodes the packed bytes inside its
    reduction loop (a register tile per row block, schedule.py)."""
    from edgeq.targets.tvm.schedule import schedule_linear
    from edgeq.targets.tvm.lower import lower_tvm
    from edgeq.targets.tvm.presets import preset_formats
    from edgeq.core.plan import Plan

    lowered = lower_tvm(tiny_graph, Plan(tensors=preset_formats(tiny_graph, "int4")))
    kernels = {gv.name_hint: f for gv, f in lowered.mod.functions.items() if "int4_g32" in gv.name_hint}
    assert kernels
    for name, f in kernels.items():
        text = f.script()
        weight = re.findall(r'(\w+): T\.Buffer\(\((?:[^()]|\([^()]*\))*\), "uint8"\)', text)
        assert len(weight) == 1, name
        blocks = [b.split('"')[1] for b in text.split("T.sblock(")[1:]]
        # the reduction, its bias epilogue, and the decode stage the schedule puts inside the reduction loop
        assert set(blocks) <= {"root", "matmul", "linear", "dequant"}, (name, blocks)
        decode = text.split('T.sblock("dequant")')[1].split("T.sblock(")[0]
        assert f"T.Cast(\"int32\", {weight[0]}" in decode and ">>" in decode, name
        scheduled = schedule_linear(f, packed_pairs=True).script()
        assert re.search(r'dequant_local = T\.sblock_alloc_buffer\(.*scope="local"\)', scheduled), name
        k_loop = scheduled.index("for k_0 in")                  # decoded inside the reduction loop, per row block
        assert k_loop < scheduled.index('T.sblock("dequant")') < scheduled.index('T.sblock("matmul_update")'), name


def test_rpc_gives_the_local_outputs(tiny_bundles, tiny_graph, rpc_server):
    from edgeq import runtime

    ids = _ids(tiny_graph, SENTENCES)
    with runtime.load(tiny_bundles["int4"]) as s:
        local = s.embed_ids(ids)
    with runtime.load(tiny_bundles["int4"], device=rpc_server) as r:
        remote = r.embed_ids(ids)
        t = r.time(r.encoder_inputs(ids[:1]), number=2, repeat=2)
    np.testing.assert_allclose(remote, local, atol=1e-6)
    assert t["device"] == rpc_server and 0 < t["min_ms"] <= t["median_ms"]


def test_cli_run_and_eval_through_rpc(tiny_bundles, tiny, rpc_server):
    r = subprocess.run([*EDGEQ, "run", str(tiny_bundles["int8"]), SENTENCES[0], "--device", rpc_server],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backend"] == "tvm" and abs(np.linalg.norm(out["embedding"]) - 1) < 1e-4
    assert out["latency"]["median_ms"] > 0
    r = subprocess.run([*EDGEQ, "eval", str(tiny_bundles["int8"]), "--device", rpc_server, "--reference", str(tiny),
                        "--sentences", "16", "--json", "--no-record", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["backend"] == "tvm" and res["n_sentences"] == 16 and res["cosine_mean"] >= 0.999


def test_bad_device_and_preset_are_one_line_errors(tiny_bundles, tiny, tmp_path):
    r = subprocess.run([*EDGEQ, "run", str(tiny_bundles["f32"]), "x", "--device", "rpc://127.0.0.1:notaport"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "rpc://HOST:PORT" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*EDGEQ, "export", "--model", str(tiny), "--backend", "tvm", "--quant", "q4_0",
                        "-o", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "presets: f32, f16, int8, int4" in r.stderr
    assert not (tmp_path / "x").exists()


def _elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1          # 64-bit little-endian
    return int.from_bytes(data[18:20], "little")


DLOPEN_C = r"""
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_LAZY | RTLD_LOCAL);
  if (!h) { printf("dlopen failed: %s\n", dlerror()); return 1; }
  void *blob = dlsym(h, "__tvm_ffi__library_bin");
  printf("dlopen ok, library blob %s\n", blob ? "found" : "missing");
  return blob ? 0 : 2;
}
"""


def _dlopen_under_qemu(lib: Path, tmp: Path) -> None:
    """Where qemu-user is installed: aarch64's dynamic loader opens the library and finds TVM's module blob."""
    import shutil

    if not (shutil.which("qemu-aarch64-static") and shutil.which("aarch64-linux-gnu-gcc")):
        return
    (tmp / "dl.c").write_text(DLOPEN_C)
    subprocess.run(["aarch64-linux-gnu-gcc", "-o", str(tmp / "dl"), str(tmp / "dl.c"), "-ldl"], check=True)
    r = subprocess.run(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(tmp / "dl"), str(lib)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "library blob found" in r.stdout, r.stdout + r.stderr


def test_arm64_exports_are_aarch64_and_byte_identical(tiny, tmp_path):
    """linux-arm64: an aarch64 shared object; android (no NDK): a tar of aarch64 objects. Twice -> same bytes."""
    digests = {}
    for target in ("linux-arm64", "android"):
        for n in range(2):
            out = tmp_path / f"{target}-{n}"
            r = subprocess.run([*EDGEQ, "export", "--model", str(tiny), "--backend", "tvm", "--target", target,
                                "--quant", "int4", "-o", str(out)] + (["--quiet"] if n else []), capture_output=True,
                               text=True, timeout=600, env={**__import__("os").environ, "EDGEQ_ANDROID_CLANG": ""})
            assert r.returncode == 0, r.stderr
            assert n or ("wrote" in r.stdout and "not checked here" in r.stdout), r.stdout
            m = json.loads((out / "manifest.json").read_text())
            digests.setdefault(target, []).append({a["path"]: a["sha256"] for a in m["artifacts"]})
            meas = json.loads((out / "measurements.json").read_text())
            assert "skipped" in meas["reference_check"]
        if target == "linux-arm64":
            lib = (out / "model.so").read_bytes()
            assert _elf_machine(lib) == EM_AARCH64 and int.from_bytes(lib[16:18], "little") == 3   # ET_DYN
            assert m["tvm"]["target"]["mtriple"] == "aarch64-linux-gnu"
            _dlopen_under_qemu(out / "model.so", tmp_path)
        else:
            with tarfile.open(out / "model.tar") as t:
                members = [mm for mm in t.getmembers() if mm.isfile()]
                assert members and all(mm.mtime == 0 for mm in members)
                for mm in members:
                    data = t.extractfile(mm).read()
                    assert _elf_machine(data) == EM_AARCH64, mm.name
                    assert int.from_bytes(data[16:18], "little") == 1                           # ET_REL
            assert m["tvm"]["target"]["mtriple"] == "aarch64-linux-android"
        a, b = digests[target]
        assert a == b, f"{target}: exports differ: {a} vs {b}"
        from edgeq import runtime
        from edgeq.runtime.manifest import BundleError

        if __import__("platform").machine() == "x86_64":
            with pytest.raises(BundleError, match="cannot be loaded on this machine.*rpc://"):
                runtime.load(out)              # an aarch64 library on an x86 host: one clear error


# --- all-MiniLM-L6-v2 (acceptance) --------------------------------------------------

@pytest.mark.parametrize("quant,floor", [("f32", 0.9999), ("int8", 0.99)])
def test_minilm_on_tvm(quant, floor, minilm_reference, tmp_path):
    from edgeq.evaluate.bundle import evaluate_bundle

    out = tmp_path / quant
    export(ExportOptions(model="all-MiniLM-L6-v2", backend="tvm", quant=quant, out=str(out)))
    res = evaluate_bundle(out, sentences=48, record=False, reference_logits=minilm_reference, threads=2)
    assert res["backend"] == "tvm" and res["n_sentences"] == 48
    assert res["cosine_mean"] >= floor, res
    m = json.loads((out / "manifest.json").read_text())
    assert m["runtime_versions"]["apache-tvm"] == "0.27.0.post1"
    lib = next(a for a in m["artifacts"] if a["role"] == "model")
    assert lib["backend"] == "tvm" and lib["path"] == "model.so"


def test_tvm_runtime_runs_without_torch(tiny_bundles):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edgeq import runtime\n"
        f"s = runtime.load({str(tiny_bundles['int4'])!r}, threads=2)\n"
        "print(s.embed(['a sentence', 'ok']).shape)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(2, 64)" in out.stdout


def test_plan_then_export_the_same_bytes(tiny, tiny_bundles, tmp_path):
    """`edgeq plan --backend tvm` writes the plan an export uses; exporting that plan gives the same weights."""
    r = subprocess.run([*EDGEQ, "plan", "--model", str(tiny), "--backend", "tvm", "--quant", "int4",
                        "-o", str(tmp_path / "plan.json"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["backend"] == "tvm" and plan["tensors"]["encoder.layer.1.output.dense.weight"]["format"] == "int4_g32"
    export(ExportOptions(model=str(tiny), backend="tvm", plan=str(tmp_path / "plan.json"), out=str(tmp_path / "b"),
                         check=False))
    sha = lambda p: {a["path"]: a["sha256"] for a in json.loads((p / "manifest.json").read_text())["artifacts"]}  # noqa: E731
    assert sha(tmp_path / "b") == sha(tiny_bundles["int4"])
