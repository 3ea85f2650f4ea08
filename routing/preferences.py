"""Per-request routing preferences: parse the `switchboard` body field, and fold it into the team's policy.

Invariant: a request can only narrow what its team allows. `narrow` takes the smaller of every cap, the union
of every exclusion and the stricter of every switch; `only` from a request is checked on top of the team's
(by `routing.scoring`), never instead of it. `sort` and `order` change ranking, never eligibility.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import TypeVar

from routing.snapshot import NO_PREFERENCES, MaxPrice, RoutePolicy, RoutePreferences, SortBy

FIELD = "switchboard"
_KNOWN = (
    "order",
    "only",
    "ignore",
    "sort",
    "require_parameters",
    "allow_fallbacks",
    "max_price",
    "max_latency_ms",
    "max_ttft_ms",
)
_Cap = TypeVar("_Cap", Decimal, float)
_PRICE_KEYS = {
    "prompt": "prompt_usd_per_mtok",
    "completion": "completion_usd_per_mtok",
    "request": "request_usd",
}


def _names(raw: object, path: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(n, str) and n for n in raw):
        raise ValueError(f"{path}: expected a list of deployment or backend names, got {raw!r:.80}")
    return tuple(raw)


def _bool(raw: object, path: str) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"{path}: expected true or false, got {raw!r:.80}")
    return raw


def _number(raw: object, path: str, *, positive: bool = False) -> Decimal:
    ok = isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw)
    if not ok or raw < 0 or (positive and raw == 0):  # type: ignore[operator]
        want = "a number > 0" if positive else "a number >= 0"
        raise ValueError(f"{path}: expected {want}, got {raw!r:.80}")
    return Decimal(str(raw))


def _sort(raw: object, path: str) -> SortBy:
    if raw not in tuple(SortBy):
        raise ValueError(f"{path}: expected one of {', '.join(SortBy)}, got {raw!r:.80}")
    return SortBy(str(raw))


def _max_price(raw: object, path: str) -> MaxPrice:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected an object with any of {', '.join(_PRICE_KEYS)}, got {raw!r:.80}")
    unknown = sorted(set(raw) - set(_PRICE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown field `{unknown[0]}`; known: {', '.join(_PRICE_KEYS)}")
    return MaxPrice(**{_PRICE_KEYS[k]: _number(v, f"{path}.{k}") for k, v in raw.items()})


def parse_preferences(raw: object, field: str = FIELD) -> RoutePreferences:
    """The `switchboard` field of a request body as `RoutePreferences`; ValueError names the bad field."""
    if raw is None:
        return NO_PREFERENCES
    if not isinstance(raw, Mapping):
        raise ValueError(f"{field}: expected an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_KNOWN))
    if unknown:
        raise ValueError(f"{field}: unknown field `{unknown[0]}`; known: {', '.join(_KNOWN)}")
    got: dict[str, object] = {}
    for key, value in raw.items():
        path = f"{field}.{key}"
        if key in ("order", "only", "ignore"):
            names = _names(value, path)
            got[key] = names if key == "order" else frozenset(names)
        elif key in ("require_parameters", "allow_fallbacks"):
            got[key] = _bool(value, path)
        elif key == "sort":
            got[key] = _sort(value, path)
        elif key == "max_price":
            got[key] = _max_price(value, path)
        else:
            got[key] = float(_number(value, path, positive=True))
    return RoutePreferences(**got)  # type: ignore[arg-type]


def smaller(team: _Cap | None, request: _Cap | None) -> _Cap | None:
    """The tighter of two optional caps (None: no cap)."""
    if team is None:
        return request
    return team if request is None else min(team, request)


def narrow(policy: RoutePolicy, prefs: RoutePreferences) -> RoutePolicy:
    """The team's policy with one request's preferences folded in; never wider than `policy`."""
    if prefs is NO_PREFERENCES or prefs == NO_PREFERENCES:
        return policy
    cap = prefs.max_price
    return dataclasses.replace(
        policy,
        objective=prefs.sort.objective if prefs.sort is not None else policy.objective,
        max_latency_ms=smaller(policy.max_latency_ms, prefs.max_latency_ms),
        max_ttft_ms=smaller(policy.max_ttft_ms, prefs.max_ttft_ms),
        max_usd_per_request=smaller(policy.max_usd_per_request, cap.request_usd),
        max_input_usd_per_mtok=smaller(policy.max_input_usd_per_mtok, cap.prompt_usd_per_mtok),
        max_output_usd_per_mtok=smaller(policy.max_output_usd_per_mtok, cap.completion_usd_per_mtok),
        require_parameters=policy.require_parameters or prefs.require_parameters is True,
        allow_fallbacks=policy.allow_fallbacks and prefs.allow_fallbacks is not False,
        ignore=policy.ignore | prefs.ignore,
        order=prefs.order or policy.order,
    )
