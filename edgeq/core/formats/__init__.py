"""The one registry of quantization formats (registry.py), with every family registered.

A format's facts (bits, blocks, exact bytes, which shapes it carries, its fallback, its grid) and its
reference quantizer live here and nowhere else: a new format is one `register(Format(...))` in the module
of its family, and a new family one import below.
"""
# isort: skip_file
# (the families register in this order, and a backend's candidate formats keep it: it is part of every plan)

from edgeq.core.formats.registry import (
    FORMATS,
    Format,
    candidate_formats,
    formats_for,
    get_format,
    register,
    shape_fallback,
)
from edgeq.core.formats import ggml_types  # noqa: F401  GGUF's ggml types (f32 and f16 for every backend)
from edgeq.core.formats import int8  # noqa: F401  ONNX int8 / int8_dyn, TVM int8_wo
from edgeq.core.formats import nbits  # noqa: F401  ONNX MatMulNBits blocks
from edgeq.core.formats import int4_groups  # noqa: F401  TVM int4_g32
from edgeq.core.formats import int8_groups  # noqa: F401  TVM int8_g32 (q8_0)

__all__ = ["FORMATS", "Format", "candidate_formats", "formats_for", "get_format", "register", "shape_fallback"]
