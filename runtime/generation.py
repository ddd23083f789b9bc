"""The decode loop: prompt ids in, tokens out one at a time, text out in pieces that are whole characters.

`Completion` is what `Session.stream` returns: iterate it for text pieces as tokens are decoded; afterwards it
says why it ended (`finish_reason`: "stop" for an end-of-generation token or a stop string, "length" for
max_tokens or the end of the context) and how many tokens each side used. `Session.generate` joins the same
pieces, so streamed and whole text never differ.

Text comes out through `IncrementalDecoder` (a token that ends inside a UTF-8 character waits for the token that
completes it) and `StopStrings` (text that may be the start of a stop string waits until it is known not to be).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

from edgeq.runtime.sampling import Sampler

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """The text of a growing token sequence, piece by piece, never ending a piece inside a character.

    Each new token is detokenized together with the tokens of the previous piece (as Hugging Face's and vLLM's
    streamers do): byte-level vocabularies split characters across tokens, and a decode that ends with U+FFFD
    is an unfinished character, held back until a later token completes it (or the end flushes it). The
    pieces then join to exactly `detokenize(all ids)`.
    """

    def __init__(self, detokenize: Callable[[list[int]], str]):
        self.detokenize = detokenize
        self.ids: list[int] = []
        self.prefix = 0            # start of the tokens decoded with the new ones (the previous piece's)
        self.read = 0              # end of what has been given out

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        return self._take(final=False)

    def flush(self) -> str:
        """What is still held back (an unfinished character comes out as the detokenizer renders it)."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.detokenize(self.ids[self.prefix:self.read])
        text = self.detokenize(self.ids[self.prefix:])
        if not final and (len(text) <= len(before) or text.endswith(REPLACEMENT)):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


class StopStrings:
    """Cuts the text at the first stop string; holds back an end that could still become one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held back) that is safe to give out; nothing after a stop."""
        if self.hit:
            return ""
        self.pending += text
        if not self.stops or not self.pending:
            out, self.pending = self.pending, ""
            return out
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.hit = self.pending[:cut], "", True
            return out
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


class TokenStream:
    """Tokens after the prompt until an end-of-generation token (not yielded), `max_tokens`, or the context's
    end; `finish_reason` says which ("stop" or "length"). The caller has checked that the prompt leaves room
    for one token.

    Per token the loop does what llama.cpp's own tools do, no more: one decode step and one draw. The backend
    copies the last position's logits out only for a sampler that reads them (`needs_logits`)."""

    def __init__(self, backend, sampler: Sampler, prompt_ids: Sequence[int], max_tokens: int,
                 stop_ids: frozenset[int]):
        self.backend = backend
        self.sampler = sampler
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[int]:
        backend, sampler, stop_ids = self.backend, self.sampler, self.stop_ids
        want = getattr(sampler, "needs_logits", True)      # False: the sampler reads them inside the runtime
        try:
            for t in self.prompt_ids:
                sampler.accept(t)
            backend.reset()
            logits = backend.feed(self.prompt_ids, logits=want)
            n = len(self.prompt_ids)
            for left in range(self.max_tokens - 1, -1, -1):
                tok = sampler.sample(logits)
                if tok in stop_ids:
                    self.finish_reason = "stop"
                    return
                yield tok
                n += 1
                if left == 0 or n >= backend.n_ctx:      # no decode of a token nothing will follow
                    break
                logits = backend.feed([tok], logits=want)
            self.finish_reason = "length"
        finally:
            close = getattr(sampler, "close", None)
            if close is not None:
                close()


class Completion:
    """A generation under way: iterate for text pieces. `text`, `token_ids`, `finish_reason`, `prompt_tokens`
    and `completion_tokens` are complete once the iteration ends (`result()` runs it to the end)."""

    def __init__(self, tokens: TokenStream, detokenize: Callable[[list[int]], str], stop: Iterable[str] = ()):
        self.prompt_tokens = len(tokens.prompt_ids)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._pieces: list[str] = []
        self._tokens = tokens
        self._decoder = IncrementalDecoder(detokenize)
        self._stops = StopStrings(stop)
        self._iter = self._run()

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def result(self) -> str:
        for _ in self:
            pass
        return self.text

    def close(self) -> None:
        """Stop generating (a client went away): the text so far stays, finish_reason is "cancelled"."""
        if self.finish_reason is None:
            self._iter.close()
            self.finish_reason = "cancelled"

    def _emit(self, text: str) -> Iterator[str]:
        if text:
            self._pieces.append(text)
            yield text

    def _run(self) -> Iterator[str]:
        tokens = iter(self._tokens)
        try:
            for tok in tokens:
                self.token_ids.append(tok)
                yield from self._emit(self._stops.feed(self._decoder.add(tok)))
                if self._stops.hit:
                    self.finish_reason = "stop"
                    return
            yield from self._emit(self._stops.feed(self._decoder.flush()))
            if not self._stops.hit:
                yield from self._emit(self._stops.flush())
            self.finish_reason = "stop" if self._stops.hit else self._tokens.finish_reason
        finally:
            tokens.close()
