"""Spend per team or key over a budget period, summed from the SQL ledger; money in integer micro-dollars.

The ledger is the source of truth for budgets: Redis counters are rebuilt from `spent_micro_usd` at start-up
and when a period begins. Periods are UTC days ("2026-11-05") or calendar months ("2026-11"), half-open
[start, end): a row stamped exactly at a period's end belongs to the next one. Each call is one indexed
query (usage(team, created_at) or usage(key_id, created_at)). Sync: call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal, InvalidOperation

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.limits.base import period_end_ms
from gateway.store.db import usage

MICRO_PER_USD = 1_000_000
_PERIOD_KEY = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?$")


def period_bounds(period_key: str) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) in aware UTC of "YYYY-MM-DD" (a UTC day) or "YYYY-MM" (a UTC calendar month)."""
    match = _PERIOD_KEY.match(period_key)
    if match is None:
        raise ValueError(f"period key {period_key!r} is neither YYYY-MM-DD (a day) nor YYYY-MM (a month)")
    year, month, day = match.groups()
    try:
        start = dt.datetime(int(year), int(month), int(day or 1), tzinfo=dt.UTC)
    except ValueError as exc:
        raise ValueError(f"period key {period_key!r} is not a real date: {exc}") from None
    end = dt.datetime.fromtimestamp(period_end_ms(period_key) / 1000, dt.UTC)
    return start, end


def spent_micro_usd(engine: Engine, scope: str, period_key: str) -> int:
    """SUM(usage.cost_micro_usd) of `scope` ("team:<name>" or "key:<key id>") within the period."""
    kind, sep, name = scope.partition(":")
    if not sep or not name or kind not in ("team", "key"):
        raise ValueError(f"spend scope {scope!r} is neither team:<name> nor key:<key id>")
    start, end = period_bounds(period_key)
    column = usage.c.team if kind == "team" else usage.c.key_id
    query = sa.select(sa.func.coalesce(sa.func.sum(usage.c.cost_micro_usd), 0)).where(
        column == name, usage.c.created_at >= start, usage.c.created_at < end
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())  # PostgreSQL's SUM(bigint) is numeric: int() it


def usd_to_micro(usd: Decimal | str | int) -> int:
    """Whole micro-dollars of a USD amount; ValueError for non-numbers or finer than a micro-dollar."""
    try:
        value = Decimal(usd)
    except InvalidOperation:
        raise ValueError(f"{usd!r} is not a USD amount (write e.g. 12.50)") from None
    if not value.is_finite():
        raise ValueError(f"{usd!r} is not a USD amount (write e.g. 12.50)")
    micro = value * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise ValueError(
            f"{value:f} USD has more than 6 decimal places (the ledger counts whole micro-dollars)"
        )
    return int(micro)


def micro_to_usd_text(micro_usd: int) -> str:
    """Micro-dollars as a plain USD string with at least two decimals: 12_500_000 -> "12.50"."""
    text = f"{Decimal(micro_usd).scaleb(-6):.6f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"
