"""Budget periods and USD/micro-dollar conversion (store/spend.py), and `KeyBudget` validation; no I/O."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from gateway.limits.base import BudgetPeriod, period_end_ms, period_key
from gateway.records import BUDGET_PERIODS, KeyBudget, KeyIdentity
from gateway.store.spend import micro_to_usd_text, period_bounds, usd_to_micro


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "start", "end"),
    [
        ("2030-02", utc(2030, 2, 1), utc(2030, 3, 1)),
        ("2028-02", utc(2028, 2, 1), utc(2028, 3, 1)),
        ("2030-12", utc(2030, 12, 1), utc(2031, 1, 1)),
        ("2030-12-31", utc(2030, 12, 31), utc(2031, 1, 1)),
        ("2028-02-29", utc(2028, 2, 29), utc(2028, 3, 1)),
        ("2030-03-09", utc(2030, 3, 9), utc(2030, 3, 10)),
    ],
)
def test_period_bounds(key: str, start: dt.datetime, end: dt.datetime) -> None:
    assert period_bounds(key) == (start, end)
    assert start.tzinfo is dt.UTC and end.tzinfo is dt.UTC


def test_period_bounds_agree_with_limits_period_keys() -> None:
    for at in [utc(2030, 2, 1), utc(2030, 2, 28, 23, 59, 59), utc(2031, 1, 1), utc(2028, 2, 29, 12)]:
        now_ms = at.timestamp() * 1000
        for period in BudgetPeriod:
            key = period_key(period, now_ms)
            start, end = period_bounds(key)
            assert start <= at < end
            assert end.timestamp() * 1000 == period_end_ms(key)


@pytest.mark.parametrize("key", ["2030", "2030-2", "2030-13", "2030-02-30", "2030-02-01T00", "x", ""])
def test_bad_period_keys(key: str) -> None:
    with pytest.raises(ValueError, match="period key"):
        period_bounds(key)


@pytest.mark.parametrize(
    ("usd", "micro"),
    [
        ("12.50", 12_500_000),
        (Decimal("0.000001"), 1),
        ("1e3", 1_000_000_000),
        (7, 7_000_000),
        ("-1", -1_000_000),  # the sign is the caller's to check (KeyBudget refuses <= 0)
        ("9223372036854.775807", 2**63 - 1),
    ],
)
def test_usd_to_micro(usd: str | Decimal | int, micro: int) -> None:
    assert usd_to_micro(usd) == micro


@pytest.mark.parametrize("usd", ["0.0000001", "abc", "NaN", "Infinity", ""])
def test_usd_to_micro_refuses(usd: str) -> None:
    with pytest.raises(ValueError, match="USD"):
        usd_to_micro(usd)


@pytest.mark.parametrize(
    ("micro", "text"),
    [(12_500_000, "12.50"), (12_000_000, "12.00"), (1, "0.000001"), (1_234_567, "1.234567"), (0, "0.00")],
)
def test_micro_to_usd_text_round_trips(micro: int, text: str) -> None:
    assert micro_to_usd_text(micro) == text
    assert usd_to_micro(text) == micro


def test_key_budget_validation() -> None:
    assert tuple(BudgetPeriod) == BUDGET_PERIODS
    assert KeyBudget("day", 1, 1).soft_limit_micro_usd == 1
    for args, message in [
        (("week", 1), "period 'week'"),
        (("month", 0), "must be > 0"),
        (("month", 10, 11), "at most the limit"),
        (("month", 10, 0), "at most the limit"),
    ]:
        with pytest.raises(ValueError, match=message):
            KeyBudget(*args)  # type: ignore[arg-type]


def test_key_identity_limits_default_to_none() -> None:
    identity = KeyIdentity("k", "t", "sk-sb-abc", None, None, False)
    assert (identity.limit_requests, identity.limit_tokens, identity.budget) == (None, None, None)
