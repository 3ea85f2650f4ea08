"""Text out of token ids: an incremental detokeniser that holds back anything that may become a stop string.

The engine returns token ids only; the server feeds each request's ids through a `StopStringDecoder`, shows
the text it releases, and aborts the request once `stopped` is set. Pure Python over a tokenizer's
`decode`, so it runs (and is tested) without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backends.local.engine.scheduler import SamplingParams

__all__ = ["SamplingParams", "StopStringDecoder"]

_REPLACEMENT_CHAR = "\ufffd"  # what a tokenizer decodes from an incomplete UTF-8 sequence


class StopStringDecoder:
    """Incremental detokeniser that never emits text that is (or may become) part of a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._text = ""  # everything decoded so far (whole characters only)
        # Incremental decoding over a short window (as TGI and vLLM do): ids[_prefix:_read] were decoded
        # last time; decoding ids[_prefix:] and cutting that text off gives the new characters, with the
        # window's first tokens as context for spacing rules. Decoding every id at every token was O(n^2)
        # and took most of the server thread's time at ~100 tokens/s.
        self._prefix = 0
        self._read = 0
        self._emitted_chars = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now safe to show."""
        self._ids.append(token_id)
        new = self._unread_text()
        if new is None or new.endswith(_REPLACEMENT_CHAR):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        self._text += new
        self._prefix, self._read = self._read, len(self._ids)
        stop_at = self._find_stop()
        if stop_at is not None:
            self.stopped = True
            return self._emit_until(stop_at)
        return self._emit_until(len(self._text) - self._held_back_chars())

    def finish(self) -> str:
        """The rest of the text once generation has ended (nothing if a stop string ended it).

        Tokens still held for an incomplete character are decoded as they are (U+FFFD, as a whole decode).
        """
        if self.stopped:
            return ""
        if self._read < len(self._ids):
            self._text += self._unread_text() or ""
            self._read = len(self._ids)
            if (stop_at := self._find_stop()) is not None:
                self.stopped = True
                return self._emit_until(stop_at)
        return self._emit_until(len(self._text))

    def _unread_text(self) -> str | None:
        """The text the ids after `_read` add, decoded with the window's earlier ids as context; None if they
        add no visible characters yet."""
        before = self._tokenizer.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        window = self._tokenizer.decode(self._ids[self._prefix :], skip_special_tokens=True)
        return window[len(before) :] if len(window) > len(before) else None

    def _find_stop(self) -> int | None:
        search_from = max(0, self._emitted_chars - self._longest_stop)
        hits = [i for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
        return min(hits) if hits else None

    def _held_back_chars(self) -> int:
        # The longest suffix of the text that is a proper prefix of some stop string.
        for size in range(min(self._longest_stop - 1, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def _emit_until(self, end: int) -> str:
        if end <= self._emitted_chars:
            return ""
        delta = self._text[self._emitted_chars : end]
        self._emitted_chars = end
        return delta
