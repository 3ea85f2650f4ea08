"""Every error class renders the OpenAI envelope with its own status, type and code."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import (
    ALL_ERROR_CLASSES,
    AllBackendsFailed,
    BackendRateLimited,
    BackendTimeout,
    error_body,
)
from gateway.http.app import error_response


@pytest.mark.parametrize("cls", ALL_ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_renders_envelope(cls: type) -> None:
    exc = cls("change server.max_body_bytes")
    body = orjson.loads(error_body(exc))
    assert body == {
        "error": {
            "message": "change server.max_body_bytes",
            "type": cls.openai_type,
            "param": None,
            "code": cls.code,
        }
    }
    resp = error_response(exc)
    assert resp.status_code == cls.status_code
    assert 400 <= resp.status_code < 600


def test_status_codes_are_distinct_where_they_matter() -> None:
    by_name = {c.__name__: c.status_code for c in ALL_ERROR_CLASSES}
    assert by_name["InvalidRequest"] == 400
    assert by_name["AuthenticationFailed"] == 401
    assert by_name["PermissionDenied"] == 403
    assert by_name["ModelNotFound"] == 404
    assert by_name["PayloadTooLarge"] == 413
    assert by_name["RateLimited"] == 429
    assert by_name["BackendBadResponse"] == 502
    assert by_name["BackendUnavailable"] == 503
    assert by_name["BackendTimeout"] == 504


def test_all_backends_failed_collects_every_cause() -> None:
    err = AllBackendsFailed(
        [("a", BackendTimeout("slow")), ("b", BackendRateLimited("busy", retry_after_s=3))]
    )
    assert err.status_code == 429 and err.code == "upstream_rate_limited"
    assert "`a`: slow" in err.message and "`b`: busy" in err.message
    assert error_response(err).headers["retry-after"] == "3"


def test_logged_details_keep_the_diagnosis_but_no_request_text() -> None:
    from backends.errors import loggable_detail

    secret = "my planted prompt text that must never reach a log line"
    echoed = (
        f'litellm.BadRequestError: Invalid user message={{"role": "user", "content": "{secret}"}} at index 0'
    )
    assert loggable_detail(echoed) == "litellm.BadRequestError: Invalid user message={…} at index 0"
    assert secret not in loggable_detail(f"Invalid value: '{secret}' for content")
    assert secret not in loggable_detail(f'messages=["{secret}"]')
    refused = (
        "ConnectError: [Errno 111] Connection refused to 127.0.0.1:18500 (key sk-abcdefghijklmnopqrstuv)"
    )
    assert (
        loggable_detail(refused)
        == "ConnectError: [Errno 111] Connection refused to 127.0.0.1:18500 (key [redacted])"
    )
