"""Give the memory a model load freed back to the operating system.

Loading a model allocates and frees far more than it keeps: onnxruntime parses the file, copies the initializers
and prepacks MatMulNBits weights, then drops the copies; llama.cpp and TVM stage their buffers too. glibc keeps
freed heap memory mapped for reuse unless it lies at the top of the heap, so a process's resident memory after
load says little about what the model holds: an ONNX int4 SmolLM2 measured 249 MiB at full width and 221-243
MiB at 35 % pruning in fresh processes (the pruned bytes could vanish in the noise); after `malloc_trim(0)` 216
and 193 MiB every time. A no-op where the C library has no `malloc_trim` (musl, bionic, macOS).

A mapped model file is the other half: llama.cpp maps the GGUF and copies the tensors whose kernels want another
layout (x86: Q4_0, Q4_K, IQ4_NL) into repacked buffers, but the pages it read them from stay resident, so a q4_0
SmolLM2-135M peaked at 161 MiB and held 168 where its weights are 88 MB. The GGUF backend drops the file's mapped
pages (`drop_pages`) between tensors as llama.cpp loads them and once after: what the model still reads comes back
on its first use as a minor fault from the page cache (the same bytes: the mapping is read-only), what it never
reads again (the repacked originals) stays out: peak 106 MiB.
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


def mapped_ranges(path: str | os.PathLike) -> list[tuple[int, int]]:
    """This process's mappings of `path` that were never writable, as (start, end) addresses: their pages are
    the file's own, so dropping them loses nothing. [] where there is no /proc/self/maps."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].rstrip("\n") == target and parts[1][:2] == "r-":
            start, end = (int(v, 16) for v in parts[0].split("-"))
            out.append((start, end))
    return out


def drop_pages(ranges: list[tuple[int, int]]) -> int:
    """Drop the resident pages of these read-only file mappings (`madvise(MADV_DONTNEED)`): a later read faults
    the same bytes back from the page cache. The bytes advised; 0 without madvise."""
    madvise = _madvise()
    if madvise is None:
        return 0
    return sum(end - start for start, end in ranges if madvise(start, end - start, _MADV_DONTNEED) == 0)

