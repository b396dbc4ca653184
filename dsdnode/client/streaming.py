"""Incremental detokenization for every entry point (CLI, library, HTTP API).

Text is emitted as tokens arrive, but never half a UTF-8 character, and never any part of a stop
string: text that might be the start of one is held back until the next tokens show it is not."""

from __future__ import annotations

from typing import Callable


class StopText(Exception):
    """Raised by TextStream.push once the text reached a stop string: end the generation there."""


class TextStream:
    def __init__(self, tokenizer, emit: Callable[[str], object], stops: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.emit, self.stops = tokenizer, emit, list(stops)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut at a stop string
        self.sent = 0  # characters of text already emitted

    def push(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(stop) for stop in self.stops) if i >= 0), default=None)
        if cut is not None:
            self.text = text[:cut]
            self.flush()
            raise StopText()
        self.text = text
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        self._emit_upto(len(text) - held_back(text, self.stops))

    def flush(self) -> None:
        """Emit what was held back (the generation ended without completing a stop string)."""
        self._emit_upto(len(self.text))

    def _emit_upto(self, end: int) -> None:
        if end > self.sent:
            self.emit(self.text[self.sent:end])
            self.sent = end


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of text could be the start of a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold
