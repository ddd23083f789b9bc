"""Build `edgeq-run`, edgeq's native runner, statically for aarch64: once per version, then from a cache.

Two cached steps, each built in a temporary folder and renamed when complete (an interrupted build never leaves
a cache that looks finished):

* `llama/<llama-cpp-python version>-<march>/`: llama.cpp's static libraries cross-built from the sources
  llama-cpp-python vendors (minutes), with the headers and the two vendored pieces the runner compiles
  (nlohmann/json, llama.cpp's public-domain SHA-256) and their licences;
* `runner/<edgeq version>-<llama version>-<march>-<source hash>/edgeq-run`: the runner compiled and linked over
  them (about a minute; an edgeq upgrade rebuilds only this).

The result is a static executable (no PT_INTERP: no dynamic loader, no libc needed on the device), stripped,
whose bytes are the same for the same inputs (source paths are mapped away), so bundles stay byte-identical.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeq import __version__
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import atomic_write_text
from edgeq.native import llama_source

RUNNER_SOURCE = Path(__file__).with_name("edgeq_run.cpp")
RUNNER_NAME = "edgeq-run"
STATIC_LIBS = ("libllama.a", "libggml.a", "libggml-cpu.a", "libggml-base.a")      # link order
# what the runner compiles besides llama.h: (path in the llama.cpp tree, where it goes in the cache)
VENDORED = ("vendor/nlohmann/json.hpp", "vendor/nlohmann/json_fwd.hpp", "vendor/hash/sha256/sha256.c",
            "vendor/hash/sha256/sha256.h", "vendor/hash/sha256/LICENSE", "vendor/hash/rotate-bits/rotate-bits.h",
            "vendor/hash/rotate-bits/LICENSE.md", "LICENSE", "licenses/LICENSE-jsonhpp")

LICENCES = (("llama.cpp and ggml (MIT)", "LICENSE"),
            ("nlohmann/json, vendored by llama.cpp (MIT)", "licenses/LICENSE-jsonhpp"),
            ("SHA-256 by Igor Pavlov, vendored by llama.cpp (public domain)", "vendor/hash/sha256/LICENSE"),
            ("rotate-bits by William Casarin, vendored by llama.cpp (MIT)", "vendor/hash/rotate-bits/LICENSE.md"))
LICENCES_FILE = "LICENSES.txt"


@dataclass(frozen=True)
class NativeRunner:
    """A built runner: the executable and what it was built from."""

    path: Path
    licences: Path          # the third-party notices that ship beside the executable
    march: str
    llama_version: str
    info: dict

    def to_json(self) -> dict:
        return {"isa": "aarch64", "march": self.march, "static": True, "llama_cpp_python": self.llama_version}


def cache_root() -> Path:
    return Path(os.environ.get("EDGEQ_NATIVE_CACHE") or Path.home() / ".cache" / "edgeq" / "native")


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    if res.returncode != 0:
        tail = " | ".join(res.stdout.strip().splitlines()[-3:])
        raise EdgeqError(None, f"native runner build: {what} failed (exit {res.returncode}): {tail}")


def build_once(final: Path, build: Callable[[Path], dict], log: Callable[[str], None], what: str) -> Path:
    """Build `final` once: into a temporary sibling, renamed when complete; its build.json records the time.
    Another process building the same `final` is waited for. (Also bench/runtime.py's host llama-bench.)"""
    if (final / "build.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # another process building the same step: wait for it
        if (final / "build.json").is_file():
            return final
        return _build_step(final, build, log, what)


def _build_step(final: Path, build: Callable[[Path], dict], log: Callable[[str], None], what: str) -> Path:
    log(f"native build: {what} (once; cached in {final}) ...")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        info = build(tmp)
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(tmp / "build.json", json.dumps(info, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)          # a leftover without build.json
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"native build: {what} built in {info['build_seconds']:.0f} s")
    return final


def _llama_static(march: str, jobs: int) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        with llama_source.unpacked_tree(cache_root() / "src", "native runner build", tmp.parent) as (src, work):
            bdir = work / "build"
            _run(["cmake", "-G", "Ninja", "-S", str(src), "-B", str(bdir),
                  *llama_source.aarch64_cmake_flags(shared=False, march=march, prefix_map=src)], "cmake (aarch64)")
            _run(["cmake", "--build", str(bdir), "--target", "llama", "-j", str(jobs)], "llama.cpp cross-build")
            (tmp / "lib").mkdir()
            for name in STATIC_LIBS:
                hits = sorted(bdir.rglob(name))
                if not hits:
                    raise EdgeqError(bdir, f"native runner build: the cross-build made no {name}")
                shutil.copy2(hits[0], tmp / "lib" / name)
            (tmp / "include").mkdir()
            for h in [*sorted((src / "include").glob("*.h")), *sorted((src / "ggml" / "include").glob("*.h"))]:
                shutil.copy2(h, tmp / "include" / h.name)
            for rel in VENDORED:
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, dst)
        return {"llama_cpp_python": llama_source.llama_version(), "march": march, "libs": list(STATIC_LIBS)}
    return build


def _runner(llama: Path, march: str) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        work = Path(tempfile.mkdtemp(prefix=".runner-", dir=tmp.parent))
        try:
            common = ["-O2", f"-march={march}", f"-ffile-prefix-map={llama}=llama", f"-ffile-prefix-map={work}=.",
                      "-ffunction-sections", "-fdata-sections"]
            # the vendored SHA-256 is C; compiled as llama.cpp compiles it
            _run(["aarch64-linux-gnu-gcc", *common, "-w", "-I", str(llama / "vendor/hash"), "-c",
                  str(llama / "vendor/hash/sha256/sha256.c"), "-o", str(work / "sha256.o")], "compiling sha256.c")
            src = work / "edgeq_run.cpp"
            shutil.copy2(RUNNER_SOURCE, src)
            _run(["aarch64-linux-gnu-g++", *common, "-std=c++17", "-Wall", "-Wextra",
                  f'-DEDGEQ_VERSION="{__version__}"', f'-DEDGEQ_LLAMA_CPP_VERSION="{llama_source.llama_version()}"',
                  "-I", str(llama / "include"), "-I", str(llama / "vendor"), "-I", str(llama / "vendor/hash"),
                  "-c", "edgeq_run.cpp", "-o", "edgeq_run.o"], "compiling edgeq_run.cpp", cwd=work)
            out = tmp / RUNNER_NAME
            _run(["aarch64-linux-gnu-g++", "-static", "-s", "-Wl,--gc-sections", "-Wl,--build-id=none",
                  str(work / "edgeq_run.o"), str(work / "sha256.o"), *[str(llama / "lib" / n) for n in STATIC_LIBS],
                  "-lpthread", "-o", str(out)], "linking edgeq-run (static)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        check_static_aarch64(out)
        # the notices the MIT licences ask to travel with the binary (SHA-256: public domain)
        notices = [f"{what}\n\n{(llama / lic).read_text(encoding='utf-8').strip()}\n" for what, lic in LICENCES]
        (tmp / LICENCES_FILE).write_text(("\n" + "-" * 78 + "\n\n").join(notices), encoding="utf-8")
        return {"edgeq": __version__, "llama_cpp_python": llama_source.llama_version(), "march": march,
                "bytes": out.stat().st_size, "sha256": _sha256(out)}
    return build


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_static_aarch64(path: Path) -> None:
    """An aarch64 ELF executable with no program interpreter (statically linked), else an error naming it."""
    head = path.read_bytes()[:64]
    if head[:4] != b"\x7fELF" or head[4] != 2 or int.from_bytes(head[18:20], "little") != 183:   # EM_AARCH64
        raise EdgeqError(path, "not a 64-bit aarch64 ELF file")
    if interpreter(path) is not None:
        raise EdgeqError(path, "dynamically linked (has a PT_INTERP program header); a bundle needs a static one")


def interpreter(path: Path) -> str | None:
    """The ELF file's PT_INTERP (its dynamic loader), or None for a static executable; read from the program
    headers (64-bit little-endian ELF)."""
    data = path.read_bytes()
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    if phoff + phnum * phentsize > len(data):
        raise EdgeqError(path, "truncated ELF program headers")
    for i in range(phnum):
        ph = data[phoff + i * phentsize: phoff + (i + 1) * phentsize]
        if int.from_bytes(ph[0:4], "little") == 3:          # PT_INTERP
            off, size = int.from_bytes(ph[8:16], "little"), int.from_bytes(ph[32:40], "little")
            return data[off: off + size].rstrip(b"\0").decode("ascii", "replace")
    return None


def build_runner(march: str, jobs: int | None = None, log: Callable[[str], None] = lambda s: None) -> NativeRunner:
    """The runner for `march` (e.g. armv8.2-a+dotprod), built on first use, then from the cache (milliseconds)."""
    version = llama_source.llama_version()
    # the keys name what each step is built from: a change of source, recipe or flags builds anew
    flags = json.dumps(llama_source.aarch64_cmake_flags(shared=False, march=march)).encode()
    llama_key = f"{version}-{march}-{hashlib.sha256(flags).hexdigest()[:8]}"
    recipe = hashlib.sha256(RUNNER_SOURCE.read_bytes() + Path(__file__).read_bytes() + flags).hexdigest()[:12]
    root = cache_root()
    final = root / "runner" / f"{__version__}-llama{version}-{march}-{recipe}"
    if not (final / "build.json").is_file():
        missing = llama_source.missing_cross_tools()
        if missing:
            raise EdgeqError(None, f"the native runner needs a cross toolchain: apt-get install {' '.join(missing)} "
                                   "(or export with --no-native)")
        jobs = jobs or max(1, os.cpu_count() or 1)
        llama = build_once(root / "llama" / llama_key, _llama_static(march, jobs), log,
                      f"llama.cpp {version} for aarch64 ({march}, static)")
        build_once(final, _runner(llama, march), log, "edgeq-run")
    info = json.loads((final / "build.json").read_text(encoding="utf-8"))
    return NativeRunner(final / RUNNER_NAME, final / LICENCES_FILE, march, version, info)
