"""llama.cpp's SentencePiece ("llama", SPM) tokenizer, step for step, in plain Python.

A GGUF with `tokenizer.ggml.model = "llama"` is tokenized by llama.cpp's own
algorithm, not by SentencePiece: text is cut at special tokens (longest token
text first, every occurrence), each remaining piece gets a leading space when
it is the first piece or follows a token (`add_space_prefix`), spaces become
U+2581, and adjacent symbols are merged greedily by the score of the token
they form (highest score first, leftmost on a tie); characters that are no
token fall back to the `<0xXX>` byte tokens. Nothing else is normalized:
whitespace runs stay as they are, which is where SentencePiece itself (with
`remove_extra_whitespaces`) differs. Reproducing that algorithm here, rather
than approximating it with a BPE merge table, is what makes every backend of a
bundle produce llama.cpp's ids, ties and unreachable tokens included.

The runtime needs no compiler packages for it: the standard library only.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Sequence

SPACE = "\u2581"   # SentencePiece's visible space


def byte_token_text(b: int) -> str:
    return f"<0x{b:02X}>"


class SpmTokenizer:
    """Encode and decode like llama.cpp's llm_tokenizer_spm with its special-token partition.

    `texts`: token texts by id (empty ones already renamed as llama.cpp does); `scores`: float32 values;
    `attrs`: llama.cpp's token attributes after its by-text fix-ups; `special`: the ids it partitions on
    (control, user-defined and unknown), `user_defined`: those matched even without parse_special.
    """

    def __init__(self, texts: Sequence[str], scores: Sequence[float], *, partition_ids: Iterable[int],
                 always_ids: Iterable[int], piece_kind: Sequence[str], bos_id: int | None, eos_id: int | None,
                 add_bos: bool, add_eos: bool, add_space_prefix: bool):
        self.texts = list(texts)
        self.scores = list(scores)
        self.ids = {t: i for i, t in enumerate(self.texts)}
        always = set(always_ids)
        # llama.cpp sorts its special-token cache by text length, longest first (std::sort; equal lengths in id
        # order here, which only matters for two equal-length tokens overlapping in the text)
        order = sorted(partition_ids, key=lambda i: (-len(self.texts[i].encode("utf-8")), i))
        self.partition = [(self.texts[i], i, i in always) for i in order]
        self.piece_kind = list(piece_kind)      # per id: "text", "normal", "byte" or "none" (decode)
        self.byte_ids = [self._byte_id(b) for b in range(256)]
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix

    def _byte_id(self, b: int) -> int | None:
        """llama.cpp's byte_to_token: the <0xXX> token, else the one-byte text itself."""
        tid = self.ids.get(byte_token_text(b))
        if tid is None and b < 0x80:
            tid = self.ids.get(chr(b))
        return tid

    # --- encode -----------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        out: list[int] = []
        prev_special = True           # the first piece gets the space prefix too
        if add_special and self.add_bos:
            out.append(self.bos_id)
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            piece = (" " if self.add_space_prefix and prev_special else "") + frag
            self._merge(piece.replace(" ", SPACE), out)
            prev_special = False
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list:
        """tokenizer_st_partition: raw-text pieces (str) and token ids (int), in order."""
        frags: list = [text] if text else []
        for tok_text, tid, always in self.partition:
            if not (always or parse_special):
                continue
            out: list = []
            for f in frags:
                if not isinstance(f, str) or tok_text not in f:
                    out.append(f)
                    continue
                start = 0
                while True:
                    at = f.find(tok_text, start)
                    if at < 0:
                        break
                    if at > start:
                        out.append(f[start:at])
                    out.append(tid)
                    start = at + len(tok_text)
                if start < len(f):
                    out.append(f[start:])
            frags = out
        return frags

    def _merge(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize over one piece (spaces already escaped)."""
        n = len(text)
        sym = list(text)                  # symbol texts; "" once merged into the left neighbour
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []
        ids, scores = self.ids, self.scores

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = sym[left] + sym[right]
            tid = ids.get(merged)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, len(merged)))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != size:
                continue              # one side was merged since this pair was queued
            sym[left], sym[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            add(prv[left], left)
            add(left, nxt[left])
        i = 0 if n else -1
        while i != -1:
            tid = ids.get(sym[i])
            if tid is not None:
                out.append(tid)
            else:                     # a character that is no token: its UTF-8 bytes
                out.extend(self.byte_ids[b] for b in sym[i].encode("utf-8"))
            i = nxt[i]

    # --- decode -----------------------------------------------------------------------------------------
    def piece(self, tid: int) -> bytes:
        """token_to_piece with special=True: control and user-defined tokens as text, U+2581 as a space."""
        kind = self.piece_kind[tid]
        if kind == "text":
            return self.texts[tid].encode("utf-8")
        if kind == "normal":
            return self.texts[tid].replace(SPACE, " ").encode("utf-8")
        if kind == "byte":
            return bytes([int(self.texts[tid][3:5], 16)])
        return b""

    def detokenize(self, ids: Iterable[int]) -> str:
        """The pieces joined, as llama-cpp-python detokenizes (a leading space after BOS dropped)."""
        ids = list(ids)
        data = b"".join(self.piece(i) for i in ids)
        if ids and ids[0] == self.bos_id and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", errors="replace")
