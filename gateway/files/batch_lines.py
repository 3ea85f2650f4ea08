"""One line of a batch input file, checked: a request to run, or the error entry it becomes instead.

A batch input file is JSONL; each line is `{"custom_id", "method": "POST", "url", "body"}`. `LineChecker`
checks the lines of one file in order (a `custom_id` must be unique within its file). A bad line never fails
the whole batch: it becomes a `LineError`, which renders as OpenAI's `BatchError` (`{code, message, param,
line}`) and as an entry of the batch's error file (`{id, custom_id, response: null, error}`).
Messages name line numbers and fields, never values: a line's text is prompt text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

BATCH_URLS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
MAX_CUSTOM_ID_CHARS = 512
_FIELDS = ("custom_id", "method", "url", "body")


@dataclass(frozen=True, slots=True)
class BatchLine:
    """A line that is a well-formed request; its body is checked by the endpoint's translator when it runs."""

    line: int  # 1-based line number in the file
    custom_id: str
    url: str
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    code: str
    message: str
    param: str | None = None
    custom_id: str | None = None  # when the line has a usable one

    def batch_error(self) -> dict[str, Any]:
        """OpenAI's `BatchError`, as listed in a batch's `errors.data`."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}

    def error_entry(self, entry_id: str) -> dict[str, Any]:
        """One line of the batch's error file (`entry_id`: the batch request id, `batch_req_...`)."""
        return {
            "id": entry_id,
            "custom_id": self.custom_id,
            "response": None,
            "error": {"code": self.code, "message": self.message},
        }


class LineChecker:
    """Checks the lines of one file, in order. `endpoint`: the batch's endpoint, which every line's `url`
    must name (None: any of `BATCH_URLS`)."""

    def __init__(self, endpoint: str | None = None) -> None:
        if endpoint is not None and endpoint not in BATCH_URLS:
            raise ValueError(f"{endpoint!r} is not a batch endpoint")
        self._endpoint = endpoint
        self._seen: dict[str, int] = {}  # custom_id -> the line that used it first

    def check(self, line: int, raw: bytes | str) -> BatchLine | LineError:
        """Parse and check one line of text."""
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return LineError(line, "invalid_json_line", f"line {line} is not valid JSON (or not UTF-8)")
        return self.check_value(line, value)

    def check_value(self, line: int, value: object) -> BatchLine | LineError:
        """Check one line already parsed from JSON."""
        if not isinstance(value, dict):
            return LineError(line, "invalid_request", f"line {line} is not a JSON object")
        custom_id = value.get("custom_id")
        usable_id = custom_id if isinstance(custom_id, str) and _id_ok(custom_id) else None
        error = self._field_error(line, value, usable_id)
        if error is not None:
            return error
        assert usable_id is not None  # _field_error checked it
        first = self._seen.setdefault(usable_id, line)
        if first != line:
            return LineError(
                line,
                "duplicate_custom_id",
                f"line {line}: this custom_id is already used by line {first}; each line needs its own",
                "custom_id",
                usable_id,
            )
        return BatchLine(line, usable_id, value["url"], value["body"])

    def _field_error(self, line: int, value: dict[str, Any], custom_id: str | None) -> LineError | None:
        def error(code: str, message: str, param: str) -> LineError:
            return LineError(line, code, f"line {line}: {message}", param, custom_id)

        for name in _FIELDS:
            if name not in value:
                return error("missing_required_parameter", f"missing required field `{name}`", name)
        unknown = sorted(str(k)[:64] for k in value if k not in _FIELDS)
        if unknown:
            return error(
                "unknown_parameter",
                f"unknown field `{unknown[0]}` (a line has: {', '.join(_FIELDS)})",
                unknown[0],
            )
        if custom_id is None:
            return error(
                "invalid_custom_id",
                f"`custom_id` must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters",
                "custom_id",
            )
        if value["method"] != "POST":
            return error("invalid_method", '`method` must be "POST"', "method")
        allowed = (self._endpoint,) if self._endpoint is not None else BATCH_URLS
        if value["url"] not in allowed:
            what = "the batch's endpoint" if self._endpoint is not None else "one of"
            return error("invalid_url", f"`url` must be {what}: {', '.join(allowed)}", "url")
        body = value["body"]
        if not isinstance(body, dict):
            return error("invalid_body", "`body` must be a JSON object (the request body)", "body")
        if body.get("stream") not in (None, False):
            return error(
                "invalid_body", "`body.stream` must be false or absent: batches do not stream", "body"
            )
        return None


def _id_ok(custom_id: str) -> bool:
    return 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS
