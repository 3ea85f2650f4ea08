"""Values that cross gateway modules: the usage record, key identity and team policy.

A `UsageRecord` holds counts, cost and ids, never prompt or completion text. Cost is integer micro-dollars.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum


class RequestStatus(StrEnum):
    OK = "ok"
    ERROR = "error"  # the gateway or a backend answered with an error
    CLIENT_CLOSED = "client_closed"  # the client went away before the answer was complete


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    created_at: dt.datetime  # UTC, when the gateway received the request
    team: str
    key_id: str | None  # the api_keys.id, never the key
    requested_model: str
    backend: str | None  # config name of the backend that served (or last failed)
    served_model: str | None  # what the upstream said it ran
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    latency_ms: float
    ttft_ms: float | None
    status: RequestStatus
    http_status: int
    error_type: str | None  # the error `code`, e.g. "upstream_timeout"
    stream: bool
    cache_hit: bool = False
    privacy_class: str | None = None  # floor and detector kinds, e.g. `internal:email`
    route_reason: str | None = None  # why routing chose this backend
    attempts: int = 0  # backend attempts made (0: refused before any)
    route_candidates: str | None = None  # JSON: ranked candidates with their score terms


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What a valid API key resolves to. `models` is None when the key has no allow-list of its own."""

    key_id: str
    team: str
    display_prefix: str
    models: frozenset[str] | None
    expires_at: dt.datetime | None
    revoked: bool


@dataclass(frozen=True, slots=True)
class TeamPolicy:
    name: str
    models: frozenset[str]  # public model names; "*" means every configured model
