"""The pipeline's own request value: what every endpoint's translator turns its wire body into.

A `GatewayRequest` is frozen and knows no wire format. Its `call` is what backends are sent, a `ChatRequest`
or an `EmbeddingRequest` (with the public model name; dispatch swaps in each deployment's upstream name).
`Hints` carry what the request's headers may ask of routing and the cache; they only ever narrow what the
caller's team allows. `Clock` is the one source
of time the pipeline reads, so tests can run dispatch and routing on a fake one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from backends.base import ChatRequest, EmbeddingRequest
from gateway.errors import InvalidRequest
from gateway.records import KeyIdentity
from gateway.telemetry.base import AttemptMark

PRIVACY_HEADER = "x-switchboard-privacy"
PREFERENCES_HEADER = "x-switchboard-preferences"  # JSON, same shape as the `switchboard` body field
SITE_HEADER = "x-switchboard-site"  # `plant-7`: only deployments labelled site=plant-7
LABELS_HEADER = "x-switchboard-labels"  # `site=plant-7,region=eu`: only deployments with all of these
CACHE_HEADER = "x-switchboard-cache"  # request: on|off; response: hit|miss|skip
_LABEL_TEXT = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Hints:
    """What a request's headers ask of routing and the cache (never widening what its team allows)."""

    privacy: str | None = None
    preferences: str | None = None
    site: str | None = None
    labels: str | None = None
    cache_control: str | None = None
    cache_opt: str | None = None  # x-switchboard-cache: on | off
    traceparent: str | None = None  # W3C trace context: a traced request's span joins the caller's trace

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Hints:
        return cls(*(headers.get(name) for name in _HINT_HEADERS))

    @classmethod
    def from_asgi(cls, raw: Iterable[tuple[bytes, bytes]]) -> Hints:
        """`from_headers` over an ASGI scope's header list (lower-case names; the first of repeated ones
        wins, as in Starlette's `Headers`) in one pass. Most requests send none of these: `NO_HINTS`."""
        found: list[str | None] | None = None
        for name, value in raw:
            i = _HINT_INDEX.get(name)
            if i is not None:
                if found is None:
                    found = [None] * len(_HINT_HEADERS)
                if found[i] is None:
                    found[i] = value.decode("latin-1")
        return NO_HINTS if found is None else cls(*found)

    def required_labels(self) -> dict[str, str]:
        """The labels every deployment must carry, from `x-switchboard-labels` and `x-switchboard-site`."""
        wanted: dict[str, str] = {}
        if self.labels is None and self.site is None:
            return wanted  # neither header sent (most requests)
        for pair in (self.labels or "").split(","):
            if not pair.strip():
                continue
            key, sep, value = (part.strip() for part in pair.partition("="))
            if not sep or not _LABEL_TEXT.match(key) or not _LABEL_TEXT.match(value):
                raise InvalidRequest(
                    f"header {LABELS_HEADER} must be comma-separated key=value pairs, e.g. "
                    "site=plant-7,region=eu",
                    param=LABELS_HEADER,
                )
            wanted[key] = value
        if self.site is not None:
            site = self.site.strip()
            if not _LABEL_TEXT.match(site):
                raise InvalidRequest(
                    f"header {SITE_HEADER} must be one site name, e.g. plant-7", param=SITE_HEADER
                )
            if wanted.get("site", site) != site:
                raise InvalidRequest(
                    f"headers {SITE_HEADER} and {LABELS_HEADER} ask for different sites", param=SITE_HEADER
                )
            wanted["site"] = site
        return wanted

    def preferences_field(self, body_field: Mapping[str, Any] | None) -> object:
        """The body field wins; the header is read only when the body has none."""
        if body_field is not None or self.preferences is None:
            return body_field
        try:
            return orjson.loads(self.preferences)
        except orjson.JSONDecodeError:
            raise InvalidRequest(
                f"header {PREFERENCES_HEADER} must be a JSON object like the `switchboard` body field",
                param=PREFERENCES_HEADER,
            ) from None


NO_HINTS = Hints()
# The headers `Hints` reads, in field order.
_HINT_HEADERS = (
    PRIVACY_HEADER,
    PREFERENCES_HEADER,
    SITE_HEADER,
    LABELS_HEADER,
    "cache-control",
    CACHE_HEADER,
    "traceparent",
)
_HINT_INDEX = {name.encode("latin-1"): i for i, name in enumerate(_HINT_HEADERS)}

Call = ChatRequest | EmbeddingRequest  # what a backend is sent: a chat completion or an embeddings call


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a batch item may run (gateway/batch/placement.py): it only narrows the team's policy.
    `ignore`: backends left out (cloud while self-hosted capacity has room); `order`: backends tried first
    (cloud, once the completion window nears its end)."""

    ignore: frozenset[str] = frozenset()
    order: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayRequest:
    """One request on its way through the pipeline, whichever API it came in by."""

    endpoint: str  # ledger and metrics label, e.g. "chat.completions"
    call: Call  # what a backend is sent; `call.model` is the public model name
    identity: KeyIdentity
    received_at: dt.datetime  # UTC, for the ledger row
    stream: bool = False
    hints: Hints = NO_HINTS
    preferences: Mapping[str, Any] | None = None  # the body's routing preferences, if the API has them
    cacheable: bool = True  # False: this endpoint's answers are never cached
    batch_id: str | None = None  # an item of this `/v1/batches` batch: its row is priced at batch prices
    placement: Placement | None = None  # a batch item's capacity class (None: routing alone decides)

    @property
    def model(self) -> str:
        return self.call.model

    @property
    def request_id(self) -> str:
        return self.call.request_id


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the HTTP edge knows of a request before its translator reads the body."""

    identity: KeyIdentity
    request_id: str
    received_at: dt.datetime
    hints: Hints = NO_HINTS
    timeout_s: float = 600.0  # server.request_timeout_s
    headers: tuple[tuple[str, str], ...] = ()  # those its translator names in `forwarded_headers`, if sent

    def gateway_request(
        self, endpoint: str, call: Call, *, stream: bool = False, preferences: Mapping[str, Any] | None = None
    ) -> GatewayRequest:
        """The pipeline's request for `call`, arrived as this context says: what every translator builds."""
        return GatewayRequest(
            endpoint=endpoint,
            call=call,
            identity=self.identity,
            received_at=self.received_at,
            stream=stream,
            hints=self.hints,
            preferences=preferences,
        )


@dataclass(slots=True)
class Timing:
    """A request's stopwatch. Mutable on purpose: dispatch adds the time spent awaiting backends."""

    start_s: float
    request_id: str
    upstream_s: float = 0.0
    attempts: list[AttemptMark] | None = None  # each attempt's deployment, times, outcome: kept for a tracer

    def elapsed_ms(self, now_s: float | None = None) -> float:
        return ((time.perf_counter() if now_s is None else now_s) - self.start_s) * 1000


@dataclass(frozen=True, slots=True)
class Clock:
    """Monotonic seconds (`time.perf_counter`'s clock, which Timing uses too) and a sleep on that clock."""

    now_s: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


SYSTEM_CLOCK = Clock()
