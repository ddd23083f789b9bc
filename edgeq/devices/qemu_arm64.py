"""`qemu-arm64`: an emulated arm64 Linux device, built once into a cache and run under qemu-user.

The device is a Debian arm64 userland (debootstrap's packages, unpacked, never
configured: nothing of the guest runs during set-up), aarch64 wheels installed
from the host (`pip --platform`), and llama.cpp cross-compiled on the host for
llama-cpp-python to load through LLAMA_CPP_LIB_PATH. Programs run as
`qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3`: qemu maps the guest's
system paths (/usr/lib, /proc/cpuinfo, ...) into the root folder, so neither
root nor binfmt_misc is needed to run it (set-up needs root for debootstrap);
bundles and work folders live in ROOTFS/tmp under their host paths.

Each step is finished atomically (built in a temporary folder, then renamed),
so an interrupted set-up resumes where it stopped and never leaves a cache that
looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgeq.core.errors import EdgeqError
from edgeq.core.fs import atomic_write_text
from edgeq.devices.base import DeviceError
from edgeq.devices.local import FolderDevice
from edgeq.native import llama_source

SUITE = "bookworm"                 # Python 3.11, as the cp311 wheels below
# pip takes --platform literally: name the older manylinux tags too (tokenizers ships manylinux_2_17 only)
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
GUEST_PACKAGES = ["python3", "libstdc++6"]
# Runtime dependencies at the host's versions, so a bundle's recorded runtime versions match on the device.
PINNED = ["numpy", "onnxruntime", "tokenizers"]
UNPINNED = ["jinja2", "diskcache", "typing-extensions"]     # llama-cpp-python's pure-Python dependencies
TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
         "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
         "cmake": "cmake", "ninja": "ninja-build", "dpkg-deb": "dpkg"}
CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""
DISTS = ("numpy", "onnxruntime", "tokenizers", "llama-cpp-python")
LLAMA_LIBS = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so")


def cache_dir() -> Path:
    base = os.environ.get("EDGEQ_DEVICE_CACHE") or Path.home() / ".cache" / "edgeq" / "devices"
    return Path(base) / "qemu-arm64"


def ready_file(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "ready.json"


def _host_has(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _wants_tvm() -> bool:
    """The guest gets the TVM runtime when the host has it (the TVM backend), so TVM bundles run there too."""
    return _host_has("apache-tvm")


def is_ready(cache: Path | None = None) -> bool:
    cache = cache or cache_dir()
    if not ready_file(cache).is_file():
        return False
    if not _wants_tvm():
        return True
    # a device set up before the host had TVM lacks it: the set-up adds it (and checks the guest again)
    versions = json.loads(ready_file(cache).read_text(encoding="utf-8")).get("versions", {})
    return "apache-tvm" in versions and (cache / "site-tvm").is_dir()


def missing_tools() -> list[str]:
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def guest_command(cache: Path | None = None) -> list[str]:
    """The argv prefix that starts the guest's Python."""
    cache = cache or cache_dir()
    return ["qemu-aarch64-static", "-L", str(cache / "rootfs"), str(cache / "rootfs/usr/bin/python3")]


def guest_env(cache: Path | None = None) -> dict[str, str]:
    cache = cache or cache_dir()
    site = cache / "site"
    lib = str(site / "llama_cpp" / "lib")
    path = ":".join(str(p) for p in (site, cache / "site-tvm") if p.is_dir())
    # the guest's loader (not the static qemu) reads LD_LIBRARY_PATH: libllama finds libggml*.so.0 there
    return {"PYTHONPATH": path, "LLAMA_CPP_LIB_PATH": lib, "LD_LIBRARY_PATH": lib, "PYTHONDONTWRITEBYTECODE": "1"}


def _run(cmd: list[str], what: str, **kw) -> None:
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if res.returncode != 0:
        tail = " | ".join(res.stdout.strip().splitlines()[-3:])
        raise EdgeqError(None, f"qemu-arm64 set-up: {what} failed (exit {res.returncode}): {tail}")


def _step(cache: Path, name: str, build: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    """Build `cache/name` once: into a temporary sibling, renamed when complete."""
    final = cache / name
    if final.exists():
        return final
    t0 = time.perf_counter()
    log(f"qemu-arm64: building {name} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=cache))
    try:
        build(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"qemu-arm64: {name} done in {time.perf_counter() - t0:.0f} s")
    return final


def _rootfs(tmp: Path) -> None:
    mirror = os.environ.get("EDGEQ_DEBIAN_MIRROR")     # default: debootstrap's own
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
          f"--include={','.join(GUEST_PACKAGES)}", SUITE, str(tmp), *([mirror] if mirror else [])],
         "debootstrap (arm64 packages)")
    # --foreign unpacks only the essential packages; unpack the rest the same way (no maintainer scripts run)
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
        deb.unlink()
    if not (tmp / "usr/bin/python3").exists():
        raise EdgeqError(tmp, "qemu-arm64 set-up: the arm64 userland has no python3")
    (tmp / "tmp").mkdir(exist_ok=True)
    (tmp / "tmp").chmod(0o1777)
    # qemu-user 7.2 passes the host's /proc/cpuinfo through; onnxruntime's CPU detection crashes on an x86
    # one. qemu opens ROOTFS/proc/cpuinfo instead when it exists: describe the CPU qemu emulates (arm64 with
    # NEON and dot product, a Neoverse-N1-like part).
    (tmp / "proc").mkdir(exist_ok=True)
    (tmp / "proc" / "cpuinfo").write_text(CPUINFO, encoding="utf-8")


def _host_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise EdgeqError(None, f"qemu-arm64 set-up: {dist} is not installed on the host (./install.sh)") from None


def _site(tmp: Path) -> None:
    reqs = [f"{d}=={_host_version(d)}" for d in PINNED] + UNPINNED
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--target", str(tmp),
          *[a for p in PLATFORMS for a in ("--platform", p)], "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
          *reqs], "pip install of the aarch64 wheels")
    # llama-cpp-python has no aarch64 wheel: its Python half from the host, its libraries cross-built below
    dist = metadata.distribution("llama-cpp-python")
    root = Path(dist.locate_file(""))
    for f in dist.files or []:
        parts = Path(f).parts
        if parts[0] != "llama_cpp" and not parts[0].endswith(".dist-info"):
            continue
        if "lib" in parts[1:2] or "__pycache__" in parts or "server" in parts[1:2]:
            continue
        dst = tmp / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dst)
    (tmp / "llama_cpp" / "lib").mkdir(exist_ok=True)


def _site_tvm(tmp: Path) -> None:
    # edgeq's TVM backend reads the weights with safetensors
    reqs = [f"{d}=={_host_version(d)}" for d in ("apache-tvm", "apache-tvm-ffi", "safetensors")] + ["ml_dtypes"]
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--no-deps", "--target",
          str(tmp), *[a for p in PLATFORMS for a in ("--platform", p)], "--python-version", "3.11",
          "--implementation", "cp", "--only-binary=:all:", *reqs], "pip install of the aarch64 TVM wheels")


def _llama_libs(cache: Path, jobs: int) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        archive = llama_source.sdist(cache / "src", "qemu-arm64 set-up")
        work = Path(tempfile.mkdtemp(prefix=".llama-build-", dir=cache))
        try:
            srcdir = llama_source.unpack(archive, work)
            build_dir = work / "build"
            _run(["cmake", "-G", "Ninja", "-S", str(srcdir), "-B", str(build_dir),
                  *llama_source.aarch64_cmake_flags(shared=True)], "cmake (aarch64)")
            _run(["cmake", "--build", str(build_dir), "--target", "llama", "-j", str(jobs)], "llama.cpp cross-build")
            for name in LLAMA_LIBS:
                hits = sorted(build_dir.rglob(name))
                if not hits:
                    raise EdgeqError(build_dir, f"qemu-arm64 set-up: the cross-build made no {name}")
                shutil.copy2(hits[0].resolve(), tmp / name)       # the real file under the plain name
            # the libraries find each other by soname (libggml.so.0, ...)
            for so in tmp.glob("*.so"):
                soname = _soname(so)
                if soname and soname != so.name:
                    (tmp / soname).symlink_to(so.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return build


def _soname(lib: Path) -> str | None:
    out = subprocess.run(["aarch64-linux-gnu-readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "(SONAME)" in line:
            return line.split("[", 1)[1].split("]", 1)[0]
    return None


def setup(force: bool = False, jobs: int | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Build the emulated device once; afterwards only check that it is there (seconds)."""
    cache = cache_dir()
    if force and cache.exists():
        shutil.rmtree(cache)
    if is_ready(cache):
        return json.loads(ready_file(cache).read_text(encoding="utf-8"))
    missing = missing_tools()
    if missing:
        raise EdgeqError(None, f"qemu-arm64 set-up needs: apt-get install {' '.join(missing)}")
    t0 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    jobs = jobs or max(1, os.cpu_count() or 1)
    _step(cache, "rootfs", _rootfs, log)
    site = _step(cache, "site", _site, log)
    libs = _step(cache, "llama-libs", _llama_libs(cache, jobs), log)
    if _wants_tvm():
        _step(cache, "site-tvm", _site_tvm, log)
    lib_dir = site / "llama_cpp" / "lib"
    for f in libs.iterdir():
        if not (lib_dir / f.name).exists():
            (lib_dir / f.name).symlink_to(os.path.relpath(f, lib_dir))
    # smoke test: the guest imports every runtime library and says what it is
    probe = ("import json, platform, numpy, onnxruntime, tokenizers, llama_cpp, importlib.metadata as m;"
             "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
             "'versions': {d: m.version(d) for d in %r}}))" % ((DISTS + (("apache-tvm",) if _wants_tvm() else ())),))
    env = {**os.environ, **guest_env(cache)}
    res = subprocess.run([*guest_command(cache), "-c", probe], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise EdgeqError(cache, f"qemu-arm64 set-up: the guest cannot import the runtime: "
                                f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
    info = {**json.loads(res.stdout.strip().splitlines()[-1]), "setup_seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(ready_file(cache), json.dumps(info, indent=1) + "\n")
    log(f"qemu-arm64: ready in {info['setup_seconds']:.0f} s ({cache})")
    return info



class QemuArm64Device(FolderDevice):
    """The emulated device: its file system is the root folder, its Python runs under qemu-user."""

    def __init__(self, spec: str = "qemu-arm64"):
        cache = cache_dir()
        # host paths: qemu's -L maps a guest path into the root folder only if it existed when first looked
        # up, so files the guest creates under a mapped path land on the host; unmapped paths are shared as is
        super().__init__(spec, guest_command(cache), Path("/"), root=str(cache / "rootfs/tmp/edgeq-hil"),
                         emulated=True, env=guest_env(cache))

    def probe_device(self):
        if shutil.which("qemu-aarch64-static") is None:
            raise DeviceError(None, "qemu-arm64 is unreachable: qemu-aarch64-static is not installed "
                                    "(apt-get install qemu-user-static)")
        if not is_ready():
            raise DeviceError(None, f"qemu-arm64 is not set up in {cache_dir()}: run `edgeq device setup qemu-arm64`")
        return super().probe_device()
