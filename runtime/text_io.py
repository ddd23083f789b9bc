"""Text in and out for runtime sessions: one copy of what the ONNX and TVM backends share.

The mixins only assume the attributes each backend already has (`tok` and `spec` for decoders;
`kind`, `manifest`, `tokenize` and `embed_ids` for encoders), so no backend imports another.
"""

from __future__ import annotations

import numpy as np

from edgeq.core.errors import RequestError
from edgeq.runtime.tokenizer import decode, encode


class TokenizerText:
    """tokenize/detokenize through the bundle's tokenizer spec (decoder backends)."""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return encode(self.tok, self.spec, text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids) -> str:
        return decode(self.tok, [int(i) for i in ids])


class SentenceEmbedding:
    """embed(texts) in batches over a backend's `embed_ids` (encoder sessions)."""

    def embed(self, texts: str | list[str], batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings, shape (n, hidden) (or (hidden,) for one string), as the source model computes them."""
        if self.kind != "encoder":
            raise RequestError(f"embed() needs an encoder bundle; this one is a {self.kind}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ids = [self.tokenize(t) for t in texts]
        out = [self.embed_ids(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
        res = np.concatenate(out, 0) if out else np.zeros((0, self.manifest["model"]["config"]["hidden_size"]), np.float32)
        return res[0] if single else res
