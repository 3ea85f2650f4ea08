"""Values that cross gateway modules: the usage record, key identity (with its limits) and team policy.

A `UsageRecord` holds counts, cost and ids, never prompt or completion text. Money is integer micro-dollars.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

# The endpoint of rows written before the ledger had an `endpoint` column (migration 0006; old spill lines).
LEGACY_ENDPOINT = "chat.completions"


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
    endpoint: str  # the API that was called, e.g. "chat.completions" (GatewayRequest.endpoint)
    cache_hit: bool = False
    cost_saved_micro_usd: int = 0  # a cache hit: what the original answer cost (cost_micro_usd is then 0)
    privacy_class: str | None = None  # floor and detector kinds, e.g. `internal:email`
    route_reason: str | None = None  # why routing chose this backend
    attempts: int = 0  # backend attempts made (0: refused before any)
    route_candidates: str | None = None  # JSON: ranked candidates with their score terms
    batch_id: str | None = None  # an item of this `/v1/batches` batch (priced at batch prices)
    owned_micro_usd: int = 0  # its share of owned capacity for chargeback; cost_micro_usd is cloud money


BUDGET_PERIODS = ("day", "month")  # a UTC day or calendar month: the values of limits.base.BudgetPeriod


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """A key's spend limit per period, in micro-dollars; `soft_limit_micro_usd` only alerts."""

    period: str  # "day" | "month"
    limit_micro_usd: int
    soft_limit_micro_usd: int | None = None

    def __post_init__(self) -> None:
        if self.period not in BUDGET_PERIODS:
            raise ValueError(f"budget period {self.period!r} is not one of: {', '.join(BUDGET_PERIODS)}")
        if self.limit_micro_usd <= 0:
            raise ValueError(f"budget limit must be > 0 micro-USD, not {self.limit_micro_usd}")
        soft = self.soft_limit_micro_usd
        if soft is not None and not 0 < soft <= self.limit_micro_usd:
            raise ValueError(
                f"soft budget limit ({soft} micro-USD) must be > 0 and at most the limit "
                f"({self.limit_micro_usd} micro-USD)"
            )


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What a valid API key resolves to. `models` is None when the key has no allow-list of its own."""

    key_id: str
    team: str
    display_prefix: str
    models: frozenset[str] | None
    expires_at: dt.datetime | None
    revoked: bool
    limit_requests: int | None = None  # per `limits.window_s`; None: the team's key_requests, if any
    limit_tokens: int | None = None
    budget: KeyBudget | None = None


@dataclass(frozen=True, slots=True)
class TeamPolicy:
    name: str
    models: frozenset[str]  # public model names; "*" means every configured model
