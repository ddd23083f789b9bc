"""Give the memory a model load freed back to the operating system.

Loading a model allocates and frees far more than it keeps: onnxruntime parses the file, copies the initializers
and prepacks MatMulNBits weights, then drops the copies; llama.cpp and TVM stage their buffers too. glibc keeps
freed heap memory mapped for reuse unless it lies at the top of the heap, so a process's resident memory after
load says little about what the model holds: an ONNX int4 SmolLM2 measured 249 MiB at full width and 221-243
MiB at 35 % pruning in fresh processes (the pruned bytes could vanish in the noise); after `malloc_trim(0)` 216
and 193 MiB every time. A no-op where the C library has no `malloc_trim` (musl, bionic, macOS).

A mapped model file is the other half: llama.cpp maps the GGUF and copies the tensors whose kernels want another
layout (x86: Q4_0, Q4_K, IQ4_NL) into repacked buffers, but the pages it read them from stay resident, so a q4_0
SmolLM2-135M held 168 MiB where its weights are 88 MB. `drop_mapped_pages` drops a file's mapped pages after the
load; what the model still reads comes back on its first use as a minor fault from the page cache (the same bytes:
the mapping is read-only), what it never reads again (the repacked originals) stays out: 116 MiB.
"""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim among the symbols the process already has (no library search, which runs ldconfig)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> bool:
    """Return the heap's free pages to the OS (glibc `malloc_trim(0)`); whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_MADV_DONTNEED = 4      # Linux (and Android): a private or shared mapping's pages dropped, re-read on the next touch


@functools.cache
def _madvise():
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    f.restype = ctypes.c_int
    return f


def drop_mapped_pages(path: str | os.PathLike) -> int:
    """Drop this process's resident pages of `path`'s read-only mappings (`madvise(MADV_DONTNEED)`); the bytes of
    the mappings advised. Only mappings that were never writable are touched: their pages are the file's own, so
    a later read sees the same bytes. 0 where there is no /proc/self/maps or no madvise."""
    madvise = _madvise()
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return 0
    done = 0
    for line in lines:
        parts = line.split(None, 5)
        if madvise is None or len(parts) < 6 or parts[5].rstrip("\n") != target or parts[1][:2] != "r-":
            continue
        start, end = (int(v, 16) for v in parts[0].split("-"))
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            done += end - start
    return done
