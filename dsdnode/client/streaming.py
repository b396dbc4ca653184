"""Incremental detokenization: print text as tokens arrive, never half a UTF-8 character."""

from __future__ import annotations

from typing import Callable


class TextStream:
    def __init__(self, tokenizer, emit: Callable[[str], object]):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.printed = 0

    def push(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        if len(text) > self.printed:
            self.emit(text[self.printed:])
            self.printed = len(text)
