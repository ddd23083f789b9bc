"""Image sets for CNNs: an .npz with `images` (n, C, H, W) float32 NCHW and, optionally, `labels` (n,) integers.

Read with allow_pickle=False (an .npz of object arrays is refused, never
unpickled) and bounded: the archive members' sizes are checked before numpy
decompresses anything.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from edgeq.core.errors import EdgeqError

MAX_IMAGES_BYTES = 4 << 30


def read_images(path: str | os.PathLike, image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """(images float32 (n, *image_shape), labels int64 (n,) or None); every problem is one line naming the file."""
    path = Path(path)
    want = f"(n, {', '.join(str(d) for d in image_shape)}) float32"
    if not path.is_file():
        raise EdgeqError(path, "no such image file (an .npz with an array 'images' of shape " + want + ")")
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = {i.filename: i.file_size for i in zf.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise EdgeqError(path, f"not an .npz file ({exc})") from None
    if "images.npy" not in sizes:
        raise EdgeqError(path, f"has no array 'images' (expected {want}; arrays found: "
                               f"{', '.join(sorted(n.removesuffix('.npy') for n in sizes)) or 'none'})")
    if sum(sizes.values()) > MAX_IMAGES_BYTES:
        raise EdgeqError(path, f"unpacks to more than {MAX_IMAGES_BYTES} bytes")
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
            labels = z["labels"] if "labels.npy" in sizes else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error, KeyError) as exc:
        raise EdgeqError(path, f"cannot read its arrays ({type(exc).__name__}: {exc})") from None
    if images.ndim != 1 + len(image_shape) or tuple(images.shape[1:]) != tuple(image_shape) or len(images) == 0:
        raise EdgeqError(path, f"'images' has shape {images.shape} and dtype {images.dtype}; expected {want}")
    if not np.issubdtype(images.dtype, np.floating):
        raise EdgeqError(path, f"'images' has dtype {images.dtype}; expected {want}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(images).all():
        raise EdgeqError(path, "'images' holds NaN or infinite values")
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise EdgeqError(path, f"'labels' has shape {labels.shape} and dtype {labels.dtype}; expected ({len(images)},) "
                                   "integers")
        labels = labels.astype(np.int64)
    return images, labels


CALIB_MAX_IMAGES = 512          # the whitepaper calibrates on 100-500 samples


def calibration_images(graph, calib_images) -> tuple[list[np.ndarray] | None, str | None]:
    """Calibration images for a CNN: an .npz path (array `images`, NCHW float32) or an array; the first 512 are
    used. (None, None) without any."""
    if calib_images is None:
        return None, None
    if isinstance(calib_images, (str, os.PathLike)):
        images, _ = read_images(calib_images, graph.config.image_shape)
        name = Path(calib_images).name
    else:
        images = np.asarray(calib_images)
        if images.ndim != 4 or tuple(images.shape[1:]) != graph.config.image_shape or not len(images):
            raise EdgeqError("calib_images", f"array has shape {images.shape}; expected (n, "
                                             f"{', '.join(map(str, graph.config.image_shape))}) float32")
        images = images.astype(np.float32)
        name = "calibration array"
    images = images[:CALIB_MAX_IMAGES]
    return [images], f"{name} ({len(images)} images)"
