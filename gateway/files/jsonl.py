"""The check an upload streams through: it must be JSONL, and each line is counted as a batch request or not.

Invariant: memory is bounded by one line (files.max_line_bytes) plus one chunk, whatever the file's size. A
file that is not JSONL (a line that is not JSON, not UTF-8, longer than the bound, or no line at all) is
refused with a 400 naming the line; a line that is JSON but no valid batch request is only counted, since the
batch turns it into an error-file entry when it runs (gateway/files/batch_lines.py).
"""

from __future__ import annotations

import orjson

from gateway.errors import InvalidRequest
from gateway.files.batch_lines import LineChecker, LineError

_BOM = b"\xef\xbb\xbf"


class JsonlCheck:
    def __init__(self, max_line_bytes: int, checker: LineChecker | None = None) -> None:
        self._max = max_line_bytes
        self._checker = checker or LineChecker()
        self._tail = bytearray()  # the line read so far, not yet ended by a newline
        self._number = 0  # physical lines ended so far
        self.lines = 0  # non-blank lines
        self.invalid_lines = 0  # lines that will become error entries

    def feed(self, chunk: bytes) -> None:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if self._tail:
                self._tail += chunk[start:end]
                self._line(bytes(self._tail))
                self._tail.clear()
            else:
                self._line(chunk[start:end])
            start = end + 1
        self._tail += chunk[start:]
        if len(self._tail) > self._max:
            self._too_long(self._number + 1)

    def finish(self) -> None:
        if self._tail:
            self._line(bytes(self._tail))
            self._tail.clear()
        if self.lines == 0:
            raise InvalidRequest(
                "the file has no lines: upload JSONL, one batch request per line", param="file"
            )

    def _line(self, raw: bytes) -> None:
        self._number += 1
        if len(raw) > self._max:
            self._too_long(self._number)
        if self._number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if not raw.strip():
            return
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest(
                f"the file is not JSONL: line {self._number} is not valid JSON (or not UTF-8); each line "
                "must be one JSON object",
                param="file",
            ) from None
        self.lines += 1
        if isinstance(self._checker.check_value(self._number, value), LineError):
            self.invalid_lines += 1

    def _too_long(self, number: int) -> None:
        raise InvalidRequest(
            f"line {number} of the file is longer than files.max_line_bytes ({self._max} bytes)", param="file"
        )
