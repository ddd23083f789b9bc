"""The GGUF target: every type written from a plan loads in stock llama.cpp and computes what the IR says."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import llama_cpp
from gguf import GGUFReader

from edgeq.evaluation import log_softmax64
from edgeq.executor import Executor
from edgeq.formats import get_format
from edgeq.importers.gguf import import_gguf
from edgeq.models import llama
from edgeq.models.synthetic import byte_level_spec, random_llama, tiny_config
from edgeq.plan import Plan, TensorPlan
from edgeq.targets.gguf import write_gguf
from edgeq.tokenizer import spec_to_json

MIXED = ["q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "q5_0", "q5_1", "q4_0", "q4_1", "f16", "bf16", "f32"]


def mixed_plan(graph) -> Plan:
    """Every GGUF type at least once, cycling over the 2-D tensors."""
    tensors, i = {}, 0
    for name, t in graph.weights.items():
        if len(t.shape) == 1:
            tensors[name] = TensorPlan("f32")
        else:
            tensors[name] = TensorPlan(MIXED[i % len(MIXED)])
            i += 1
    return Plan(tensors=tensors)


def dequantized_graph(graph, plan):
    arrays = {n: get_format(plan.tensors[n].format).roundtrip(t.numpy()) if len(t.shape) == 2 else t.numpy()
              for n, t in graph.weights.items()}
    return llama.graph_from_arrays(graph.config, arrays)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cfg = tiny_config(n_layers=4, vocab_size=384)
    graph = random_llama(cfg, seed=7, scale=0.08)
    plan = mixed_plan(graph)
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    written = write_gguf(graph, plan, path, spec_to_json(byte_level_spec(cfg.vocab_size)))
    return graph, plan, path, written


def test_all_types_written(synthetic):
    graph, plan, path, written = synthetic
    assert set(MIXED) <= set(written)
    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(path).tensors}
    for name, t in graph.weights.items():
        assert types[t.alias] == plan.tensors[name].format


def test_reimport_gives_exactly_the_dequantized_weights(synthetic):
    graph, plan, path, _ = synthetic
    back = import_gguf(path)
    ref = dequantized_graph(graph, plan)
    for name in graph.weights:
        assert np.array_equal(back.weights[name].numpy(), ref.weights[name].numpy()), name


def test_llama_cpp_runs_the_mixed_file_like_the_reference(synthetic):
    graph, plan, path, _ = synthetic
    ids = list(np.random.default_rng(1).integers(3, graph.config.vocab_size, 48))
    ref = Executor(dequantized_graph(graph, plan)).logits(ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    def kld(a, b):
        la, lb = log_softmax64(a), log_softmax64(b)
        return float(np.mean(np.sum(np.exp(la) * (la - lb), -1)))

    # llama.cpp quantizes activations for quantized matmuls, so it is close to the dequantized
    # reference, not exact; but far closer than the float model is (which would mean wrong bytes)
    floating = Executor(graph).logits(ids)
    assert kld(ref, got) < 5e-3
    assert kld(ref, got) < 0.02 * kld(ref, floating)


def test_f32_roundtrip_gives_the_same_reference_logits(export_bundle, smollm_graph, reference_logits):
    bundle = export_bundle("f32")
    back = import_gguf(bundle / "model.gguf")
    ids = list(range(700, 740))
    assert np.array_equal(Executor(back).logits(ids), reference_logits(ids))


def _llama_quantize(src, dst, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0


@pytest.mark.parametrize("preset", ["q8_0", "q4_0", "q4_k_m", "q2_k"])
def test_tensor_bytes_identical_to_llama_cpp_quantize(preset, export_bundle, tmp_path):
    """edgeq's preset export vs llama.cpp quantizing edgeq's own F32 export of the same float weights."""
    from edgeq.targets.gguf.presets import preset_file_type

    f32 = export_bundle("f32") / "model.gguf"
    theirs_path = tmp_path / f"llama-{preset}.gguf"
    _llama_quantize(f32, theirs_path, preset_file_type(preset))
    ours = {t.name: t for t in GGUFReader(export_bundle(preset) / "model.gguf").tensors}
    theirs = {t.name: t for t in GGUFReader(theirs_path).tensors}
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
