"""A streaming `multipart/form-data` reader (RFC 7578): parts in turn, each part's bytes as a stream.

Invariant: memory is bounded by one received chunk plus the delimiter, whatever the parts' sizes; a part's
headers, the preamble and the number of parts are bounded too. Malformed input is a 400 that says what is
wrong; a body that ends early is one too. Used by `POST /v1/files`, whose uploads must never be held whole.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.errors import InvalidRequest

MAX_HEADER_BYTES = 8192  # one part's header block
MAX_PREAMBLE_BYTES = 8192
MAX_PARTS = 16
_BOUNDARY = re.compile(r"boundary=(?:\"([^\"]{1,70})\"|([^;\s\"]{1,70}))", re.IGNORECASE)
_PARAM = re.compile(r';\s*([A-Za-z0-9_*.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type; anything else is a 400."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    found = _BOUNDARY.search(content_type or "")
    if media != "multipart/form-data" or found is None:
        raise InvalidRequest(
            "send the upload as multipart/form-data with a boundary (fields `file` and `purpose`)",
            param="Content-Type",
        )
    return (found.group(1) or found.group(2)).encode("latin-1")


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None  # present for a file field (possibly empty)
    content_type: str | None


def _malformed(what: str) -> InvalidRequest:
    return InvalidRequest(f"malformed multipart body: {what}", param="Content-Type")


def _disposition(value: str) -> tuple[str, str | None]:
    """(name, filename) of a `form-data` Content-Disposition; `filename*` (RFC 5987) wins over `filename`."""
    if value.split(";", 1)[0].strip().lower() != "form-data":
        raise _malformed("a part's Content-Disposition is not form-data")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(value):
        quoted, plain = match.group(2), match.group(3)
        params[match.group(1).lower()] = (
            re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain or ""
        )
    if "name" not in params:
        raise _malformed("a part's Content-Disposition has no name")
    filename = params.get("filename")
    extended = params.get("filename*")
    if extended is not None and "''" in extended:
        charset, _, encoded = extended.partition("''")
        try:
            filename = unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):
            raise _malformed("a part's filename* is not in its declared charset") from None
    return params["name"], filename


def _headers(block: bytes) -> Part:
    fields: dict[str, str] = {}
    for line in block.split(b"\r\n") if block else []:
        field, sep, value = line.partition(b":")
        if not sep:
            raise _malformed("a part header line has no colon")
        try:
            fields[field.strip().decode("ascii").lower()] = value.strip().decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("a part header is not UTF-8") from None
    if "content-disposition" not in fields:
        raise _malformed("a part has no Content-Disposition header")
    name, filename = _disposition(fields["content-disposition"])
    return Part(name, filename, fields.get("content-type"))


class MultipartReader:
    """`async for part in reader.parts()`, reading each part's bytes with `data()` or `field()` before the
    next; bytes left unread are skipped."""

    def __init__(self, body: AsyncIterator[bytes], boundary: bytes) -> None:
        self._body = body
        self._delimiter = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # so the first delimiter, at the very start, looks like the others
        self._in_part = False

    async def _more(self, what: str) -> None:
        async for chunk in self._body:
            if chunk:
                self._buf += chunk
                return
        raise _malformed(f"the body ends {what} (no closing boundary)")

    async def parts(self) -> AsyncIterator[Part]:
        await self._skip_to_delimiter(MAX_PREAMBLE_BYTES, "before the first boundary")
        for count in range(MAX_PARTS + 1):
            while len(self._buf) < 2:
                await self._more("after a boundary")
            if self._buf.startswith(b"--"):
                return
            if count == MAX_PARTS:
                raise _malformed(f"more than {MAX_PARTS} parts")
            yield await self._part()
            if self._in_part:
                async for _skipped in self.data():
                    pass

    async def _skip_to_delimiter(self, limit: int, what: str) -> None:
        while (found := self._buf.find(self._delimiter)) < 0 and len(self._buf) <= limit:
            await self._more(what)
        if found < 0 or found > limit:
            raise _malformed(f"more than {limit} bytes {what}")
        del self._buf[: found + len(self._delimiter)]

    async def _part(self) -> Part:
        # The boundary's line may carry transport padding (spaces, tabs) before its CRLF; then the headers.
        while (line_end := self._buf.find(b"\r\n")) < 0:
            await self._more_headers()
        if self._buf[:line_end].strip(b" \t"):
            raise _malformed("text after a boundary on its line")
        del self._buf[:line_end]  # keep the CRLF: the header block (maybe empty) starts after it
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            await self._more_headers()
        if end > MAX_HEADER_BYTES:
            raise _malformed(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
        part = _headers(bytes(self._buf[2:end]))
        del self._buf[: end + 4]
        self._in_part = True
        return part

    async def _more_headers(self) -> None:
        if len(self._buf) > MAX_HEADER_BYTES:
            raise _malformed(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
        await self._more("inside a part's headers")

    async def data(self) -> AsyncIterator[bytes]:
        """The current part's bytes, as they arrive."""
        keep = len(self._delimiter) - 1  # a delimiter may straddle two chunks
        while self._in_part:
            found = self._buf.find(self._delimiter)
            if found >= 0:
                piece = bytes(self._buf[:found])
                del self._buf[: found + len(self._delimiter)]
                self._in_part = False
                if piece:
                    yield piece
                return
            if len(self._buf) > keep:
                piece = bytes(self._buf[:-keep])
                del self._buf[:-keep]
                yield piece
            await self._more("inside a part")

    async def field(self, limit: int) -> str:
        """The current part as text, at most `limit` bytes (a form field such as `purpose`)."""
        value = bytearray()
        async for piece in self.data():
            value += piece
            if len(value) > limit:
                raise InvalidRequest(f"a form field is longer than {limit} bytes", param="Content-Type")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("a form field is not UTF-8 text", param="Content-Type") from None
