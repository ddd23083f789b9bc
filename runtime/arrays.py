"""Named arrays in a safetensors file (TVM parameters, TVM LoRA adapters): no pickle, one line when unreadable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.runtime.manifest import BundleError


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file; the safetensors reader bounds every length against the file's size."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(path, f"not a readable safetensors file ({exc})") from None
