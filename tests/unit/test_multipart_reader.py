"""The streaming multipart reader (gateway/http/multipart.py) against bodies httpx encodes, cut anywhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidRequest
from gateway.http.multipart import MAX_PARTS, MultipartReader, Part, boundary_of


def encoded(files: dict[str, tuple[str, bytes]], data: dict[str, str]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/v1/files", files=files, data=data)
    return request.read(), request.headers["content-type"]


async def _chunks(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in [*sorted(set(cuts)), len(body)]:
        yield body[start:cut]
        start = cut


def read(body: bytes, content_type: str, cuts: list[int] = []) -> list[tuple[Part, bytes]]:  # noqa: B006
    async def go() -> list[tuple[Part, bytes]]:
        reader = MultipartReader(_chunks(body, cuts), boundary_of(content_type))
        found = []
        async for part in reader.parts():
            found.append((part, b"".join([piece async for piece in reader.data()])))
        return found

    return asyncio.run(go())


# A delimiter-like run inside the content, and bytes of every value: the reader must not stop early.
CONTENT = b"line one\r\n--not-the-boundary\r\n\r\n" + bytes(range(256)) * 3 + b"\r\n-"
BODY, CTYPE = encoded({"file": ("batch.jsonl", CONTENT)}, {"purpose": "batch"})
DELIMITER = b"\r\n--" + boundary_of(CTYPE)
DELIMITERS = [i for i in range(len(BODY)) if BODY.startswith(DELIMITER, i)]


@settings(max_examples=200)
@given(st.lists(st.integers(0, len(BODY)), max_size=20))
def test_parts_survive_any_chunking(cuts: list[int]) -> None:
    inside = any(p < c < p + len(DELIMITER) for p in DELIMITERS for c in cuts)
    event("cut inside a delimiter" if inside else "cuts elsewhere")
    parts = read(BODY, CTYPE, cuts)
    assert [(p.name, p.filename) for p, _ in parts] == [("purpose", None), ("file", "batch.jsonl")]
    assert parts[0][1] == b"batch" and parts[1][1] == CONTENT


def test_names_headers_and_unread_parts() -> None:
    body = (
        b"preamble to ignore\r\n--BB  \t\r\n"  # transport padding after the boundary
        b'Content-Disposition: form-data; name="file"; filename="a \\"b\\".jsonl"; '
        b"filename*=UTF-8''r%C3%A9sum%C3%A9.jsonl\r\nContent-Type: application/jsonl\r\n\r\n"
        b"abc\r\n--BB\r\n"
        b"Content-Disposition: form-data; name=purpose\r\n\r\n"
        b"batch\r\n--BB--\r\nepilogue"
    )
    parts = read(body, 'multipart/form-data; boundary="BB"')
    assert parts[0][0] == Part("file", "résumé.jsonl", "application/jsonl") and parts[0][1] == b"abc"
    assert parts[1] == (Part("purpose", None, None), b"batch")

    async def skip_data() -> list[str]:  # a part whose data is not read is skipped
        reader = MultipartReader(_chunks(body, [7, 70]), b"BB")
        return [part.name async for part in reader.parts()]

    assert asyncio.run(skip_data()) == ["file", "purpose"]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "multipart/form-data",
        "multipart/mixed; boundary=x",
        "text/plain; boundary=y",
    ],
)
def test_only_form_data_with_a_boundary_is_read(content_type: str | None) -> None:
    with pytest.raises(InvalidRequest, match="multipart/form-data with a boundary") as refused:
        boundary_of(content_type)
    assert refused.value.param == "Content-Type"


DISPOSED = b"Content-Disposition: form-data; name=a\r\n\r\nx\r\n--BB--"
MALFORMED = {
    "ends inside a part": (BODY[: len(BODY) // 2], "ends inside a part"),
    "ends before the first boundary": (b"just some bytes", "before the first boundary"),
    "no closing boundary": (BODY[: BODY.rindex(b"--")], "ends"),
    "no disposition": (b"--BB\r\nContent-Type: text/plain\r\n\r\nx\r\n--BB--", "no Content-Disposition"),
    "not form-data": (b"--BB\r\n" + DISPOSED.replace(b"form-data", b"attachment"), "not form-data"),
    "no name": (b"--BB\r\nContent-Disposition: form-data\r\n\r\nx\r\n--BB--", "has no name"),
    "header without colon": (b"--BB\r\nnonsense\r\n\r\nx\r\n--BB--", "no colon"),
    "text after boundary": (b"--BBjunk\r\n" + DISPOSED, "after a"),
    "headers too long": (b"--BB\r\nX: " + b"a" * 9000 + b"\r\n\r\nx\r\n--BB--", "headers are longer"),
    "preamble too long": (b"x" * 9000 + b"\r\n--BB\r\n", "before the first boundary"),
    "too many parts": (
        b"".join(b"--BB\r\nContent-Disposition: form-data; name=p\r\n\r\nx\r\n" for _ in range(MAX_PARTS + 1))
        + b"--BB--",
        f"more than {MAX_PARTS} parts",
    ),
}


@pytest.mark.parametrize(("body", "says"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bodies_are_400s_that_say_why(body: bytes, says: str) -> None:
    boundary = CTYPE if body is BODY or body.startswith(BODY[:20]) else "multipart/form-data; boundary=BB"
    with pytest.raises(InvalidRequest, match="malformed multipart body") as refused:
        read(body, boundary, [3, 50])
    assert says in refused.value.message


def test_a_field_is_bounded_and_text() -> None:
    async def field(body: bytes, limit: int) -> str:
        reader = MultipartReader(_chunks(body, []), b"BB")
        async for _part in reader.parts():
            return await reader.field(limit)
        raise AssertionError("no part")

    body = b"--BB\r\nContent-Disposition: form-data; name=purpose\r\n\r\n%s\r\n--BB--"
    assert asyncio.run(field(body % b"batch", 16)) == "batch"
    with pytest.raises(InvalidRequest, match="longer than 16 bytes"):
        asyncio.run(field(body % (b"x" * 17), 16))
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        asyncio.run(field(body % b"\xff", 16))
