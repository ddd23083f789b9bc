"""`edgeq eval` for CNN bundles: the runtime's argmax against the float reference's, and accuracy when labelled.

Images come from `--images FILE.npz` (array `images`, NCHW float32; `labels`
optional). The reference is edgeq's float executor on the source network:
`--reference MODEL.pt2`, accepted when its imported graph has the digest the
manifest recorded (evaluate/source.py), so a decomposed re-save of
the same module is accepted too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.evaluate.source import reference_graph
from edgeq.importers.images import read_images


def evaluate_cnn(session, images_file: str | None, reference: str | None = None,
                 reference_logits: Callable[[np.ndarray], np.ndarray] | None = None, batch: int = 256,
                 progress: Callable | None = None) -> dict:
    if images_file is None:
        raise EdgeqError(session.bundle, "a CNN bundle is evaluated on images: pass --images FILE.npz (array 'images' "
                                         "NCHW float32, optional 'labels')")
    shape = tuple(session.manifest["model"]["config"][k] for k in ("in_channels", "height", "width"))
    x, labels = read_images(images_file, shape)
    if reference_logits is None:
        ex = Executor(reference_graph(session.manifest, reference, session.bundle))
        reference_logits = lambda x: ex.run_inputs({"images": x})["logits"]  # noqa: E731
    starts = range(0, len(x), batch)
    ref, got = [], []
    for i in (starts if progress is None else progress(starts, desc="eval", unit="batch")):
        ref.append(reference_logits(x[i:i + batch]))
        got.append(session.run({"images": x[i:i + batch]})["logits"])
    ref, got = np.concatenate(ref), np.concatenate(got)
    res = {"agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
           "logits_max_abs_diff": float(np.abs(ref - got).max()), "n_images": int(len(x)),
           "images": Path(images_file).name}
    if labels is not None:
        res["accuracy"] = float(np.mean(got.argmax(-1) == labels))
        res["accuracy_reference"] = float(np.mean(ref.argmax(-1) == labels))
    return res
