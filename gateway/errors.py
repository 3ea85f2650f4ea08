"""The gateway's error tree and its one renderer to the OpenAI error envelope.

SwitchboardError (backends/errors.py)          500 api_error            internal_error
├── BackendError                               502 api_error            upstream_error        retryable
│   ├── BackendRateLimited                     429 rate_limit_error     upstream_rate_limited retryable
│   ├── BackendUnavailable                     503 api_error            upstream_unavailable  retryable
│   ├── BackendTimeout                         504 api_error            upstream_timeout      retryable
│   ├── BackendBadResponse                     502 api_error            upstream_bad_response retryable
│   ├── BackendMisconfigured                   502 api_error            upstream_misconfigured retryable
│   └── BackendRejected                        400 invalid_request_error upstream_rejected_request
└── GatewayError
    ├── InvalidRequest                         400 invalid_request_error invalid_request
    │   ├── UnsupportedParameter               400 invalid_request_error unsupported_parameter
    │   └── PreviousResponseNotFound           400 invalid_request_error previous_response_not_found
    ├── AuthenticationFailed                   401 authentication_error  invalid_api_key
    ├── PermissionDenied                       403 permission_error      model_not_allowed
    │   └── AdminOnly                          403 permission_error      admin_only
    ├── NotFound                               404 invalid_request_error not_found
    │   └── ModelNotFound                      404 invalid_request_error model_not_found
    ├── PayloadTooLarge                        413 invalid_request_error payload_too_large
    ├── RateLimited                            429 rate_limit_error      rate_limit_exceeded
    │   └── BudgetExceeded                     429 insufficient_quota    insufficient_quota
    ├── ServiceUnavailable                     503 api_error             service_unavailable
    │   ├── NoHealthyDeployment                503 api_error             no_healthy_deployment
    │   ├── NoLiveEdgeNode                     503 api_error             no_live_edge_node
    │   ├── DeadlineUnmeetable                 503 api_error             deadline_unmeetable
    │   ├── LimiterUnavailable                 503 api_error             limiter_unavailable
    │   └── ReportTimedOut                     503 api_error             report_timeout
    └── AllBackendsFailed                      status of the last cause; all causes in the message
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from backends.errors import (
    BackendBadResponse,
    BackendError,
    BackendMisconfigured,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    SwitchboardError,
)

__all__ = [
    "SwitchboardError",
    "BackendError",
    "BackendRateLimited",
    "BackendUnavailable",
    "BackendTimeout",
    "BackendBadResponse",
    "BackendRejected",
    "BackendMisconfigured",
    "GatewayError",
    "InvalidRequest",
    "UnsupportedParameter",
    "PreviousResponseNotFound",
    "NoEligibleDeployment",
    "SensitiveDataRefused",
    "NoHealthyDeployment",
    "NoLiveEdgeNode",
    "LimiterUnavailable",
    "ReportTimedOut",
    "AuthenticationFailed",
    "PermissionDenied",
    "AdminOnly",
    "NotFound",
    "ModelNotFound",
    "PayloadTooLarge",
    "RateLimited",
    "BudgetExceeded",
    "ServiceUnavailable",
    "AllBackendsFailed",
    "error_body",
    "ALL_ERROR_CLASSES",
]


class GatewayError(SwitchboardError):
    """Raised by the gateway itself."""


class InvalidRequest(GatewayError):
    status_code = 400
    openai_type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class PreviousResponseNotFound(InvalidRequest):
    """`previous_response_id` names no stored response of the caller's team (OpenAI answers 400 too)."""

    code = "previous_response_not_found"


class NoEligibleDeployment(InvalidRequest):
    """Routing found no deployment that may serve this request (privacy floor, capabilities, limits)."""

    code = "no_eligible_deployment"


class AuthenticationFailed(GatewayError):
    status_code = 401
    openai_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    openai_type = "permission_error"
    code = "model_not_allowed"


class AdminOnly(PermissionDenied):
    code = "admin_only"


class SensitiveDataRefused(PermissionDenied):
    code = "sensitive_data_blocked"


class NotFound(GatewayError):
    status_code = 404
    openai_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status_code = 413
    openai_type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(GatewayError):
    status_code = 429
    openai_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExceeded(RateLimited):
    openai_type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailable(GatewayError):
    status_code = 503
    openai_type = "api_error"
    code = "service_unavailable"


class NoHealthyDeployment(ServiceUnavailable):
    """Deployments would be eligible but are down (circuit open); privacy never falls back to a lower tier."""

    code = "no_healthy_deployment"


class NoLiveEdgeNode(ServiceUnavailable):
    """The request may only be served at the edge (floor `edge`) and no edge node that may serve it is
    connected; it is never sent to a less private tier instead."""

    code = "no_live_edge_node"


class DeadlineUnmeetable(ServiceUnavailable):
    """Every deployment that may serve the request (privacy floor and the rest) is predicted to miss its
    deadline (`max_latency_ms`): refused now rather than queued past it, and never sent to a lower tier."""

    code = "deadline_unmeetable"


class LimiterUnavailable(ServiceUnavailable):
    """The limit store did not answer in time and limits fail closed."""

    code = "limiter_unavailable"


class ReportTimedOut(ServiceUnavailable):
    """A usage report ran past `reports.timeout_s` and was stopped."""

    code = "report_timeout"


class AllBackendsFailed(GatewayError):
    """Every candidate failed. Takes status, type and code from the last cause; lists every cause."""

    def __init__(self, causes: Sequence[tuple[str, SwitchboardError]]) -> None:
        last = causes[-1][1]
        self.status_code = last.status_code
        self.openai_type = last.openai_type
        self.code = last.code
        self.retryable = last.retryable
        self.causes = list(causes)
        self.retry_after_s = getattr(last, "retry_after_s", None)
        if len(causes) == 1:
            message = f"backend `{causes[0][0]}` failed: {last.message}"
        else:
            parts = "; ".join(f"`{name}`: {err.message}" for name, err in causes)
            message = f"all {len(causes)} attempts failed: {parts}"
        super().__init__(message)


ALL_ERROR_CLASSES: tuple[type[SwitchboardError], ...] = (
    SwitchboardError,
    BackendError,
    BackendRateLimited,
    BackendUnavailable,
    BackendTimeout,
    BackendBadResponse,
    BackendMisconfigured,
    BackendRejected,
    GatewayError,
    InvalidRequest,
    UnsupportedParameter,
    PreviousResponseNotFound,
    NoEligibleDeployment,
    AuthenticationFailed,
    PermissionDenied,
    AdminOnly,
    SensitiveDataRefused,
    NotFound,
    ModelNotFound,
    PayloadTooLarge,
    RateLimited,
    BudgetExceeded,
    ServiceUnavailable,
    NoHealthyDeployment,
    NoLiveEdgeNode,
    LimiterUnavailable,
    ReportTimedOut,
)


def error_body(exc: SwitchboardError) -> bytes:
    """The OpenAI envelope: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps(
        {
            "error": {
                "message": exc.message,
                "type": exc.openai_type,
                "param": exc.param,
                "code": exc.code,
            }
        }
    )
