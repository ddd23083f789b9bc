"""The GGUF target: every type written from a plan loads in stock llama.cpp and computes what the IR says."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import llama_cpp
from gguf import GGUFReader

from edgeq.evaluate.decoder import log_softmax64
from edgeq.core.errors import EdgeqError
from edgeq.core.executor import Executor
from edgeq.core.formats import get_format
from edgeq.importers.gguf import import_gguf
from edgeq.models import llama
from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config
from edgeq.core.plan import Plan, TensorPlan
from edgeq.targets.gguf import write_gguf
from edgeq.runtime.tokenizer import spec_to_json

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


def _imatrix_params(ftype: int, importance: dict[str, np.ndarray]):
    """llama_model_quantize_params with params.imatrix set, and the buffers that must stay alive."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    keep = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    for i, (name, values) in enumerate(sorted(importance.items())):
        arr = np.ascontiguousarray(values, dtype=np.float32)
        keep += [arr, name.encode()]
        entries[i].name = keep[-1]
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    entries[len(importance)].name = None           # NULL-terminated, as llama-quantize builds it
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    keep.append(entries)
    return params, keep


@pytest.fixture(scope="module")
def random_imatrix_file(smollm_graph, tmp_path_factory):
    """An importance matrix for every 2-D weight of SmolLM2 (GGUF names), heavy-tailed like real ones."""
    from edgeq.importers.imatrix import Imatrix, ImatrixEntry, write_imatrix

    rng = np.random.default_rng(0)
    entries = {t.alias: ImatrixEntry((rng.lognormal(0, 2, t.shape[-1]) * 100).astype(np.float32), np.array([100]))
               for t in smollm_graph.weights.values() if len(t.shape) == 2}
    path = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    write_imatrix(path, Imatrix(entries, ["random"], 1, 512))
    return path


@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m", "iq4_nl"])
def test_tensor_bytes_identical_to_llama_cpp_quantize_with_imatrix(preset, export_bundle, random_imatrix_file, tmp_path):
    """With the same importance matrix, edgeq's export is llama_model_quantize's with params.imatrix, byte for byte
    (q4_0 also checks llama.cpp's imatrix-only rule: the first eighth of ffn_down becomes q4_1)."""
    from edgeq.importers.imatrix import read_imatrix
    from edgeq.api import ExportOptions, export
    from edgeq.targets.gguf.presets import preset_file_type

    ours_dir = tmp_path / "ours"
    export(ExportOptions(quant=preset, imatrix=str(random_imatrix_file), out=str(ours_dir), check=False))
    importance = {name: e.importance() for name, e in read_imatrix(random_imatrix_file).entries.items()}
    params, _keep = _imatrix_params(preset_file_type(preset), importance)
    theirs_path = tmp_path / f"llama-{preset}-imatrix.gguf"
    f32 = export_bundle("f32") / "model.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(), ctypes.byref(params)) == 0
    ours = {t.name: t for t in GGUFReader(ours_dir / "model.gguf").tensors}
    theirs = {t.name: t for t in GGUFReader(theirs_path).tensors}
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    plain = {t.name: t for t in GGUFReader(export_bundle(preset) / "model.gguf").tensors}
    differs_from_plain = sum(plain[name].tensor_type != t.tensor_type
                             or not np.array_equal(np.asarray(plain[name].data).view(np.uint8),
                                                   np.asarray(t.data).view(np.uint8)) for name, t in theirs.items())
    assert differs_from_plain > 100       # the importance matrix was really used
    if preset == "q4_0":
        assert ours["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
        assert ours["blk.3.ffn_down.weight"].tensor_type.name == "Q4_0"
    m = __import__("json").loads((ours_dir / "manifest.json").read_text())
    assert m["calibration"]["enabled"] and m["calibration"]["source"] == "imatrix file"


def test_formats_written_from_an_importance_matrix_only(tmp_path):
    """iq2_xxs (and iq3_xxs, iq2_s, iq2_xs, iq1_m, iq1_s) are refused without one, in one line and before anything
    is written, as llama-quantize refuses them; with calibration they are written and llama.cpp runs the file."""
    from edgeq.api import ExportOptions, export
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder

    cfg = tiny_config(vocab_size=300, hidden_size=256, intermediate_size=512, n_layers=1, tied_embeddings=True)
    folder = graph_to_hf_folder(random_llama(cfg, seed=2, scale=0.08), tmp_path / "m", byte_level_spec(300))
    plan = tmp_path / "plan.json"
    plan.write_text('{"preset": "q8_0", "rules": [{"match": "*.mlp.down_proj", "format": "iq2_xxs"}]}')
    with pytest.raises(EdgeqError, match="iq2_xxs .*importance matrix"):
        export(ExportOptions(model=str(folder), plan=str(plan), calibration=False, out=str(tmp_path / "no")))
    assert not (tmp_path / "no").exists()
    res = export(ExportOptions(model=str(folder), plan=str(plan), calib_windows=1, out=str(tmp_path / "yes")))
    assert res["manifest"]["artifacts"][0]["formats"]["iq2_xxs"] == 1
    chk = res["measurements"]["reference_check"]                    # llama.cpp loaded and ran it
    assert chk["n_positions"] > 0 and 0 <= chk["kld_mean"] < 0.5
