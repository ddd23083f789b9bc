"""The llama.cpp sources llama-cpp-python vendors, and how to cross-build them for aarch64 Linux.

The sources come from llama-cpp-python's source distribution at the host's installed version, so what runs on a
device is the same llama.cpp the host's runtime checked the bundle with. Debian's `aarch64-linux-gnu` cross
toolchain builds them; no NDK is needed (a static executable runs on Android's kernel as on any arm64 Linux).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from edgeq.core.errors import EdgeqError

DIST = "llama-cpp-python"
# host tool -> the Debian package that provides it
CROSS_TOOLS = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
               "cmake": "cmake", "ninja": "ninja-build"}


def llama_version() -> str:
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        raise EdgeqError(None, f"{DIST} is not installed on the host (./install.sh)") from None


def missing_cross_tools() -> list[str]:
    """The Debian packages to install before a cross-build, if any."""
    return sorted({pkg for tool, pkg in CROSS_TOOLS.items() if shutil.which(tool) is None})


def sdist(src: Path, what: str) -> Path:
    """llama-cpp-python's source archive at the host's version, in `src` (downloaded once with pip)."""
    version = llama_version()
    src.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (src / name).is_file():
        res = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--quiet",
                              "--no-deps", "--no-binary", ":all:", "-d", str(src), f"{DIST}=={version}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0 or not (src / name).is_file():
            tail = " | ".join(res.stdout.strip().splitlines()[-2:])
            raise EdgeqError(src, f"{what}: download of the llama.cpp sources ({DIST}=={version}) failed: {tail}")
    return src / name


def unpack(archive: Path, into: Path) -> Path:
    """The archive's vendor/llama.cpp folder, unpacked under `into`."""
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name]
        tf.extractall(into, members=members, filter="data")
    return next(into.glob("*/vendor/llama.cpp"))


@contextmanager
def unpacked_tree(cache: Path, what: str, near: Path) -> Iterator[tuple[Path, Path]]:
    """(llama.cpp's source tree, a scratch folder for its build) in a temporary folder beside `near`, removed
    afterwards; the source archive is downloaded into `cache` once."""
    archive = sdist(cache, what)
    work = Path(tempfile.mkdtemp(prefix=".llama-src-", dir=near))
    try:
        yield unpack(archive, work), work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def aarch64_cmake_flags(shared: bool, march: str | None = None, prefix_map: Path | None = None) -> list[str]:
    """CMake options for llama.cpp's library alone, cross-compiled for aarch64 Linux.

    `march` pins the instruction set (GGML_NATIVE off: the build host is not the device). `prefix_map` rewrites
    the source folder in the paths the objects embed (asserts print __FILE__), so a rebuild from another
    temporary folder gives the same bytes."""
    flags = ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
             "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
             "-DCMAKE_BUILD_TYPE=Release", f"-DBUILD_SHARED_LIBS={'ON' if shared else 'OFF'}", "-DGGML_NATIVE=OFF",
             "-DGGML_OPENMP=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
    if march:
        flags.append(f"-DGGML_CPU_ARM_ARCH={march}")
    if prefix_map is not None:
        m = f"-ffile-prefix-map={prefix_map}=llama.cpp"
        flags += [f"-DCMAKE_C_FLAGS={m}", f"-DCMAKE_CXX_FLAGS={m}"]
    return flags
