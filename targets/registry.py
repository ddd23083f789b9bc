"""The backends edgeq lowers to: one line per target. A new backend is its folder plus a line here."""

from __future__ import annotations

from edgeq.core.errors import EdgeqError
from edgeq.targets.base import Target
from edgeq.targets.gguf.target import GgufTarget
from edgeq.targets.onnx.target import OnnxTarget
from edgeq.targets.tvm.target import TvmTarget

TARGETS: dict[str, Target] = {t.name: t for t in (GgufTarget(), OnnxTarget(), TvmTarget())}


def get_target(name: str) -> Target:
    t = TARGETS.get(name)
    if t is None:
        raise EdgeqError(None, f"--backend {name} is not available yet (available: {', '.join(TARGETS)}, all)")
    return t
