"""A request's output text, decoded incrementally and only when someone reads it.

A stream that reads ``RequestOutput.new_text`` at every step should not pay a decode of the whole
output each time (quadratic in its length), and one that never reads text should pay nothing.
So the engine keeps one ``Detokenizer`` per request (when it has a tokenizer); each output marks
its step's end (a list append), and reading an output's ``text`` / ``new_text`` decodes the steps
up to it that are not decoded yet, in order, so a step's text is the same whichever output is
read first.

Advancing decodes a window, not the whole output (the prefix/read offsets of TGI's and vLLM's
incremental decoders): ``decode(ids[prefix:n])`` against ``decode(ids[prefix:read])``, where
``read`` is the end of what is already text and ``prefix`` a few tokens before it, so that a
tokenizer whose pieces depend on their left neighbour (SentencePiece's leading space, byte-level
BPE) decodes the new piece in context. ``ids`` are the output's tokens without the special ones
(which decode skips anyway), so a run of them (EOS with ``ignore_eos``) cannot widen the window.
A window that ends inside a character (its decode ends in U+FFFD: the rest of the UTF-8 bytes
are in tokens not sampled yet) emits nothing; the next step's window holds the whole character.
The request's last output (finished, or aborted) also emits whatever is still held back, so the
pieces of a finished request join into ``tokenizer.decode(token_ids, skip_special_tokens=True)``
(for tokenizers whose decode rewrites across pieces, ``clean_up_tokenization_spaces``, into the
pieces' concatenation).
"""
from __future__ import annotations

import collections

REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    """Text of one request's output tokens, advanced step by step on demand."""

    __slots__ = ("tokenizer", "request", "special", "ids", "consumed", "text", "prefix", "read", "text_at",
                 "marks", "last_mark", "flushed")

    def __init__(self, tokenizer, request, special_ids: frozenset[int] | None = None):
        self.tokenizer = tokenizer
        self.request = request  # reads its token_ids, which grow as it runs
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ())) if special_ids is None else special_ids
        self.ids: list[int] = []  # output tokens read so far, special ones left out
        self.consumed = 0  # output tokens read into ids
        self.text = ""
        self.prefix = 0  # offsets into ids: the window's start ...
        self.read = 0  # ... and the end of the tokens already in ``text``
        self.text_at = {0: 0}  # a decoded step's end (output-token count) -> len(text) then
        self.marks: collections.deque[int] = collections.deque()  # steps' ends not decoded yet
        self.last_mark = 0
        self.flushed: int | None = None  # len(text) once the last output emitted what was held back

    def mark(self, n: int) -> None:
        """A step ended with ``n`` output tokens (an output was made for it): cheap, decodes nothing."""
        if n > self.last_mark:
            self.marks.append(n)
            self.last_mark = n

    def text_until(self, n: int, final: bool = False) -> str:
        """The text of the first ``n`` output tokens (a marked step's end; ``final``: the request's
        last output, which also gets what is held back, a partial character as U+FFFD as ``decode``
        gives it)."""
        self._catch_up(n, final)
        return self.text[:self._end(n, final)]

    def text_between(self, start: int, end: int, final: bool = False) -> str:
        """The text the output tokens ``start:end`` (one step's; both marked) added."""
        self._catch_up(end, final)
        return self.text[self.text_at[start]:self._end(end, final)]

    def _end(self, n: int, final: bool) -> int:
        return self.flushed if final else self.text_at[n]

    def _catch_up(self, n: int, final: bool) -> None:
        # every step up to n in order, so each step's text is the same whichever output is read
        # first: a step read late finds its figures in text_at, which nothing rewrites
        while self.marks and self.marks[0] <= n:
            self._advance(self.marks.popleft())
        if final and self.flushed is None:
            before, window = self._decode(self.prefix, self.read), self._decode(self.prefix, len(self.ids))
            if len(window) > len(before):
                self.text += window[len(before):]
            self.flushed = len(self.text)

    def _advance(self, n: int) -> None:
        p = self.request.num_prompt_tokens
        special = self.special
        self.ids.extend(t for t in self.request.token_ids[p + self.consumed:p + n] if t not in special)
        self.consumed = n
        before, window = self._decode(self.prefix, self.read), self._decode(self.prefix, len(self.ids))
        if len(window) > len(before) and not window.endswith(REPLACEMENT_CHAR):
            self.text += window[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        self.text_at[n] = len(self.text)

    def _decode(self, i: int, j: int) -> str:
        if i == j:
            return ""
        return self.tokenizer.decode(self.ids[i:j], skip_special_tokens=True)
