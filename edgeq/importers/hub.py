"""Hugging Face Hub ids (`org/name[@revision]`, `org/name/FILE.gguf`) as local paths, through the HF cache.

A local path always wins; only a name that is no file or folder here is looked up. The lookup is
huggingface_hub's own: the cache under `$HF_HUB_CACHE` (or `$HF_HOME/hub`, default
~/.cache/huggingface/hub) in its `models--org--name/snapshots/<commit>/` layout, a revision resolved through
`refs/`, and a download of only the files edgeq reads when a network is there and `HF_HUB_OFFLINE` is not
set. The environment is read at each call, not when huggingface_hub was first imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgeq.core.errors import EdgeqError

# What edgeq reads from a model or adapter repository; weights in other formats are never fetched.
MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "generation_config.json", "README.md",
               "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?P<file>(?:/[^@]+)?\.gguf)?(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith(("./", "../", "/", "~"))


def hub_cache_dir() -> Path:
    """The cache huggingface_hub uses, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_hub_id(text: str, what: str = "model") -> Path:
    """The local snapshot folder (or GGUF file) of a Hub id; one clear error naming where edgeq looked."""
    m = _HUB_ID.match(text)
    if m is None:
        raise EdgeqError(text, "no such file or folder, and not a Hugging Face id (org/name[@revision])")
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise EdgeqError(text, "no such file or folder; resolving a Hugging Face id needs huggingface_hub "
                               "(pip install huggingface_hub)") from None
    repo, rev = m.group("repo"), m.group("rev") or "main"
    cache, offline = hub_cache_dir(), hub_offline()
    gguf = m.group("file")
    try:
        if gguf:
            return Path(huggingface_hub.hf_hub_download(repo, gguf.lstrip("/"), revision=rev, cache_dir=cache,
                                                        local_files_only=offline))
        patterns = ADAPTER_FILES if what == "adapter" else MODEL_FILES
        return Path(huggingface_hub.snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=offline,
                                                      allow_patterns=patterns))
    except hf_errors.LocalEntryNotFoundError as exc:
        reason = "HF_HUB_OFFLINE is set, so nothing was downloaded" if offline else _failed(exc)
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError) as exc:
        reason = f"the Hub has no such {type(exc).__name__.replace('NotFoundError', '').lower()}"
    except (hf_errors.OfflineModeIsEnabled, OSError, ValueError) as exc:
        reason = "HF_HUB_OFFLINE is set, so nothing was downloaded" if offline else _failed(exc)
    where = f"{cache}/models--{repo.replace('/', '--')}"
    raise EdgeqError(text, f"no such local {what}, and revision {rev!r} is not in the Hugging Face cache ({where}); "
                           f"{reason}")


def _failed(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:120]
    return f"downloading it failed ({type(exc).__name__}{': ' + first if first else ''})"
