"""Small SentencePiece vocabularies for tests and benchmarks: trained here, laid out as users have them.

No model hub is reachable, so the Llama-2-style tokenizers that SentencePiece models ship with are made
from Python's own pydoc text: `train_sentencepiece` writes a `tokenizer.model` (BPE, byte fallback, digits
split, whitespace pieces allowed: Llama-2's trainer settings by default), and `legacy_tokenizer_json` writes
the tokenizer.json that transformers' LlamaConverter made before transformers 5 (a Prepend/Replace
normalizer over BPE merges ordered by score). Needs the `sentencepiece` package.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

from edgeq.evaluate.texts import calibration_text

SPACE = "\u2581"


def training_lines(text: str | None = None, max_chars: int = 200_000) -> list[str]:
    """Lines of `text` (default: the calibration half of pydoc's topics), indentation kept."""
    text = calibration_text()[:max_chars] if text is None else text
    return [line for line in text.splitlines() if line.strip()]


def train_sentencepiece(path: str | Path, vocab_size: int = 1000, lines: Iterable[str] | None = None, *,
                        user_symbols: tuple[str, ...] = (), control_symbols: tuple[str, ...] = (),
                        remove_extra_whitespaces: bool = False, normalization: str = "identity",
                        model_type: str = "bpe", byte_fallback: bool = True, add_dummy_prefix: bool = True) -> Path:
    """Train a SentencePiece model and write it to `path` (ids: <unk> 0, <s> 1, </s> 2, as Llama's)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines if lines is not None else training_lines())), model_writer=buf,
        vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=remove_extra_whitespaces,
        normalization_rule_name=normalization, add_dummy_prefix=add_dummy_prefix, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16, num_threads=1,
        user_defined_symbols=list(user_symbols), control_symbols=list(control_symbols),
        train_extremely_large_corpus=False, minloglevel=2)
    path = Path(path)
    path.write_bytes(buf.getvalue())
    return path


def legacy_tokenizer_json(model_path: str | Path, out: str | Path) -> Path:
    """tokenizer.json as transformers' LlamaConverter wrote it (transformers < 5): BPE with byte fallback, merges
    of every split of every piece ordered by the piece's score, a Prepend + Replace normalizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, pid in sorted(vocab.items(), key=lambda kv: (-sp.get_score(kv[1]), kv[1])):
        if not sp.is_unknown(pid) and not sp.is_control(pid) and not sp.is_byte(pid) and len(piece) > 1:
            for cut in range(1, len(piece)):
                a, b = piece[:cut], piece[cut:]
                if a in vocab and b in vocab:
                    merges.append([a, b])
    added = [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    out = Path(out)
    out.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return out


def llama_tokenizer_config(folder: str | Path, chat_template: str | None = None, **extra) -> Path:
    """tokenizer_config.json as a Llama-2 checkpoint has it (BOS added, no EOS)."""
    tc = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
          "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
          **({"chat_template": chat_template} if chat_template else {}), **extra}
    path = Path(folder) / "tokenizer_config.json"
    path.write_text(json.dumps(tc, indent=1), encoding="utf-8")
    return path
