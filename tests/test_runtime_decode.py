"""The runtime's decode loop over llama.cpp's C API, and the thread count a bundle loads with.

The GGUF backend decodes through `llama_batch`/`llama_decode` and llama.cpp's sampler chain
(runtime/llama_context.py) instead of llama-cpp-python's `Llama` with `logits_all`. Checked here against that
old path, run as it was (llama-cpp-python's own `Llama`, every position's logits kept, argmax of the last):
the same greedy tokens, the same logits at every position, the same text; and the loop copies the vocabulary's
logits only for a sampler that reads them. Speed is bench/runtime.py's, not a test's.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeq import runtime
from edgeq.runtime import threads as runtime_threads
from edgeq.runtime.memory import drop_pages, mapped_ranges

PROMPTS = ["the rain", "x", "snow falls on the"]


@pytest.fixture(scope="module")
def bundles(tiny_decoder_dir, tmp_path_factory) -> dict:
    """The tiny decoder as f32 GGUF + ONNX (one bundle, cpu profile: 4 threads) and q8_0 GGUF for android."""
    from edgeq.api import ExportOptions, export

    root = tmp_path_factory.mktemp("decode")
    export(ExportOptions(model=str(tiny_decoder_dir), backend="all", quant="f32", out=str(root / "cpu"), check=False))
    export(ExportOptions(model=str(tiny_decoder_dir), backend="gguf", quant="q8_0", target="android",
                         out=str(root / "android"), check=False, native=False))
    return {"cpu": root / "cpu", "android": root / "android"}


def _old_path(session):
    """llama-cpp-python's `Llama` over the session's model file, configured as the runtime configured it before
    (logits_all, the bundle's KV type and attention kernel, one thread)."""
    import llama_cpp

    p = session.backend.context_params
    return llama_cpp.Llama(model_path=str(session.bundle / session.artifact["path"]), n_ctx=session.n_ctx,
                           n_batch=p.n_batch, n_ubatch=p.n_ubatch, n_threads=1, n_threads_batch=1, logits_all=True,
                           type_k=p.type_k, type_v=p.type_v, flash_attn=p.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                           seed=0, verbose=False)


@pytest.mark.parametrize("which", ["cpu", "android"])
def test_greedy_tokens_logits_and_text_equal_the_old_logits_all_path(bundles, which):
    with runtime.load(bundles[which], backend="gguf", threads=1) as s:
        llm = _old_path(s)
        try:
            n_tokens = 0
            for prompt in PROMPTS:
                ids = s.tokenize(prompt, add_special=True, parse_special=False)
                assert ids == llm.tokenize(prompt.encode(), add_bos=True, special=False)
                new = s.generate_ids(ids, 40)
                llm.reset()
                llm.eval(ids)
                old = []
                while len(old) < 40:
                    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                    if tok in s.stop_ids:
                        break
                    old.append(tok)
                    llm.eval([tok])
                assert new == old
                n_tokens += len(new)
                # every position's logits (evaluation's path, one call): exactly the old path's
                llm.reset()
                llm.eval(ids + new)
                assert np.array_equal(s.logits(ids + new), llm.scores[:len(ids) + len(new)])
                assert s.detokenize(ids + new) == llm.detokenize(ids + new).decode("utf-8", errors="replace")
            assert n_tokens > 60
        finally:
            llm.close()


def test_logits_are_copied_only_when_asked(bundles):
    """llama.cpp's sampler reads the logits inside llama.cpp: the loop asks the backend for none. edgeq's numpy
    sampler (onnx) needs them: the loop asks for them at every step. A backend asked for logits gives the last
    position's, exactly those evaluation gets."""
    asked: dict[str, list] = {}
    for backend in ("gguf", "onnx"):
        with runtime.load(bundles["cpu"], backend=backend, threads=1) as s:
            feed = s.backend.feed
            calls = asked.setdefault(backend, [])

            def recording(ids, logits=True, _feed=feed, _calls=calls):
                out = _feed(ids, logits=logits)
                _calls.append((len(ids), logits, out is None))
                return out

            s.backend.feed = recording
            ids = s.tokenize("the rain", add_special=True, parse_special=False)
            greedy = s.generate_ids(ids, 12)
            sampled = s.generate_ids(ids, 12, temperature=0.8, seed=3, top_k=20)
            assert len(greedy) == len(sampled) == 12
            del s.backend.feed
            s.backend.reset()
            last = s.backend.feed(ids)
            # llama.cpp runs the last layer's MLP on the rows whose logits are wanted: one row here, all in
            # `logits`, so the two differ by float rounding only
            np.testing.assert_allclose(last, s.logits(ids)[-1], rtol=1e-5, atol=1e-5)
            s.backend.reset()
            s.backend.feed(ids, logits=False)
            step = s.backend.feed([greedy[0]])
            s.backend.feed([greedy[1]])              # a later step leaves the array given out alone
            np.testing.assert_allclose(step, s.logits(ids + greedy[:1])[-1], rtol=1e-5, atol=1e-5)
            s.backend.reset()
            s.backend.feed(ids, logits=False)
            assert s.backend.feed([greedy[0]], logits=False) is None
    assert len(asked["gguf"]) == len(asked["onnx"]) == 2 * 12
    assert all(not want and none for _, want, none in asked["gguf"])
    assert all(want and not none for _, want, none in asked["onnx"])
    assert asked["gguf"][0][0] == len(ids) and asked["gguf"][1][0] == 1      # the prompt once, then one token


def test_threads_default_to_the_profile_at_most_the_physical_cores(bundles, tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEQ_THREADS", raising=False)
    assert json.loads((bundles["android"] / "manifest.json").read_text())["target"]["threads"] == 4
    auto = tmp_path / "auto"
    shutil.copytree(bundles["android"], auto)
    m = json.loads((auto / "manifest.json").read_text())
    m["target"]["threads"] = "auto"
    (auto / "manifest.json").write_text(json.dumps(m))

    def threads_of(bundle, **kw) -> tuple[int, int]:
        with runtime.load(bundle, **kw) as s:
            return s.threads, s.backend.threads          # what edgeq chose, what llama.cpp was given

    monkeypatch.setattr(runtime_threads, "physical_cores", lambda: 8)
    assert threads_of(bundles["android"]) == (4, 4)
    assert threads_of(auto) == (8, 8)
    assert threads_of(bundles["android"], threads=1) == (1, 1)
    monkeypatch.setenv("EDGEQ_THREADS", "3")
    assert threads_of(bundles["android"]) == (3, 3)
    monkeypatch.delenv("EDGEQ_THREADS")
    monkeypatch.setattr(runtime_threads, "physical_cores", lambda: 2)      # a phone's bundle on a 2-core laptop
    assert threads_of(bundles["android"]) == (2, 2)
    with runtime.load(bundles["cpu"], backend="onnx") as s:               # every backend takes the default
        assert s.threads == 2 and s.backend.session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(runtime.BundleError, match="threads 0 is not a positive integer"):
        runtime.load(bundles["android"], threads=0)
    m["target"]["threads"] = "many"
    (auto / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(runtime.BundleError, match="target.threads 'many'"):
        runtime.load(auto)


def test_physical_cores_counts_this_machine():
    n = runtime_threads.physical_cores()
    assert 1 <= n <= len(__import__("os").sched_getaffinity(0))


def test_run_help_says_what_the_thread_default_is():
    out = subprocess.run([sys.executable, "-m", "edgeq.cli", "run", "--help"], capture_output=True, text=True,
                         check=True).stdout
    text = " ".join(out.split())
    assert "default: the bundle's device profile's" in text and "physical cores" in text and "EDGEQ_THREADS" in text


def test_freed_heap_goes_back_to_the_system():
    """What a load frees in the middle of glibc's heap stays resident until `malloc_trim`: a fresh process frees
    64 MiB of 1 KiB blocks below one it keeps, and `release_freed_heap` must hand most of it back."""
    code = """
import ctypes, json
from edgeq.runtime.memory import release_freed_heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) // 1024
blocks = [libc.malloc(1024) for _ in range(65536)]
for b in blocks:
    ctypes.memset(b, 1, 1024)
keep = libc.malloc(1024)              # above the freed blocks: the heap's top cannot shrink past it
ctypes.memset(keep, 1, 1024)
for b in blocks:
    libc.free(b)
before = rss()
ok = release_freed_heap()
print(json.dumps({"ok": ok, "freed_mib": before - rss()}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    if not out["ok"]:
        pytest.skip("this C library has no malloc_trim")
    assert out["freed_mib"] >= 48, out


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    target, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        lines = f.readlines()
    for line in lines:
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
            inside = len(head) >= 6 and line.split(None, 5)[5].rstrip("\n") == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_dropped_mapped_pages_read_back_the_same_bytes(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        view = np.frombuffer(buf, dtype=np.uint8)
        assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))       # every page touched
        assert _mapped_rss_kib(path) >= 7 << 10
        assert drop_pages(mapped_ranges(path)) >= 8 << 20
        assert _mapped_rss_kib(path) < 1 << 10
        assert np.array_equal(view, data)
        del view
    assert drop_pages(mapped_ranges(tmp_path / "not-mapped.bin")) == 0


def test_a_loaded_gguf_keeps_no_pages_of_its_file_until_it_reads_them(bundles):
    """llama.cpp's load reads every tensor (and copies those it repacks); the runtime drops the file's pages after
    it, and the first decode reads back only what the kernels use."""
    with runtime.load(bundles["android"], backend="gguf", threads=1) as s:
        path = s.bundle / s.artifact["path"]
        assert _mapped_rss_kib(path) == 0
        s.generate_ids(s.tokenize("the rain", add_special=True, parse_special=False), 4)
        assert _mapped_rss_kib(path) > 0
