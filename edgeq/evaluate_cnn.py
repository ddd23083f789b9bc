"""`edgeq eval` for CNN bundles: the runtime's argmax against the float reference's, and accuracy when labelled.

Images come from `--images FILE.npz` (array `images`, NCHW float32; `labels`
optional). The reference is edgeq's float executor on the source network:
`--reference MODEL.pt2`, accepted when its imported graph has the digest the
manifest recorded (so a decomposed re-save of the same module is accepted too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.errors import EdgeqError


def resolve_cnn_reference(manifest: dict, reference: str | None, bundle: Path) -> Callable[[np.ndarray], np.ndarray]:
    from edgeq.executor import Executor
    from edgeq.export_onnx import graph_digest
    from edgeq.importers.loader import import_model

    if not reference:
        raise EdgeqError(bundle, f"the float reference of a CNN is its source network: pass --reference "
                                 f"{manifest['source']['name']} (a torch.export.save'd .pt2)")
    path = Path(reference)
    if not path.is_file():
        raise EdgeqError(path, "no such reference model")
    graph = import_model(path)
    if graph.kind != "cnn" or graph_digest(graph) != manifest["source"]["sha256"]:
        raise EdgeqError(path, "is not the network this bundle was made from (its graph digest differs from the "
                               "manifest's)")
    ex = Executor(graph)
    return lambda x: ex.run_inputs({"images": x})["logits"]


def evaluate_cnn(session, images_file: str | None, reference: str | None = None,
                 reference_logits: Callable[[np.ndarray], np.ndarray] | None = None, batch: int = 256,
                 progress: Callable | None = None) -> dict:
    from edgeq.images import read_images

    if images_file is None:
        raise EdgeqError(session.bundle, "a CNN bundle is evaluated on images: pass --images FILE.npz (array 'images' "
                                         "NCHW float32, optional 'labels')")
    shape = tuple(session.manifest["model"]["config"][k] for k in ("in_channels", "height", "width"))
    x, labels = read_images(images_file, shape)
    if reference_logits is None:
        reference_logits = resolve_cnn_reference(session.manifest, reference, session.bundle)
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
