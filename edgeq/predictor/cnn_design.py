"""The CNNs a CNN latency profile times and validates on: subnets of the digits once-for-all supernet.

The per-layer table (cnn_table.py) is a supernet's, so its micro-models are that supernet's subnets, as the
search's own table measures them (compile/search_cnn.measure_table): every uniformly slimmed width in all-int8 and
all-float, plus random points (channel widths, the elastic depth and kernel sizes, each layer int8 or float).
Held-out plans (`edgeq profile --validate K`) are more random points from another seed. A subnet's graph is the
untrained supernet's slice (speed does not depend on the values) imported through torch.export, and its plan the
search's: the ONNX int8 preset with the float layers set to f32 and calibrated activation ranges where an int8
layer reads or writes them (compile/search_cnn.SubnetModels.plan). Each is exported through the compile pipeline
like any plan, so what is timed is what `edgeq export` writes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from edgeq.core.ir import Graph
from edgeq.core.plan import Plan

SUPERNET = "digits"
PROFILE_SEED = 300            # the micro-models' random points
HELD_OUT_SEED = 20_000        # the held-out plans' (validate.py's SEED)
RANDOM_POINTS = 32
QUICK_UNIFORM = 3             # --quick: the narrowest, a middle and the full uniform widths
QUICK_RANDOM = 8


@functools.lru_cache(maxsize=1)
def subnets():
    """The untrained digits supernet's subnet builder (graphs and plans memoised by widths)."""
    from edgeq.compile.search_cnn import SubnetModels
    from edgeq.models.recipes.digits_supernet import untrained_digits_supernet

    models = SubnetModels(untrained_digits_supernet(0))
    models.close()                  # its work folder holds lowered models; graphs and plans are kept in memory
    return models


@dataclass(frozen=True)
class CnnMicroModel:
    """One subnet to export and time: its stage values (widths, depth, kernels) and a format per supernet layer."""

    name: str
    widths: tuple[int, ...]
    layer_formats: tuple[str, ...]
    seed: int
    n_ctx: None = None
    kind: str = "cnn"

    def identity(self) -> list:
        return [self.name, self.seed, SUPERNET, list(self.widths), list(self.layer_formats)]

    @property
    def formats(self) -> dict[str, str]:
        """The plan's format of every weight (a skipped layer's has none)."""
        return {n: t.format for n, t in self.plan().tensors.items()}

    def plan(self) -> Plan:
        return subnets().plan(self.widths, self.layer_formats)

    def graph(self, work: Path | None = None) -> Graph:
        return subnets().graph(self.widths)


def random_points(n: int, seed: int) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    from edgeq.compile.search_cnn import table_points

    return table_points(subnets().sn, n, seed)


def cnn_micro_models(quick: bool = False) -> list[CnnMicroModel]:
    """Every uniform width in int8 and in float, and random mixed points (fewer with `quick`)."""
    from edgeq.passes.search_cnn import uniform_widths

    sn = subnets().sn
    uniform = uniform_widths(sn.menus, sn.full, sn.channel_stages)
    if quick:
        uniform = [uniform[0], uniform[len(uniform) // 2], uniform[-1]][:QUICK_UNIFORM]
    points = [(w, (f,) * len(sn.layers)) for w in uniform for f in ("int8", "f32")]
    points += random_points(QUICK_RANDOM if quick else RANDOM_POINTS, PROFILE_SEED)
    return [CnnMicroModel(f"cnn-{i:02d}-" + "x".join(map(str, w)) + "-" + "".join("q" if f == "int8" else "f"
                                                                               for f in fm), tuple(w), tuple(fm),
                          PROFILE_SEED)
            for i, (w, fm) in enumerate(points)]


def supernet_record() -> dict:
    from edgeq.predictor.cnn_table import supernet_record as record

    return record(subnets().sn)
