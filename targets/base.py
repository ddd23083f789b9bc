"""The Target interface: everything edgeq knows about one backend, behind one protocol.

A target is a runtime family (`gguf`, `onnx`, `tvm`). It knows what its presets mean tensor by tensor,
which formats it carries, how many bytes a plan's files take (its `FileLayout`), how to lower a finished
plan into files and what the manifest says about them, which runtime versions it records, and whether its
artifact can run on this host (for the bundle's reference check). The compile pipeline (edgeq/compile/)
drives every target through these methods alone: nothing outside targets/ asks which backend it holds.

Adding a backend: a folder targets/<name>/ whose `target.py` subclasses `Target`, and one line in
targets/registry.py. Formats it carries are registered in edgeq/core/formats/ with its name in
`backends`; the runtime that loads its artifacts is a module of runtime/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.bundle.manifest import Artifact
from edgeq.core.adapter import SparseAdapter, UserAdapter
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format, candidate_formats, get_format
from edgeq.core.ir import Graph
from edgeq.core.layout import FileLayout
from edgeq.core.plan import Plan, PresetTensors, TensorPlan


@dataclass
class LowerRequest:
    """What a target lowers: the graph, the finished plan and what the passes computed for it."""

    graph: Graph
    plan: Plan
    folder: Path                          # the staged bundle folder to write into
    profile: Any                          # targets.profiles.DeviceProfile
    imatrix: dict | None = None           # weight -> importance (E[x^2]) for formats that take one
    branches: dict = field(default_factory=dict)   # low-rank error branches {weight: (A, B)}
    spec: Any = None                      # the decoder's runtime.tokenizer.TokenizerSpec
    n_ctx: int | None = None              # the context length the bundle records for the device
    ndk_clang: str | None = None          # android: the NDK clang that links a .so
    tune_trials: int = 0                  # meta-schedule trials (targets that tune)
    adapters: list[UserAdapter] = field(default_factory=list)   # users' adapters kept apart (separate mode)
    progress: Callable | None = None
    log: Callable[[str], None] = lambda s: None


@dataclass
class Lowered:
    """What a target wrote: its files in manifest order, and its own manifest section."""

    artifacts: list[Artifact]
    section: dict[str, Any] | None = None  # written under the target's name in the manifest, when not None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ResidentFacts:
    """What a backend's runtime keeps resident for a decoder besides its model file and its interpreter, term by
    term, where it has been measured (edgeq/predictor/memory.py prices a plan with these; `measured` False: the
    predictor fits its older per-feature model on the latency profile instead).

    Units: `activation_floats` are the f32 values per token one graph keeps live at once, per hidden and per MLP
    channel; `work_bytes_per_ffn` the bytes per token and MLP channel of the widest product's input converted for
    the kernels; `tokenizer_bytes_per_entry` what each vocabulary token and BPE merge costs once loaded (the
    Python spec and the runtime's own vocabulary)."""

    measured: bool = False
    kv_cell_multiple: int = 1              # the KV cache is allocated in whole multiples of this many tokens
    max_batch_tokens: int | None = None    # a prompt is computed in graphs of at most this many tokens
    prompt_logits: bool = True             # keeps every prompt position's logits (else the last position's)
    activation_floats: tuple[float, float] = (0.0, 0.0)
    work_bytes_per_ffn: float = 0.0
    tokenizer_bytes_per_entry: float = 0.0


class Target:
    """A backend. Subclasses set the class attributes and implement the methods that raise here."""

    name: str = ""
    presets: tuple[str, ...] = ()
    kinds: frozenset[str] = frozenset()           # model kinds it lowers (decoder, encoder, cnn)
    budget_kinds: frozenset[str] = frozenset()    # kinds whose files it sizes exactly (budgeted plans)
    latency_kinds: frozenset[str] = frozenset({"decoder"})   # kinds `edgeq profile` times (edgeq/predictor)
    # the latency predictor's whole-call correction for decoders may add gradient-boosted trees (when leave-one-
    # model-out says they help); and whether a CPU-clock decoder profile of this runtime must record the current
    # node-time method (edgeq/predictor/profile.py NODE_TIMES; older ones are refused)
    decoder_latency_trees: bool = True
    decoder_node_times_checked: bool = False
    runtime_dists: tuple[str, ...] = ()           # the distributions whose versions a bundle records
    # model kinds edgeq's native runner (edgeq/native/, a static executable over the backend's C library) runs
    native_kinds: frozenset[str] = frozenset()
    # llama.cpp picks some of a preset's types by whether an importance matrix is given, so such a target's
    # calibration runs before its preset is resolved; others calibrate what the finished plan needs
    preset_reads_imatrix: bool = False
    joins_bundles: bool = True                    # may share a bundle with other backends (`--backend all`)
    # users' adapters run on weights the exported model gave LoRA inputs (its manifest section's lora_slots)
    adapters_need_slots: bool = True
    sparse_adapters: bool = False                 # applies SHiRA adapters in place on the device
    measures_speed: bool = False                  # compare_speed() times its files in its runtime
    # UniQL pruning: whether its runtime narrows the MLPs of a sorted model at load (`--pruning-rates`), and the
    # multiple its stored layout needs along the MLP's channels besides the formats' blocks
    prunes_mlp: bool = False
    mlp_channel_multiple: int = 1
    prunes_budgeted: bool = True                  # its size model holds for a pruning bundle (the full width)
    # --prune-attention: whether its runtime narrows the attention's heads at load (per-layer Q/K and V widths, RoPE
    # frequencies that follow the sorted pairs), and why not where it does not
    prunes_attention: bool = False
    prunes_attention_why: str = "its runtime cannot narrow the attention's heads per layer"
    sizes_any_width: bool = False                 # its size model sizes any MLP width (`edgeq search` prunes with it)
    # budgeted plans compensate by default (GPTQ, passes/gptq.py): its formats' bytes are ggml's, computed exactly
    # here, so what the planner prices is what the file holds
    compensates: bool = False
    resident: ResidentFacts = ResidentFacts()     # what its runtime keeps resident (the latency predictor's memory)

    # --- deciding ---------------------------------------------------------------------------------------

    def preset_formats(self, graph: Graph, preset: str, has_imatrix: bool = False) -> dict[str, TensorPlan]:
        """What `preset` means for each tensor of `graph` on this backend (`requested` set where a shape made it
        fall back)."""
        raise NotImplementedError

    def preset(self, graph: Graph, preset: str, has_imatrix: bool = False) -> PresetTensors:
        """The preset's decisions, and what the plan's record says of them."""
        tensors = self.preset_formats(graph, preset, has_imatrix)
        return PresetTensors(tensors, {"preset": preset,
                                       **({"imatrix": has_imatrix} if self.preset_reads_imatrix else {}),
                                       "formats": Plan(tensors=tensors).format_counts(),
                                       "fallbacks": sum(1 for t in tensors.values() if t.requested)})

    def preset_takes_imatrix(self, graph: Graph, preset: str) -> bool:
        """Whether any format `preset` writes on this model uses an importance matrix (else calibrating is
        wasted)."""
        return any(get_format(tp.format).takes_imatrix
                   for has in (False, True) for tp in self.preset_formats(graph, preset, has).values())

    def candidate_formats(self, names: list[str] | None = None) -> list[Format]:
        """The formats a budgeted plan chooses among here (the registry's, or the named subset)."""
        return candidate_formats(self.name, names)

    def layout(self, graph: Graph, formats: list[Format], ranks: list[int], profile, *, spec=None,
               ndk_clang: str | None = None) -> FileLayout:
        """The exact size model of this backend's files for these candidate formats and branch ranks."""
        raise EdgeqError(None, f"budgeted plans for backend {self.name!r} ({graph.kind}s) are not available yet")

    def check(self, graph: Graph, profile, *, budgeted: bool, n_ctx: int | None, tune_trials: int) -> None:
        """Refuse, in one line, what this backend cannot do with these options (before any work is done)."""
        if graph.kind not in self.kinds:
            raise EdgeqError(None, f"the {self.name} backend does not carry {graph.kind} models")

    def file_rows(self, graph: Graph, name: str, rows: np.ndarray) -> np.ndarray:
        """A weight's quantized rows (the graph's row order) in the order this backend's file stores them."""
        return rows

    def check_plan(self, graph: Graph, plan: Plan) -> None:
        """Refuse a finished plan this backend cannot lower (before anything is written)."""

    # --- lowering and running ---------------------------------------------------------------------------

    def lower(self, req: LowerRequest) -> Lowered:
        """Write this backend's files for the plan into `req.folder`."""
        raise NotImplementedError

    def check_adapter(self, adapter: UserAdapter) -> None:
        """Refuse, before anything is written, an adapter this backend cannot apply at run time."""
        if isinstance(adapter, SparseAdapter) and not self.sparse_adapters:
            raise EdgeqError(None, f"SHiRA adapter {adapter.name}: sparse adapters are applied in place on the tvm "
                                   f"backend only for now, not {self.name} (or merge it: --adapter-mode merged)")

    def lower_adapter(self, graph: Graph, adapter: UserAdapter, folder: Path) -> Artifact:
        """Write a LoRA adapter kept apart from the base (`--adapter-mode separate`) into `folder`, in the form
        this backend's runtime applies at run time over the base artifact, without touching the base."""
        raise EdgeqError(None, f"--adapter-mode separate is not available on the {self.name} backend yet "
                               "(use --adapter-mode merged)")

    def describe(self, profile, ndk_clang: str | None) -> str:
        """What the export log says besides the plan (the device code a target builds, say)."""
        return ""

    def cannot_run_here(self, profile) -> str | None:
        """Why this host cannot run the artifact built for `profile` (None: it can, and the bundle's reference
        outputs are checked in the runtime)."""
        return None

    def compare_speed(self, files: dict[str, Path], threads: int) -> dict[str, dict[str, float]] | None:
        """Prefill and decode tokens/s of these model files of this backend, timed side by side in its runtime;
        None where the backend has no such measurement."""
        return None

    def kv_cache_dtype(self, preset: str | None, profile, requested: str | None) -> str:
        """The KV-cache type a decoder bundle of this backend runs with."""
        return "f32"

    def kernel_names(self, bundle: Path, graph_weights: dict[str, str]) -> dict[str, str]:
        """The runtime's names for the kernels that multiply with each weight of a bundle this target wrote:
        {name the runtime's per-kernel timer reports: canonical weight}. `graph_weights` maps each canonical
        weight to its GGUF alias. Latency profiles read kernel timings through this (edgeq/predictor)."""
        return {}

    def fused_qkv(self, plans: list[TensorPlan]) -> bool:
        """Whether an encoder layer's q, k and v projections planned so run as one kernel with its attention (the
        latency predictor prices that kernel, not three)."""
        return False

    def repacks(self, fmt: str, rows: int, cpu_flags: frozenset[str]) -> bool:
        """Whether the runtime copies a weight of this format and row count into a layout of its own on a CPU with
        these flags (its file pages then serve lookups only; edgeq/predictor/memory.py)."""
        return False

    def runtime_versions(self) -> dict[str, str]:
        """Versions of the runtime libraries a bundle was written and checked with (recorded in the manifest)."""
        out = {}
        for dist in self.runtime_dists:
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        return out
