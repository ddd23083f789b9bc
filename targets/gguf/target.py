"""The GGUF target: a file stock llama.cpp loads, with llama.cpp's own presets and quantizers.

A preset means exactly what llama-quantize means by it (presets.py), tensor for tensor; the file holds
ggml's own quantized bytes (writer.py); low-rank error branches go to a LoRA-adapter GGUF beside it that
llama.cpp applies at load (adapter.py); the size model is exact (layout.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.bundle.manifest import Artifact
from edgeq.core.adapter import UserAdapter
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format
from edgeq.core.ir import Graph
from edgeq.core.layout import FileLayout
from edgeq.core.plan import TensorPlan
from edgeq.models import llama
from edgeq.runtime.gguf_backend import MAX_BATCH
from edgeq.runtime.tokenizer import spec_to_json
from edgeq.targets.base import Lowered, LowerRequest, ResidentFacts, Target
from edgeq.targets.gguf.adapter import ADAPTER_FILE, lora_file, write_adapter
from edgeq.targets.gguf.layout import gguf_layout
from edgeq.targets.gguf.presets import GGUF_PRESETS, TensorInfo, preset_types
from edgeq.targets.gguf.speed import compare_speed
from edgeq.targets.gguf.writer import write_gguf

MODEL_FILE = "model.gguf"

# What edgeq.runtime's llama.cpp session keeps resident (bench/resident_terms.py measures each term):
# - the file once: llama.cpp maps it and copies the tensors it repacks (x86: Q4_0, Q4_K, IQ4_NL) into buffers of
#   the same size, and the runtime drops the mapped pages it copied from (runtime/memory.py);
# - the KV cache of n_ctx padded to 256 tokens (llama_context pads n_ctx so), cleared at creation, so resident;
# - one graph's activations per token of the largest batch: the MLP's input, its norm, the residual and the
#   attention's output (4 x hidden) beside gate, up and their product (3 x ffn), f32, and the down product's input
#   quantized to 8 bits (34 bytes per 32) in the CPU backend's work buffer; llama.cpp reserves the buffer for
#   n_ubatch tokens and n_ubatch outputs, but pages never written stay out (measured 17.1, 19.1 and 28.1 KB per
#   token on widths 256/1024, 384/1024 and 576/1536, formula 17.1, 19.1, 28.6);
# - the last position's logits only (llama.cpp's output buffer and the copy the runtime hands out);
# - the tokenizer twice, as the runtime's Python spec and as llama.cpp's vocabulary: about 265 bytes per token
#   and per BPE merge (measured 263-270 on vocabularies of 8 k-98 k entries).
LLAMA_CPP_RESIDENT = ResidentFacts(measured=True, kv_cell_multiple=256, max_batch_tokens=MAX_BATCH,
                                   prompt_logits=False, activation_floats=(4.0, 3.0), work_bytes_per_ffn=34 / 32,
                                   tokenizer_bytes_per_entry=265.0)


class GgufTarget(Target):
    name = "gguf"
    presets = GGUF_PRESETS
    kinds = frozenset({"decoder"})
    budget_kinds = frozenset({"decoder"})
    runtime_dists = ("llama-cpp-python", "gguf")
    native_kinds = frozenset({"decoder"})      # bin/edgeq-run over llama.h
    preset_reads_imatrix = True
    adapters_need_slots = False      # llama.cpp applies a LoRA GGUF to any weight of the model
    measures_speed = True
    sizes_any_width = True     # layout.py: bytes from each tensor's shape, the header from the widths' metadata
    compensates = True
    resident = LLAMA_CPP_RESIDENT
    prunes_mlp = True          # runtime/gguf_slice.py narrows the file by whole blocks; llama.cpp loads it as `deci`
    prunes_attention_why = ("llama.cpp's llama and deci architectures have one head size (attention.key_length = "
                            "value_length = rope.dimension_count, asserted equal) and one rope_freqs table for all "
                            "layers, so per-layer head widths and sorted RoPE pairs cannot be carried")

    def preset_formats(self, graph: Graph, preset: str, has_imatrix: bool = False) -> dict[str, TensorPlan]:
        cfg = graph.config
        infos = [TensorInfo(t.alias or llama.gguf_name(n), tuple(reversed(t.shape))) for n, t in graph.weights.items()]
        choices = preset_types(preset, infos, cfg.n_heads, cfg.n_kv_heads, has_imatrix=has_imatrix)
        out = {}
        for name, info in zip(graph.weights, infos):
            c = choices[info.name]
            out[name] = TensorPlan(format=c.type, reason=c.reason, requested=c.requested)
        return out

    def check(self, graph: Graph, profile, *, budgeted: bool, n_ctx: int | None, tune_trials: int) -> None:
        if graph.kind not in self.kinds:
            raise EdgeqError(graph.metadata.get("source_path"),
                             f"the gguf backend carries decoders; this is an {graph.kind} (use --backend onnx)")

    def layout(self, graph: Graph, formats: list[Format], ranks: list[int], profile, *, spec=None,
               ndk_clang: str | None = None) -> FileLayout:
        return gguf_layout(graph, spec_to_json(spec), any(r > 0 for r in ranks))

    def file_rows(self, graph: Graph, name: str, rows: np.ndarray) -> np.ndarray:
        heads = llama.qk_heads(graph.config, name)          # llama.cpp's interleaved RoPE rows (writer.py)
        return rows if heads is None else llama.permute_for_gguf(rows, heads)

    def compare_speed(self, files: dict[str, Path], threads: int) -> dict[str, dict[str, float]]:
        return compare_speed(files, threads)

    def kernel_names(self, bundle, graph_weights: dict[str, str]) -> dict[str, str]:
        # llama.cpp's graph names each matmul's weight operand by its GGUF tensor name
        return {alias: name for name, alias in graph_weights.items()}

    def repacks(self, fmt: str, rows: int, cpu_flags: frozenset[str]) -> bool:
        # ggml-cpu's repack.cpp (ggml_repack_get_optimal_repack_type), x86 and arm64, for the formats edgeq writes
        if "avx2" in cpu_flags:
            return rows % 8 == 0 and (fmt in ("q4_0", "q4_k", "iq4_nl") or (fmt == "q2_k" and "avx512f" in cpu_flags))
        if "asimddp" in cpu_flags or "i8mm" in cpu_flags:      # read from the source, not measured on arm64
            return ((fmt in ("q4_k", "q5_k", "q6_k") and rows % 8 == 0)
                    or (fmt in ("q4_0", "iq4_nl", "q8_0") and rows % 4 == 0))
        return False

    def kv_cache_dtype(self, preset: str | None, profile, requested: str | None) -> str:
        return requested or ("f32" if preset == "f32" else profile.kv_cache_dtype)

    def lower(self, req: LowerRequest) -> Lowered:
        model_file = req.folder / MODEL_FILE
        written = write_gguf(req.graph, req.plan, model_file, spec_to_json(req.spec), imatrix=req.imatrix,
                             progress=req.progress)
        artifacts = [Artifact("model", model_file, self.name, written)]
        if req.branches:
            adapter = req.folder / ADAPTER_FILE
            write_adapter(req.graph, req.branches, adapter)
            artifacts.append(Artifact("adapter", adapter, self.name, {"f16": 2 * len(req.branches)},
                                      {"applies_to": model_file.name, "kind": "lora (low-rank error compensation)"}))
            req.log(f"note: {len(req.branches)} low-rank error branches are in {ADAPTER_FILE}; edgeq's runtime applies "
                    f"them, stock llama.cpp needs them named: llama-cli -m {MODEL_FILE} --lora {ADAPTER_FILE} "
                    "(llama-server likewise)")
        return Lowered(artifacts)

    def lower_adapter(self, graph: Graph, adapter: UserAdapter, folder) -> Artifact:
        """A user's adapter as llama.cpp's LoRA-adapter GGUF (alpha 0: llama.cpp's scale is the runtime weight
        alone, PEFT's alpha/r is in B)."""
        self.check_adapter(adapter)
        path = folder / lora_file(adapter.name)
        write_adapter(graph, adapter.factors(), path, title=f"LoRA adapter {adapter.name}",
                      dtype=np.float32 if adapter.dtype == "f32" else np.float16)
        return Artifact("lora", path, self.name, {adapter.dtype: 2 * len(adapter.targets)},
                        {"applies_to": MODEL_FILE, **adapter.entry()})
