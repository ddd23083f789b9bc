"""The ONNX target: a model file onnxruntime runs, for decoders, encoders and CNNs.

Presets (presets.py) put static or dynamic INT8 (QDQ) where onnxruntime has integer kernels and
weight-only 4/8-bit blocks (MatMulNBits, GatherBlockQuantized) on decoders; the lowering per model
kind is lower.py; decoders are sized exactly (layout.py) for budgeted plans.

The onnx package is a heavy import: the modules that need it are imported when a method runs, so that
choosing a target (the CLI, a GGUF export) does not pay for it.
"""

from __future__ import annotations

from edgeq.bundle.manifest import Artifact
from edgeq.bundle.tokenizer import write_hf_tokenizer
from edgeq.core.adapter import UserAdapter, lora_slots
from edgeq.core.errors import EdgeqError
from edgeq.core.formats import Format
from edgeq.core.ir import Graph
from edgeq.core.layout import FileLayout
from edgeq.core.plan import Plan, TensorPlan
from edgeq.targets.base import Lowered, LowerRequest, Target
from edgeq.targets.onnx.fusion import one_quantized_input
from edgeq.targets.onnx.genai import write_genai_config
from edgeq.targets.onnx.presets import ONNX_PRESETS, preset_formats

MODEL_FILE = "model.onnx"


class OnnxTarget(Target):
    name = "onnx"
    presets = ONNX_PRESETS
    kinds = frozenset({"decoder", "encoder", "cnn"})
    budget_kinds = frozenset({"decoder"})
    latency_kinds = frozenset({"decoder", "encoder", "cnn"})
    # trees scaled SmolLM2's decode steps by 0.89 (10 held-out plans, onnxruntime 1.32, 1 thread, CPU clock, load
    # 6: 7/10 within tolerance, median -14.8 %; the linear fit alone 10/10, -4.2 %); node times of method 2
    # (runtime/onnx_ops.py: the nodes' CPU share spread by each node's least wall time; older profiles priced
    # short nodes about a third low under load)
    decoder_latency_trees = False
    decoder_node_times_checked = True
    runtime_dists = ("onnxruntime", "onnx")
    prunes_mlp = True          # runtime/onnx_slice.py narrows the initializers before the session is built
    prunes_attention = True    # ... and the attention's (per-layer head widths, per-group RoPE tables, KV inputs)

    def preset_formats(self, graph: Graph, preset: str, has_imatrix: bool = False) -> dict[str, TensorPlan]:
        return preset_formats(graph, preset)

    def layout(self, graph: Graph, formats: list[Format], ranks: list[int], profile, *, spec=None,
               ndk_clang: str | None = None) -> FileLayout:
        from edgeq.targets.onnx.layout import onnx_layout

        return onnx_layout(graph, formats, ranks)

    def check_plan(self, graph: Graph, plan: Plan) -> None:
        if graph.kind == "cnn":
            from edgeq.targets.onnx.cnn import activation_params

            activation_params(graph, plan)      # a plan naming an activation the model lacks fails here

    def kernel_names(self, bundle, graph_weights: dict[str, str]) -> dict[str, str]:
        from edgeq.targets.onnx.lower import kernel_nodes

        return kernel_nodes(bundle / MODEL_FILE, set(graph_weights))

    def fused_qkv(self, plans: list[TensorPlan]) -> bool:
        return one_quantized_input(plans)

    def lower(self, req: LowerRequest) -> Lowered:
        from edgeq.targets.onnx.lower import lower_onnx, save_model

        slots = lora_slots(list(req.graph.weights), req.adapters)
        options = {**({"imatrix": req.imatrix} if req.imatrix is not None else {}),
                   **({"branches": req.branches} if req.branches else {}),
                   **({"lora_slots": slots} if slots else {})}
        model = lower_onnx(req.graph, req.plan, progress=req.progress, **options)
        section = None
        if req.plan.pruning:
            from edgeq.targets.onnx.pruning import pruning_recipe

            section = {"pruning": pruning_recipe(req.graph, req.plan, model)}
        files = save_model(model, req.folder / MODEL_FILE)
        del model
        if section is not None and len(files) > 1:
            raise EdgeqError(None, "--pruning-rates on ONNX needs the weights inside model.onnx (under 2 GB)")
        artifacts = [Artifact("model", f, self.name, req.plan.format_counts()) if f.name == MODEL_FILE else
                     Artifact("model_data", f, self.name) for f in files]
        if req.graph.kind == "decoder":       # the files ORT GenAI and Hugging Face tooling open the bundle with
            n_ctx = req.n_ctx or req.graph.config.context_length
            hf_files = write_hf_tokenizer(req.spec, req.folder, n_ctx)
            if hf_files:
                artifacts += [Artifact("tokenizer", f, self.name) for f in hf_files]
                artifacts.append(Artifact("config", write_genai_config(req.graph, req.spec, req.folder, MODEL_FILE,
                                                                       n_ctx), self.name))
            else:
                req.log("note: no tokenizer.json or genai_config.json for a SentencePiece vocabulary yet: edgeq's "
                        "runtime runs this ONNX bundle, onnxruntime-genai cannot open it as it is")
        if slots:
            section = {**(section or {}), "lora_slots": slots}
        return Lowered(artifacts, section)

    def lower_adapter(self, graph: Graph, adapter: UserAdapter, folder) -> Artifact:
        """The adapter in onnxruntime's adapter format, its tensors named for the graph's LoRA inputs."""
        self.check_adapter(adapter)
        from edgeq.targets.onnx.adapter import lora_file, write_adapter

        if graph.kind != "decoder":
            raise EdgeqError(None, f"LoRA adapters apply to decoders; this is an {graph.kind}")
        path = folder / lora_file(adapter.name)
        write_adapter(graph, adapter, path)
        return Artifact("lora", path, self.name, {"f32": 2 * len(adapter.targets)},
                        {"applies_to": MODEL_FILE, **adapter.entry(), "dtype": "f32"})

