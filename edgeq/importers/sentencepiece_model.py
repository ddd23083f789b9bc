"""A SentencePiece `tokenizer.model` as llama.cpp's converter reads it: pieces, scores, types, normalizer flags.

Only what a llama.cpp SPM vocabulary can express is accepted. llama.cpp tokenizes "llama" vocabularies by
merging adjacent symbols by score and normalizes nothing but spaces, so a model whose own normalizer does
more would tokenize differently once exported: such models are refused with the reason, never converted
silently (convert_hf_to_gguf.py converts them and the ids change).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeq.core.errors import EdgeqError

MAX_MODEL_BYTES = 64 * 2**20
_BPE = 2            # TrainerSpec.ModelType
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass(frozen=True)
class SentencePieceModel:
    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]          # SentencePiece's piece types are GGUF's token types (1 normal ... 6 byte)
    add_dummy_prefix: bool


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """Parse `tokenizer.model` with the sentencepiece package's own protobuf schema (no code in the file runs)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise EdgeqError(path, "reading a SentencePiece tokenizer.model needs the sentencepiece and protobuf "
                               "packages (pip install 'edgeq[sentencepiece]'), or save the model's tokenizer.json") \
            from None
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise EdgeqError(path, f"is larger than {MAX_MODEL_BYTES} bytes")
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:       # protobuf's DecodeError and friends
        raise EdgeqError(path, f"is not a SentencePiece model ({type(exc).__name__})") from None
    if not proto.pieces:
        raise EdgeqError(path, "SentencePiece model has no pieces")
    kind = proto.trainer_spec.model_type
    if kind != _BPE:
        raise EdgeqError(path, f"SentencePiece {_MODEL_TYPES.get(kind, kind)} model: llama.cpp's SPM vocabulary "
                               "merges by score as BPE does, so only BPE models keep their ids")
    norm = proto.normalizer_spec
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        raise EdgeqError(path, f"SentencePiece normalizer {norm.name or 'precompiled'!r} rewrites text before "
                               "tokenizing; llama.cpp does not, so the exported model would see other ids (edgeq "
                               "refuses it rather than emulate it in one runtime only)")
    if norm.remove_extra_whitespaces:
        raise EdgeqError(path, "SentencePiece model collapses whitespace runs (remove_extra_whitespaces); "
                               "llama.cpp keeps them, so the exported model would see other ids on indented or "
                               "spaced text (edgeq refuses it rather than emulate it in one runtime only)")
    return SentencePieceModel(
        pieces=tuple(p.piece for p in proto.pieces), scores=tuple(float(p.score) for p in proto.pieces),
        types=tuple(int(p.type) for p in proto.pieces), add_dummy_prefix=bool(norm.add_dummy_prefix))
