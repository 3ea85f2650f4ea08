"""What `/openapi.json` publishes: the error envelope, response schemas, the statuses each route can answer.

Invariant: a route lists every status it can answer, each with its schema; errors are the OpenAI envelope.
FastAPI's generated 422 never appears (validation errors are 400s in the envelope, see app.py), and each
operation names the key it needs (a team key, the admin key, or none). Schemas of success bodies list the
fields clients rely on and allow more, so adding a field is not a breaking change.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, RootModel

from gateway.translate.anthropic_render import ModelPage

TEAM_KEY, ADMIN_KEY, METRICS_TOKEN = "teamKey", "adminKey", "metricsToken"
TAG_TEAM, TAG_ADMIN, TAG_OPS = "team API", "admin", "operations"

_STATUS_TEXT = {
    400: "invalid request (a bad parameter or body; `param` names it)",
    401: "missing, malformed, unknown, expired or revoked key",
    403: "the key may not do this (a team key on an admin route, a model the team may not use)",
    404: "no such model, team, key or token",
    413: "request body larger than server.max_body_bytes",
    429: "rate limit, budget or report quota reached; see the Retry-After header",
    500: "internal error (the gateway log has details)",
    502: "every backend failed or answered badly",
    503: "no healthy deployment, the database, Redis or the limiter is unreachable, or a report timed out",
    504: "the backend did not answer in time",
    529: "overloaded: no healthy deployment or the upstream is unavailable (Anthropic's status for a 503)",
}


def _iso_text(value: object) -> object:
    if not isinstance(value, str | dt.datetime):
        raise ValueError("must be an ISO 8601 date-time string, e.g. 2030-01-31T15:00:00Z")
    return value


# A request body's date-time as the schema publishes it: text. pydantic alone also takes a number as a Unix
# time, so `"expires_at": 154262974333323` made a token expiring in the year 6858 (found by schemathesis).
IsoDateTime = Annotated[dt.datetime, BeforeValidator(_iso_text)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error, on every route: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


def errors(*statuses: int, envelope: type[BaseModel] | None = None) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entries for the error statuses a route can answer. Every route can answer 400 (an
    unknown query parameter, app.refuse_unknown_query) and 500. `envelope`: an API's own (Anthropic's)."""
    model = envelope or ErrorEnvelope
    return {s: {"model": model, "description": _STATUS_TEXT[s]} for s in sorted({*statuses, 400, 500})}


def ok(model: type[BaseModel] | None, text: str, *, status: int = 200, media: str | None = None) -> dict:
    """A success entry: a JSON `model`, or a plain `media` type with a string body."""
    entry: dict[str, Any] = {"description": text}
    if model is not None:
        entry["model"] = model
    if media is not None:
        entry["content"] = {media: {"schema": {"type": "string"}}}
    return {status: entry}


SSE_EVENT = {  # one server-sent event of a streamed answer
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON chunk of the stream, the error envelope (the stream ends), or [DONE]",
        }
    },
}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- success bodies ----------------------------------------------------------------------------------------


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class AnyModelList(RootModel[ModelList | ModelPage]):
    """OpenAI's list, or Anthropic's page when the request sends `anthropic-version`."""


class Health(_Open):
    status: Literal["ok"]


class LedgerCounts(_Open):
    queued: int
    written: int
    spilled: int
    replayed: int
    rejected: int
    lost: int
    db_down: bool


class Readiness(_Open):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"]
    redis: Literal["ok", "unreachable", "not configured"]
    ledger: LedgerCounts


class Listing(_Open):
    data: list[dict[str, Any]]


class Team(_Open):
    name: str
    models: list[str] | None
    created_at: str


class KeyLimits(_Open):
    requests: int | None
    tokens: int | None


class Key(_Open):
    key_id: str
    team: str
    name: str
    display_prefix: str
    models: list[str] | None
    created_at: str
    expires_at: str | None
    limits: KeyLimits
    budget: dict[str, Any] | None


class CreatedKey(Key):
    plaintext: str  # shown in this answer only


class Revoked(_Open):
    revoked: str


class RouteExplanation(_Open):
    model: str
    team: str
    privacy: dict[str, Any]
    policy: dict[str, Any]
    tokens: dict[str, Any]
    candidates: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    reason: str | None
    privacy_verdict: Any
    error: dict[str, Any] | None


class UsageReport(_Open):
    """A usage report (`/v1/usage`, `/admin/reports/usage`) or a savings report (`/admin/reports/savings`)."""


class EdgeToken(_Open):
    id: str
    name: str
    labels: dict[str, str]
    state: Literal["active", "revoked", "expired"]
    created_at: str
    expires_at: str | None
    revoked_at: str | None


class NodeListing(_Open):
    data: list[dict[str, Any]]
    enabled: bool


# ---- the document ------------------------------------------------------------------------------------------

_SECURITY_SCHEMES = {
    TEAM_KEY: {"type": "http", "scheme": "bearer", "description": "a team key, `sk-sb-...`"},
    ADMIN_KEY: {"type": "http", "scheme": "bearer", "description": "the admin key (server.admin_key_env)"},
    METRICS_TOKEN: {"type": "http", "scheme": "bearer", "description": "server.metrics_token_env"},
}
_NEEDS: dict[str, list[dict[str, list[str]]]] = {
    TAG_TEAM: [{TEAM_KEY: []}],
    TAG_ADMIN: [{ADMIN_KEY: []}],
}
_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def finish(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document made true to the gateway: no 422s, security schemes, `/metrics`'s two keys."""
    for path, ops in doc.get("paths", {}).items():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
            needs = next((_NEEDS[t] for t in op.get("tags", ()) if t in _NEEDS), None)
            if path == "/metrics":
                needs = [{ADMIN_KEY: []}, {METRICS_TOKEN: []}]
            if needs is not None:
                op["security"] = needs
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in _VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    doc["components"]["securitySchemes"] = _SECURITY_SCHEMES
    return doc


def model_examples(doc: dict[str, Any], schema_name: str, models: Iterable[str]) -> None:
    """List the configured model names as examples of `model` in request body `schema_name`."""
    names = list(models)
    prop = (
        doc.get("components", {}).get("schemas", {}).get(schema_name, {}).get("properties", {}).get("model")
    )
    if prop is not None and names:
        prop["examples"] = names
