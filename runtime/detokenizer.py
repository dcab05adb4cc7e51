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
BPE) decodes the new piece in context. A window that ends inside a character (its decode ends
in U+FFFD: the rest of the UTF-8 bytes are in tokens not sampled yet) emits nothing; the next
step's window holds the whole character. The final step emits whatever is left, so the text of a
finished request is what ``tokenizer.decode(token_ids, skip_special_tokens=True)`` gives, but for
tokenizers whose decode rewrites across pieces (``clean_up_tokenization_spaces``), where it is the
pieces' concatenation.
"""
from __future__ import annotations

import collections

REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    """Text of one request's output tokens, advanced step by step on demand."""

    __slots__ = ("tokenizer", "request", "text", "prefix", "read", "text_at", "marks")

    def __init__(self, tokenizer, request):
        self.tokenizer = tokenizer
        self.request = request  # reads its token_ids, which grow as it runs
        self.text = ""
        self.prefix = 0  # output-token offsets: the window's start ...
        self.read = 0  # ... and the end of the tokens already in ``text``
        self.text_at = {0: 0}  # a decoded step's end (output-token count) -> len(text) then
        self.marks: collections.deque[int] = collections.deque()  # steps' ends not decoded yet

    def mark(self, n: int) -> None:
        """A step ended with ``n`` output tokens (an output was made for it): cheap, decodes nothing."""
        if n > (self.marks[-1] if self.marks else max(self.text_at)):
            self.marks.append(n)

    def text_until(self, n: int, final: bool = False) -> str:
        """The text of the first ``n`` output tokens (a marked step's end; ``final``: the request's
        last step, where a partial character is emitted as U+FFFD, as ``decode`` would)."""
        self._catch_up(n, final)
        return self.text[:self.text_at[n]]

    def text_between(self, start: int, end: int, final: bool = False) -> str:
        """The text the output tokens ``start:end`` (one step's; both marked) added."""
        self._catch_up(end, final)
        return self.text[self.text_at[start]:self.text_at[end]]

    def _catch_up(self, n: int, final: bool) -> None:
        # every step up to n in order, so each step's text is the same whichever output is read
        # first: a step read late finds its figures in text_at
        while self.marks and self.marks[0] <= n:
            m = self.marks.popleft()
            self._advance(m, final and m == n)
        if final and self.read < n:  # decoded before as a held-back step; now the last one
            self._advance(n, True)

    def _advance(self, n: int, final: bool) -> None:
        before = self._decode(self.prefix, self.read)
        window = self._decode(self.prefix, n)
        if len(window) > len(before) and (final or not window.endswith(REPLACEMENT_CHAR)):
            self.text += window[len(before):]
            self.prefix, self.read = self.read, n
        self.text_at[n] = len(self.text)

    def _decode(self, i: int, j: int) -> str:
        if i == j:
            return ""
        p = self.request.num_prompt_tokens
        return self.tokenizer.decode(self.request.token_ids[p + i:p + j], skip_special_tokens=True)
