"""The preset predictor against llama.cpp's own quantizer.

Presets are run through `llama_model_quantize` (llama-cpp-python) on F32
GGUF files, and every tensor type llama.cpp picks must be the one
`preset_types` predicted. Three models cover the rules that matter:
SmolLM2 (tied embeddings, 576-wide rows: most K-types fall back), a small
random llama with 256-multiple rows, an untied output and n_gqa = 4 (the
K-type mixtures proper), and an 80-layer GQA llama (llama.cpp's "70B" attn_v
bump, a tied embedding with K-compatible rows, and 208-wide ffn_down rows
that fit no block and fall back to f16).

The random models are quantized for real and read back with GGUFReader for
every preset. SmolLM2 is quantized for real for three presets and checked
through llama.cpp's dry run (same type choice, no file, seconds saved) for
all of them; the real runs also check that the dry-run log parse agrees.
"""

from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import llama_cpp
import llama_cpp._logger as llama_cpp_logger
import numpy as np
import pytest
from gguf.quants import dequantize

from edgeq.core.errors import EdgeqError
from edgeq.core.formats import shape_fallback
from edgeq.models.recipes.default import default_model_path
from edgeq.targets.gguf.presets import (
    GGUF_PRESETS,
    PresetChoice,
    TensorInfo,
    llama_cpp_order,
    preset_file_type,
    preset_types,
)


@dataclass(frozen=True)
class F32Model:
    path: Path
    tensors: list[TensorInfo]
    n_head: int
    n_head_kv: int


def _tensor_infos(reader: gguf.GGUFReader) -> list[TensorInfo]:
    return [TensorInfo(t.name, tuple(int(d) for d in t.shape)) for t in reader.tensors]


def _f32_model(path: Path) -> F32Model:
    reader = gguf.GGUFReader(path)
    return F32Model(
        path,
        _tensor_infos(reader),
        int(reader.fields["llama.attention.head_count"].contents()),
        int(reader.fields["llama.attention.head_count_kv"].contents()),
    )


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Everything but the header counters, the architecture (the writer adds it) and the file type."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    writer.add_file_type(0)


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> F32Model:
    """SmolLM2 with every tensor dequantized to F32, as a converter would have written it."""
    src = gguf.GGUFReader(default_model_path())
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-f32.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _copy_metadata(src, writer)
    for t in src.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        writer.add_tensor(t.name, np.ascontiguousarray(data))
    _write(writer)
    return _f32_model(path)


def _random_llama(
    path: Path, *, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, n_vocab: int, tied: bool
) -> F32Model:
    """A llama-arch F32 GGUF with random weights; the quantizer reads hparams, never the vocab, but
    a minimal SPM vocab keeps the file loadable by llama.cpp as a model."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("random-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(n_vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def w(name: str, *numpy_shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(numpy_shape, dtype=np.float32) * 0.02)

    head_dim = n_embd // n_head
    w("token_embd.weight", n_vocab, n_embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if not tied:
        w("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        w(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        w(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        w(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        w(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        w(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    _write(writer)
    return _f32_model(path)


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory) -> F32Model:
    path = tmp_path_factory.mktemp("gqa") / "gqa-f32.gguf"
    return _random_llama(path, n_layer=16, n_embd=256, n_ff=768, n_head=8, n_head_kv=2, n_vocab=1000, tied=False)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> F32Model:
    path = tmp_path_factory.mktemp("deep") / "deep-f32.gguf"
    return _random_llama(path, n_layer=80, n_embd=256, n_ff=208, n_head=4, n_head_kv=1, n_vocab=300, tied=True)


def _params(preset: str, *, dry_run: bool) -> llama_cpp.llama_model_quantize_params:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = preset_file_type(preset)
    params.nthread = 2
    params.dry_run = dry_run
    return params


def _llama_quantize(src: Path, dst: Path, preset: str) -> tuple[dict[str, str], int]:
    """Tensor types and general.file_type of the file llama.cpp writes for `preset`."""
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(_params(preset, dry_run=False)))
    assert rc == 0, f"llama_model_quantize failed for {preset}"
    reader = gguf.GGUFReader(dst)
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    file_type = int(reader.fields["general.file_type"].contents())
    dst.unlink()  # keep the disk footprint at one quantized copy
    return types, file_type


# One main-loop line of a dry run: "[  i/  n] NAME - [shape], type = IN, size = A MiB -> B MiB (OUT)",
# the arrow part only for tensors whose type changes.
_DRY_RUN_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\w+)\))?"
)


@contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log instead of printing it; put llama-cpp-python's logger back afterwards."""
    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunks.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(llama_cpp_logger.llama_log_callback, ctypes.c_void_p(0))


def _llama_dry_run(src: Path, dst: Path, preset: str, params=None) -> dict[str, str]:
    """The types llama.cpp's quantizer chose, read from its dry-run log.

    A dry run picks types through the same code as a real run but writes no
    file (checked here), so the log is the only place the choice shows; the
    real-file tests check that this parse agrees with written files.
    """
    with _llama_log() as chunks:
        params = params or _params(preset, dry_run=True)
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize (dry run) failed for {preset}"
    assert not dst.exists()
    types = {m[1]: (m[3] or m[2]).lower() for m in _DRY_RUN_LINE.finditer("".join(chunks))}
    assert types, "no per-tensor lines found in llama.cpp's dry-run log"
    return types


def _assert_predicted(model: F32Model, preset: str, actual: dict[str, str]) -> None:
    predicted = preset_types(preset, model.tensors, model.n_head, model.n_head_kv)
    assert set(predicted) == set(actual)
    wrong = {
        name: (predicted[name].type, actual[name], predicted[name].reason)
        for name in actual
        if predicted[name].type != actual[name]
    }
    assert not wrong, f"{preset}: {len(wrong)} of {len(actual)} tensors mispredicted: {wrong}"


# Quantizing SmolLM2 for real takes seconds per preset; these three cover
# every fallback (q4_k->q5_0, q6_k->q8_0, q5_k->q5_1, q3_k->q4_0, q2_k->q4_0)
# and the tied-embedding rule. All presets run as dry runs.
_SMOLLM2_WRITTEN = ("q4_k_m", "q3_k_l", "q2_k")
# i-quant files take seconds each even for tiny models; two are written for real, every one is dry-run below
_IQ_PRESETS = tuple(p for p in GGUF_PRESETS if p.startswith("iq"))
_WRITTEN_CASES = [("smollm2", p) for p in _SMOLLM2_WRITTEN] + [
    (m, p) for m in ("gqa_llama", "deep_llama") for p in GGUF_PRESETS if p not in _IQ_PRESETS
] + [("gqa_llama", "iq4_nl"), ("gqa_llama", "iq3_m")]


@pytest.mark.parametrize(("model_name", "preset"), _WRITTEN_CASES)
def test_written_file_matches_prediction(model_name: str, preset: str, request, tmp_path: Path) -> None:
    model: F32Model = request.getfixturevalue(model_name)
    with _llama_log():
        actual, file_type = _llama_quantize(model.path, tmp_path / f"{preset}.gguf", preset)
    assert file_type == preset_file_type(preset)
    _assert_predicted(model, preset, actual)
    assert _llama_dry_run(model.path, tmp_path / f"{preset}-dry.gguf", preset) == actual


@pytest.mark.parametrize("preset", GGUF_PRESETS)
def test_smollm2_dry_run_matches_prediction(smollm2: F32Model, preset: str, tmp_path: Path) -> None:
    _assert_predicted(smollm2, preset, _llama_dry_run(smollm2.path, tmp_path / "dry.gguf", preset))


def test_smollm2_q4_k_m_mixture(smollm2: F32Model) -> None:
    """The known shape of SmolLM2's Q4_K_M: only ffn_down (1536-wide rows) keeps K-types."""
    choices = preset_types("q4_k_m", smollm2.tensors, smollm2.n_head, smollm2.n_head_kv)
    counts: dict[str, int] = {}
    for c in choices.values():
        counts[c.type] = counts.get(c.type, 0) + 1
    assert counts == {"f32": 61, "q5_0": 166, "q4_k": 16, "q6_k": 14, "q8_0": 15}
    embd = choices["token_embd.weight"]
    assert embd.type == "q8_0" and "tied" in embd.reason
    v0 = choices["blk.0.attn_v.weight"]
    assert (v0.type, v0.requested) == ("q8_0", "q6_k") and "use_more_bits" in v0.reason
    assert choices["blk.0.attn_norm.weight"] == PresetChoice("f32", "not quantized: 1-D tensor", None)


def test_gqa_llama_k_paths(gqa_llama: F32Model) -> None:
    q2 = preset_types("q2_k", gqa_llama.tensors, gqa_llama.n_head, gqa_llama.n_head_kv)
    assert q2["blk.7.attn_v.weight"].type == "q4_k"  # n_gqa >= 4
    assert q2["output.weight"].type == "q6_k"
    assert q2["token_embd.weight"].type == "q2_k"  # untied: the body's type
    m = preset_types("q3_k_m", gqa_llama.tensors, gqa_llama.n_head, gqa_llama.n_head_kv)
    assert [m[f"blk.{i}.attn_v.weight"].type for i in range(3)] == ["q5_k", "q5_k", "q4_k"]


def test_deep_llama_paths(deep_llama: F32Model) -> None:
    """80 layers with GQA is llama.cpp's "70B" model type: attn_v gets q5_k where the mixture said q3_k/q4_k."""

    def choose(preset: str) -> dict[str, PresetChoice]:
        return preset_types(preset, deep_llama.tensors, deep_llama.n_head, deep_llama.n_head_kv)

    q4_0 = choose("q4_0")
    assert q4_0["token_embd.weight"].type == "q6_k" and "tied" in q4_0["token_embd.weight"].reason
    assert (q4_0["blk.3.ffn_down.weight"].type, q4_0["blk.3.ffn_down.weight"].requested) == ("f16", "q4_0")
    q4_k_s = choose("q4_k_s")
    assert q4_k_s["blk.40.attn_v.weight"].type == "q5_k" and "70B" in q4_k_s["blk.40.attn_v.weight"].reason
    assert q4_k_s["blk.40.ffn_down.weight"].requested == "q4_k"


def test_shape_fallback() -> None:
    assert shape_fallback("q4_k", 512) == ("q4_k", None)
    assert shape_fallback("q4_k", 576)[0] == "q5_0"
    assert shape_fallback("q5_k", 576)[0] == "q5_1"
    assert shape_fallback("q6_k", 576)[0] == "q8_0"
    assert shape_fallback("q2_k", 576)[0] == "q4_0"
    assert shape_fallback("q3_k", 576)[0] == "q4_0"
    assert shape_fallback("q4_k", 208)[0] == "f16"  # q5_0 does not fit either
    assert shape_fallback("q8_0", 208)[0] == "f16"
    assert shape_fallback("f16", 7) == ("f16", None)
    t, why = shape_fallback("Q6_K", 576)
    assert t == "q8_0" and "576" in why and "256" in why
    with pytest.raises(EdgeqError):
        shape_fallback("q9_z", 256)


def test_file_types_match_llama_h() -> None:
    for preset in GGUF_PRESETS:
        name = "ALL_F32" if preset == "f32" else f"MOSTLY_{preset.upper()}"
        assert preset_file_type(preset) == getattr(llama_cpp, f"LLAMA_FTYPE_{name}")


def test_unknown_preset() -> None:
    with pytest.raises(EdgeqError, match="unknown --quant preset 'q4_k_x'"):
        preset_types("q4_k_x", [], 1, 1)
    with pytest.raises(EdgeqError, match="q4_k_m"):
        preset_file_type("Q4_K_M ")


def test_loader_order() -> None:
    names = ["blk.10.attn_v.weight", "output.weight", "blk.2.ffn_down.weight", "blk.2.attn_v.weight", "token_embd.weight"]
    ordered = [t.name for t in llama_cpp_order([TensorInfo(n, (256, 256)) for n in names])]
    assert ordered == [
        "output.weight", "token_embd.weight", "blk.2.attn_v.weight", "blk.2.ffn_down.weight", "blk.10.attn_v.weight"
    ]


def test_experts_not_supported() -> None:
    with pytest.raises(NotImplementedError):
        preset_types("q4_k_m", [TensorInfo("blk.0.ffn_down_exps.weight", (256, 256, 8))], 8, 2)


def _dry_run_with_imatrix(model: F32Model, preset: str, dst: Path) -> dict[str, str]:
    """llama.cpp's dry-run choices for `preset` when an importance matrix (all ones) is given."""
    weights = [t for t in model.tensors if _n_dims_of(t) == 2]
    arrays = [np.ones(t.ne[0], dtype=np.float32) for t in weights]
    entries = (llama_cpp.llama_model_imatrix_data * (len(weights) + 1))()
    names = [t.name.encode() for t in weights]
    for i, (name, arr) in enumerate(zip(names, arrays)):
        entries[i].name = name
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    entries[len(weights)].name = None
    params = _params(preset, dry_run=True)
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return _llama_dry_run(model.path, dst, preset, params)


@pytest.mark.parametrize("model_name", ["gqa_llama", "deep_llama"])
@pytest.mark.parametrize("preset", _IQ_PRESETS)
def test_iq_presets_dry_run_match_prediction(model_name: str, preset: str, request, tmp_path: Path) -> None:
    """The i-quant presets' rules (GQA >= 4 on gqa_llama, the eighths of 80 layers on deep_llama), without and with
    an importance matrix (which iq3_xxs, iq4_nl and iq4_xs consult)."""
    model: F32Model = request.getfixturevalue(model_name)
    _assert_predicted(model, preset, _llama_dry_run(model.path, tmp_path / "dry.gguf", preset))
    actual = _dry_run_with_imatrix(model, preset, tmp_path / "dry-im.gguf")
    predicted = preset_types(preset, model.tensors, model.n_head, model.n_head_kv, has_imatrix=True)
    assert {n: c.type for n, c in predicted.items()} == actual


@pytest.mark.parametrize("preset", ["q4_0", "q5_0", "q4_k_m", "q3_k_m", "iq3_xxs", "iq4_nl"])
def test_smollm2_dry_run_with_imatrix_matches_prediction(smollm2: F32Model, preset: str, tmp_path: Path) -> None:
    """With an importance matrix llama.cpp changes some choices (q4_0/q5_0: the first eighth of ffn_down)."""
    actual = _dry_run_with_imatrix(smollm2, preset, tmp_path / "dry.gguf")
    predicted = preset_types(preset, smollm2.tensors, smollm2.n_head, smollm2.n_head_kv, has_imatrix=True)
    assert {n: c.type for n, c in predicted.items()} == actual
    plain = preset_types(preset, smollm2.tensors, smollm2.n_head, smollm2.n_head_kv)
    changed = {n for n in actual if plain[n].type != actual[n]}
    if preset in ("q4_0", "q5_0"):
        assert changed == {f"blk.{i}.ffn_down.weight" for i in range(30 // 8)}
    elif preset == "iq3_xxs":        # attn_v iq3_s -> iq3_xxs (falls back to iq4_nl on 576 columns either way)
        assert {n for n in changed if "attn_v" not in n} == {f"blk.{i}.ffn_down.weight" for i in range(30)}
    elif preset == "iq4_nl":         # the first eighth of ffn_down keeps iq4_nl instead of q5_k
        assert changed == {f"blk.{i}.ffn_down.weight" for i in range(30 // 8)}
    else:
        assert not changed


def _n_dims_of(t: TensorInfo) -> int:
    return sum(1 for d in t.ne if d > 1)
