"""Root of Switchboard's exception tree and the errors a backend may raise.

Every class carries `status_code`, `openai_type`, `code` and `retryable` as class attributes, so the
mapping to HTTP lives in the classes themselves. `gateway/errors.py` draws the whole tree and renders it.
Messages never contain API keys or prompt text; they name the setting to change. A backend error's
`message` is what clients see: which backend and what kind of failure. Upstream text, addresses and
library exception text go in `detail`, which the gateway logs and never renders.
"""

from __future__ import annotations

import re


class SwitchboardError(Exception):
    """Base of every error Switchboard renders as an OpenAI error envelope."""

    status_code: int = 500
    openai_type: str = "api_error"
    code: str = "internal_error"
    retryable: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()  # response headers the gateway adds to this error

    def __init__(self, message: str, *, param: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.detail = detail  # for the log only: upstream text, addresses, library messages


class BackendError(SwitchboardError):
    """A backend failed to serve a request. Raised only by `backends/`."""

    status_code = 502
    openai_type = "api_error"
    code = "upstream_error"
    retryable = True


class BackendRateLimited(BackendError):
    status_code = 429
    openai_type = "rate_limit_error"
    code = "upstream_rate_limited"
    retryable = True

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message, detail=detail)
        self.retry_after_s = retry_after_s


class BackendUnavailable(BackendError):
    """Connection refused/reset, DNS failure, upstream 5xx."""

    status_code = 503
    code = "upstream_unavailable"
    retryable = True


class BackendTimeout(BackendError):
    status_code = 504
    code = "upstream_timeout"
    retryable = True


class BackendBadResponse(BackendError):
    """The upstream answered with something we cannot parse, or cut a stream."""

    status_code = 502
    code = "upstream_bad_response"
    retryable = True


class BackendRejected(BackendError):
    """The upstream refused the request itself (4xx other than 401/403/429): retrying elsewhere won't help."""

    status_code = 400
    openai_type = "invalid_request_error"
    code = "upstream_rejected_request"
    retryable = False


class BackendMisconfigured(BackendError):
    """Credentials refused or settings wrong: the admin must fix config, clients cannot."""

    status_code = 502
    code = "upstream_misconfigured"
    retryable = True


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_HOST_PORT = re.compile(
    r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-f:]+\]|localhost|[a-z0-9-]+(?:\.[a-z0-9-]+)+):\d{2,5}\b", re.I
)
_IP = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_SECRET = re.compile(
    r"\b(?:sk|pk|rk|key|tok|xox[abpr]|gh[pousr])[-_][A-Za-z0-9_-]{8,}\b|\b[A-Za-z0-9_-]{32,}\b"
)
_REJECTED_MAX_CHARS = 200


def rejected_message(said: str, upstream: str) -> str:
    """A client-facing message for an upstream that refused the request itself: what it said (often how to
    fix the request, e.g. a context limit), without addresses, URLs or anything shaped like a secret."""
    text = _SECRET.sub(
        "[redacted]", _IP.sub("[address]", _HOST_PORT.sub("[address]", _URL.sub("[url]", upstream)))
    )
    text = " ".join(text.split())[:_REJECTED_MAX_CHARS]
    return f"{said}: {text}" if text else said


_JSONISH = re.compile(r"\{.*\}|\[\s*[{\"'].*\]", re.S)
_LONG_QUOTED = re.compile(r"(['\"]).{40,}?\1", re.S)
_LOGGED_MAX_CHARS = 500


def loggable_detail(detail: str) -> str:
    """A backend error's detail as the gateway logs it. Upstream and library messages may quote the request
    back (a rejected message, a schema); structures and long quoted strings are elided, so the log keeps the
    diagnosis (status, error type, short reasons) but no prompt text. Addresses stay: operators need them."""
    text = _LONG_QUOTED.sub(r"\1…\1", _JSONISH.sub("{…}", detail))
    return _SECRET.sub("[redacted]", " ".join(text.split()))[:_LOGGED_MAX_CHARS]
