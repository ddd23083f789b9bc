"""The user's own calibration data (--calib-text, --calib-jsonl) and quantized sources (requantization).

Calibration text must reach every pass that calibrates, be cached and recorded by the SHA-256 of its bytes, and
change what is written; a quantized source must be named, recorded, refused on request, and its tensors kept
byte for byte where the plan keeps their format.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edgeq import api, cli
from edgeq.core.errors import EdgeqError
from edgeq.importers.calibration_text import calibration_source
from edgeq.importers.gguf_metadata import open_gguf
from edgeq.importers.loader import import_model
from edgeq.passes.calibrate import calibration_tokens


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A code-like calibration file, a folder of two, a chat file, and a file too short for one window."""
    import inspect
    import json as json_mod

    d = tmp_path_factory.mktemp("calib")
    (d / "code.txt").write_text(inspect.getsource(json_mod.encoder) + inspect.getsource(json_mod.decoder))
    folder = d / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(inspect.getsource(json_mod.encoder))
    (folder / "b.md").write_text(inspect.getsource(json_mod.decoder))
    (folder / ".hidden").write_text("ignored")
    chats = [{"messages": [{"role": "user", "content": f"What does line {i} do?"},
                           {"role": "assistant", "content": line}]}
             for i, line in enumerate(inspect.getsource(json_mod.scanner).splitlines()) if line.strip()]
    (d / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    (d / "short.txt").write_text("def f(x):\n    return x + 1\n" * 6)
    return d


def test_sources_are_hashed_by_their_bytes(texts):
    code = calibration_source(texts / "code.txt")
    assert code.sha256 == hashlib.sha256((texts / "code.txt").read_bytes()).hexdigest()
    assert code.record() == {"text": "code.txt (plain text)", "text_sha256": code.sha256, "text_kind": "text"}
    folder = calibration_source(texts / "folder")
    assert folder.name == "folder/ (2 files, plain text)" and "ignored" not in folder.text()
    chat = calibration_source(jsonl=texts / "chat.jsonl")
    assert chat.kind == "jsonl" and len(chat.conversations()) > 10
    assert calibration_source().is_default and "text_kind" not in calibration_source().record()


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not utf-8", "is not UTF-8 text"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "line 2 is not JSON"),
    (b'{"text": "no messages"}\n', "line 1 has no 'messages' list"),
    (b'{"messages": [{"role": "user"}]}\n', "line 1: every message needs a string 'role' and 'content'"),
])
def test_bad_calibration_files_are_one_line(tmp_path, content, message):
    p = tmp_path / "data.jsonl"
    p.write_bytes(content)
    with pytest.raises(EdgeqError, match=message) as err:
        calibration_source(jsonl=p) if b"{" in content else calibration_source(p)
    assert str(p) in str(err.value)
    with pytest.raises(EdgeqError, match="either --calib-text or --calib-jsonl"):
        calibration_source(p, p)


def test_chat_data_is_rendered_with_the_template(tiny_decoder_dir, texts):
    graph = import_model(tiny_decoder_dir)
    ids, _, _ = calibration_tokens(graph, calibration_source(jsonl=texts / "chat.jsonl"))
    n_conv = len(calibration_source(jsonl=texts / "chat.jsonl").conversations())
    # <|im_start|> (id 1) parsed as the special token, twice per conversation, as the device sees it
    assert ids.count(1) == 2 * n_conv and ids.count(2) == 2 * n_conv


def _export(model, out, **kw):
    return api.export(model=str(model), quant="q4_0", out=str(out), check=False, **kw)["manifest"]


def test_user_text_reaches_the_imatrix_and_the_manifest(tiny_decoder_dir, texts, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    default = _export(tiny_decoder_dir, tmp_path / "d")
    code = _export(tiny_decoder_dir, tmp_path / "c", calib_text=str(texts / "code.txt"))
    chat = _export(tiny_decoder_dir, tmp_path / "j", calib_jsonl=str(texts / "chat.jsonl"))
    assert code["calibration"]["text_sha256"] == hashlib.sha256((texts / "code.txt").read_bytes()).hexdigest()
    assert chat["calibration"]["text_kind"] == "jsonl" and default["calibration"]["text"].startswith("pydoc_data")
    shas = {m["artifacts"][0]["sha256"] for m in (default, code, chat)}
    assert len(shas) == 3, "each calibration text gives other Q4_0 bytes"
    cached = sorted((tmp_path / "cache" / "calibration").iterdir())
    assert len(cached) == 3
    again = _export(tiny_decoder_dir, tmp_path / "c2", calib_text=str(texts / "code.txt"))
    assert again["artifacts"][0]["sha256"] == code["artifacts"][0]["sha256"]
    assert sorted((tmp_path / "cache" / "calibration").iterdir()) == cached      # served from the cache


def test_user_text_reaches_fisher_and_the_budgeted_plan(tiny_decoder_dir, texts, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from edgeq.compile import pipeline
    from edgeq.compile.options import ExportOptions

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    opts = ExportOptions(model=str(tiny_decoder_dir), bpw=5.0, calib_text=str(texts / "code.txt"), calib_windows=1,
                         cost="fisher")
    c = pipeline.prepare(opts, None, None, several_allowed=False)
    plan = pipeline.decide_all(c, opts, branches=False)["gguf"].plan
    sha = calibration_source(texts / "code.txt").sha256
    assert plan.calibration["text_sha256"] == sha
    assert next(r for r in c.ctx.records if r["pass"] == "fisher")["text_sha256"] == sha


def test_too_little_text_warns_with_the_counts(tiny_decoder_dir, texts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE", "off")
    rc = cli.main(["export", "--model", str(tiny_decoder_dir), "--quant", "q4_0", "--calib-text",
                   str(texts / "short.txt"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 0
    line = next(x for x in err.splitlines() if "short.txt" in x)
    n = json.loads((tmp_path / "o" / "manifest.json").read_text())["calibration"]["tokens"]
    assert f"has {n} tokens, fewer than the 2048 recommended (4 windows of 512)" in line


def test_static_int8_ranges_use_the_user_text(texts, tmp_path):
    from edgeq.models.recipes.synthetic import write_bert_folder

    enc = str(write_bert_folder(tmp_path / "enc"))          # a small BERT: the ranges, not the model, are tested
    default = api.export(model=enc, quant="int8", out=str(tmp_path / "d"), check=False)["manifest"]
    code = api.export(model=enc, quant="int8", out=str(tmp_path / "c"), check=False,
                      calib_text=str(texts / "code.txt"))["manifest"]
    rec = next(r for r in code["passes"] if r["pass"] == "calibrate_ranges")
    assert "code.txt" in rec["source"]
    ranges = [{n: t.get("act_range") for n, t in m["plan"]["tensors"].items()} for m in (default, code)]
    assert ranges[0] != ranges[1]


# --- quantized sources ---------------------------------------------------------------------------------

def test_default_model_export_names_its_requantization(smollm_graph, tmp_path):
    lines: list[str] = []       # what the CLI prints on stderr
    api.export(quant="q4_0", calibration=False, out=str(tmp_path / "o"), check=False, log=lines.append)
    line = next(x for x in lines if "already quantized" in x)
    assert "q4_1 210" in line and "requantized onto another grid" in line
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["source"]["formats"] == {"f32": 61, "q4_1": 210, "q8_0": 1}
    moved = [n for n, t in smollm_graph.weights.items()
             if t.source_format != "f32" and m["plan"]["tensors"][n]["format"] != t.source_format]
    assert sum(m["source"]["requantized"].values()) == len(moved) > 150
    assert "## Requantized tensors" in (tmp_path / "o" / "report.md").read_text()


def test_kept_source_formats_are_written_byte_for_byte(smollm_path, tmp_path):
    plan = tmp_path / "keep.json"
    plan.write_text(json.dumps({"version": 1, "rules": [{"match": "*", "format": "q4_1"}],
                                "tensors": {"model.embed_tokens.weight": {"format": "q8_0"}}}))
    api.export(plan=str(plan), calibration=False, allow_requantize=False, out=str(tmp_path / "o"), check=False)
    src = {t.name: t for t in open_gguf(smollm_path).tensors}
    out = open_gguf(tmp_path / "o" / "model.gguf").tensors
    assert len(out) == len(src) == 272
    for t in out:
        assert t.tensor_type == src[t.name].tensor_type
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(src[t.name].data).view(np.uint8)), t.name
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["source"]["requantized"] == {}


def test_no_requantize_refuses_in_one_line(tmp_path, capsys):
    rc = cli.main(["plan", "--quant", "q4_0", "--no-calibration", "--no-requantize", "-o", str(tmp_path / "p.json"),
                   "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "is already quantized and this plan requantizes" in err and "--no-requantize refuses" in err
    assert not (tmp_path / "p.json").exists()
