"""The canonical (Hugging Face) names of the weights that passes and backends refer to by name.

Everything else is addressed by pattern (a layer's linears) or through the graph's nodes; these are the
tables and norms a lowering, a preset or an adapter merge must single out. One place spells them.
"""

from __future__ import annotations

# Llama family (decoders)
EMBED = "model.embed_tokens.weight"           # the token table; also the output head when tied
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"                    # only when the head is not tied to EMBED

# BERT (encoders)
WORD_EMBED = "embeddings.word_embeddings.weight"
POSITION_EMBED = "embeddings.position_embeddings.weight"
TOKEN_TYPE_EMBED = "embeddings.token_type_embeddings.weight"


def head(tied: bool) -> str:
    """The weight a decoder's logits are computed with."""
    return EMBED if tied else LM_HEAD
