"""The batch-line validator (gateway/files/batch_lines.py) and the JSONL check uploads stream through
(gateway/files/jsonl.py): every error code, OpenAI's error formats, chunking that never changes a verdict."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from gateway.errors import InvalidRequest
from gateway.files.batch_lines import MAX_CUSTOM_ID_CHARS, BatchLine, LineChecker, LineError
from gateway.files.jsonl import JsonlCheck

SECRET = "PLANTED-PROMPT-7f3a"  # never in a message


def line(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "custom_id": "req-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "fast", "messages": [{"role": "user", "content": SECRET}]},
    }
    value.update(overrides)
    return {k: v for k, v in value.items() if v is not _DROP}


_DROP = object()
MAX_ID = MAX_CUSTOM_ID_CHARS


def test_a_good_line_is_a_request() -> None:
    checked = LineChecker().check(3, orjson.dumps(line()))
    assert isinstance(checked, BatchLine)
    assert (checked.line, checked.custom_id, checked.url) == (3, "req-1", "/v1/chat/completions")
    assert checked.body["messages"][0]["content"] == SECRET
    for url in ("/v1/responses", "/v1/embeddings"):
        assert isinstance(LineChecker().check(1, orjson.dumps(line(url=url))), BatchLine)


BAD: list[tuple[str, bytes, str, str | None]] = [
    ("not json", b'{"custom_id": "a", ' + SECRET.encode(), "invalid_json_line", None),
    ("not utf-8", b'{"custom_id": "\xff"}', "invalid_json_line", None),
    ("not an object", orjson.dumps([line()]), "invalid_request", None),
    ("no custom_id", orjson.dumps(line(custom_id=_DROP)), "missing_required_parameter", "custom_id"),
    ("no method", orjson.dumps(line(method=_DROP)), "missing_required_parameter", "method"),
    ("no url", orjson.dumps(line(url=_DROP)), "missing_required_parameter", "url"),
    ("no body", orjson.dumps(line(body=_DROP)), "missing_required_parameter", "body"),
    ("unknown field", orjson.dumps(line(model="fast")), "unknown_parameter", "model"),
    ("custom_id a number", orjson.dumps(line(custom_id=7)), "invalid_custom_id", "custom_id"),
    ("custom_id empty", orjson.dumps(line(custom_id="")), "invalid_custom_id", "custom_id"),
    ("custom_id too long", orjson.dumps(line(custom_id="x" * (MAX_ID + 1))), "invalid_custom_id", "custom_id"),  # noqa: E501
    ("GET", orjson.dumps(line(method="GET")), "invalid_method", "method"),
    ("other url", orjson.dumps(line(url="/v1/" + SECRET)), "invalid_url", "url"),
    ("body a string", orjson.dumps(line(body=SECRET)), "invalid_body", "body"),
    ("streamed", orjson.dumps(line(body={"model": "fast", "stream": True})), "invalid_body", "body"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "code", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_line_is_an_error_entry(raw: bytes, code: str, param: str | None) -> None:
    checked = LineChecker().check(12, raw)
    assert isinstance(checked, LineError)
    assert (checked.code, checked.param, checked.line) == (code, param, 12)
    assert "line 12" in checked.message
    assert SECRET not in checked.message  # a line's text is prompt text
    # OpenAI's BatchError (a batch's errors.data) and an error-file entry.
    assert checked.batch_error() == {"code": code, "message": checked.message, "param": param, "line": 12}
    entry = checked.error_entry("batch_req_1")
    assert entry == {
        "id": "batch_req_1",
        "custom_id": checked.custom_id,
        "response": None,
        "error": {"code": code, "message": checked.message},
    }


def test_the_error_entry_keeps_a_usable_custom_id() -> None:
    checked = LineChecker().check(2, orjson.dumps(line(custom_id="mine", method="PUT")))
    assert isinstance(checked, LineError) and checked.error_entry("e")["custom_id"] == "mine"
    unusable = LineChecker().check(2, orjson.dumps(line(custom_id=["x"])))
    assert isinstance(unusable, LineError) and unusable.error_entry("e")["custom_id"] is None


def test_custom_ids_are_unique_within_a_file() -> None:
    checker = LineChecker()
    assert isinstance(checker.check(1, orjson.dumps(line(custom_id="a"))), BatchLine)
    assert isinstance(checker.check(2, orjson.dumps(line(custom_id="b"))), BatchLine)
    again = checker.check(5, orjson.dumps(line(custom_id="a")))
    assert isinstance(again, LineError)
    assert again.code == "duplicate_custom_id" and "line 1" in again.message and again.custom_id == "a"
    # A line refused for another reason does not claim its id; another file starts afresh.
    assert isinstance(checker.check(6, orjson.dumps(line(custom_id="c", method="GET"))), LineError)
    assert isinstance(checker.check(7, orjson.dumps(line(custom_id="c"))), BatchLine)
    assert isinstance(LineChecker().check(1, orjson.dumps(line(custom_id="a"))), BatchLine)


def test_a_batch_endpoint_restricts_the_url() -> None:
    checker = LineChecker("/v1/embeddings")
    wrong = checker.check(1, orjson.dumps(line()))
    assert isinstance(wrong, LineError) and wrong.code == "invalid_url" and "/v1/embeddings" in wrong.message
    assert isinstance(checker.check(2, orjson.dumps(line(custom_id="e", url="/v1/embeddings"))), BatchLine)
    with pytest.raises(ValueError):
        LineChecker("/v1/models")


# ---- the JSONL check uploads stream through --------------------------------------------------------------


def jsonl(*lines: dict[str, Any] | bytes) -> bytes:
    return b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines)


def run(data: bytes, cuts: list[int], max_line_bytes: int = 1 << 20) -> JsonlCheck:
    check = JsonlCheck(max_line_bytes)
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        check.feed(data[start:cut])
        start = cut
    check.finish()
    return check


FILE = (
    jsonl(
        line(custom_id="1"),
        b"",
        b"   ",
        line(custom_id="2", method="GET"),
        line(custom_id="1"),
        line(custom_id="3", url="/v1/embeddings"),
    )
    + b'{"custom_id": "4", "method": "POST", "url": "/v1/responses", "body": {}}\r'
)  # CRLF-ended, no final LF


@given(st.lists(st.integers(0, len(FILE)), max_size=12))
def test_the_verdict_does_not_depend_on_how_the_upload_is_chunked(cuts: list[int]) -> None:
    inside = any(0 < c < len(FILE) and FILE[c - 1 : c] != b"\n" for c in cuts)
    event("split inside a line" if inside else "split between lines only")
    check = run(FILE, cuts)
    assert (check.lines, check.invalid_lines) == (5, 2)  # blank lines skipped; GET and the duplicate


def test_a_file_that_is_not_jsonl_is_refused_with_its_line() -> None:
    with pytest.raises(InvalidRequest, match="line 3 is not valid JSON") as refused:
        run(jsonl(line(), line(custom_id="2"), b"custom_id,method\n" + SECRET.encode()), [5, 40])
    assert refused.value.param == "file" and SECRET not in refused.value.message
    with pytest.raises(InvalidRequest, match="no lines"):
        run(b"\n \n", [])
    with pytest.raises(InvalidRequest, match="line 1 is not valid JSON"):
        run(b"\x00\x01binary\xff", [])


def test_a_line_longer_than_the_bound_is_refused_before_it_ends() -> None:
    check = JsonlCheck(2048)
    check.feed(jsonl(line()))
    with pytest.raises(InvalidRequest, match=r"line 2 .* files.max_line_bytes \(2048 bytes\)"):
        for _ in range(100):  # one endless line: refused once it passes the bound, not at its end
            check.feed(b"x" * 1000)


def test_a_byte_order_mark_is_allowed() -> None:
    assert run(b"\xef\xbb\xbf" + jsonl(line()), [1]).lines == 1
