"""Root of Switchboard's exception tree and the errors a backend may raise.

Every class carries `status_code`, `openai_type`, `code` and `retryable` as class attributes, so the
mapping to HTTP lives in the classes themselves. `gateway/errors.py` draws the whole tree and renders it.
Messages never contain API keys or prompt text; they name the setting to change.
"""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base of every error Switchboard renders as an OpenAI error envelope."""

    status_code: int = 500
    openai_type: str = "api_error"
    code: str = "internal_error"
    retryable: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()  # response headers the gateway adds to this error

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


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

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
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
