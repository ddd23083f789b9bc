"""Give the memory a model load freed back to the operating system.

Loading a model allocates and frees far more than it keeps: onnxruntime parses the file, copies the initializers
and prepacks MatMulNBits weights, then drops the copies; llama.cpp and TVM stage their buffers too. glibc keeps
freed heap memory mapped for reuse unless it lies at the top of the heap, so a process's resident memory after
load says little about what the model holds: an ONNX int4 SmolLM2 measured 249 MiB at full width and 221-243
MiB at 35 % pruning in fresh processes (the pruned bytes could vanish in the noise); after `malloc_trim(0)` 216
and 193 MiB every time. A no-op where the C library has no `malloc_trim` (musl, bionic, macOS).
"""

from __future__ import annotations

import ctypes
import functools


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
