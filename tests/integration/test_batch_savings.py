"""The savings report's batch line on SQLite and PostgreSQL: batch items' actual cost (busy time share on
owned capacity, the ledger's batch price on the cloud) against the same tokens at interactive cloud prices
(the serving cloud deployment's, or the cheapest cloud deployment the team's privacy floor allows).

Prices are chosen so every figure is a whole number of micro-dollars: gpu0 costs 3.6 USD an hour, one
micro-dollar per busy millisecond; X USD per Mtok is X micro-dollars per token.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest
from sqlalchemy.engine import Engine

from gateway.config import Config, parse_config
from gateway.reports import parse_query, savings_report
from gateway.reports.batch_savings import BatchSavingsRow
from gateway.reports.render import to_json, to_table
from gateway.store.rollups import Rollup
from tests.support.ledger_gen import Row, insert_rows

T0 = dt.datetime(2030, 6, 1, 10, tzinfo=dt.UTC)
MIN = dt.timedelta(minutes=1)
X, Y = "batch_" + "a" * 32, "batch_" + "b" * 32


def config() -> Config:
    cloud = {"kind": "cloud", "provider": "openai"}
    return parse_config(
        {
            "backends": {
                "gpu0": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "usd_per_hour": "3.6"},
                "cloud": cloud,
                "cloud2": cloud,
            },
            "models": {
                "mixed": {
                    "deployments": [
                        {"backend": "gpu0", "input_usd_per_mtok": 0, "output_usd_per_mtok": 0},
                        {"backend": "cloud", "input_usd_per_mtok": "2.5", "output_usd_per_mtok": 10},
                        {"backend": "cloud2", "input_usd_per_mtok": 1, "output_usd_per_mtok": 4},
                    ]
                },
                "big": {
                    "backend": "cloud",
                    "input_usd_per_mtok": "2.5",
                    "output_usd_per_mtok": 10,
                    "batch_input_usd_per_mtok": "1.25",
                    "batch_output_usd_per_mtok": 5,
                },
            },
            "teams": {"a": {}, "b": {"privacy_floor": "internal"}},  # b may not use the cloud at all
            "reports": {"reference_input_usd_per_mtok": 3, "reference_output_usd_per_mtok": 12},
        }
    )


def row(i: int, team: str, model: str, backend: str, at: dt.datetime, latency_ms: float, **kw: Any) -> Row:
    prompt, completion = kw.pop("tokens")
    return {
        "request_id": f"bs-{i}",
        "created_at": at,
        "team": team,
        "key_id": None,
        "requested_model": model,
        "backend": backend,
        "served_model": None,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_micro_usd": 0,
        "latency_ms": latency_ms,
        "ttft_ms": None,
        "status": "ok",
        "http_status": 200,
        "error_type": None,
        "stream": False,
        "cache_hit": False,
        "privacy_class": None,
        "route_reason": None,
        "attempts": 1,
        "route_candidates": None,
        "cost_saved_micro_usd": 0,
        "written_at": at + dt.timedelta(seconds=1),
        "endpoint": "chat.completions",
        "batch_id": None,
        **kw,
    }


# gpu0's hour T0: 4 s busy, 6000 tokens; the batch items on it hold 1500 + 3000 of them (3 s of busy time).
LEDGER = [
    row(1, "a", "mixed", "gpu0", T0, 1000, tokens=(1000, 500), batch_id=X),
    row(2, "a", "mixed", "gpu0", T0 + 10 * MIN, 1000, tokens=(1000, 500)),  # interactive
    row(3, "b", "mixed", "gpu0", T0 + 20 * MIN, 2000, tokens=(3000, 0), batch_id=X),
    row(4, "a", "big", "cloud", T0 + 30 * MIN, 500, tokens=(1000, 0), cost_micro_usd=1250, batch_id=X),
    row(5, "a", "big", "cloud", T0 + 31 * MIN, 1, tokens=(500, 500), cache_hit=True, batch_id=Y),
    row(6, "a", "big", "cloud", T0 + 40 * MIN, 500, tokens=(0, 100), cost_micro_usd=500, batch_id=Y),
]
# Interactive prices: item 1 at cloud2's (cheaper than cloud's) 1000 + 2000; item 3's team may use no cloud:
# the reference price, 9000; item 4 at cloud's regular price, 2500; item 6, 1000; item 5 is a cache hit.
WANT = {
    X: BatchSavingsRow((X,), 3, 5000, 500, 3000.0, 3000 + 1250, 3000 + 9000 + 2500),
    Y: BatchSavingsRow((Y,), 1, 0, 100, 0.0, 500, 1000),
}


@pytest.fixture
def ledger(engine: Engine) -> Engine:
    insert_rows(engine, LEDGER)
    Rollup(engine, clock=lambda: T0 + dt.timedelta(days=1)).run_once()  # busy time comes from rollups
    return engine


def savings(engine: Engine, group_by: str | None = None, **kw: Any) -> Any:
    query = parse_query(group_by, T0.isoformat(), (T0 + dt.timedelta(hours=2)).isoformat(), **kw)
    return savings_report(engine, config(), query, list_price=lambda _p, _m: None)


@pytest.mark.parametrize("source", ["auto", "raw", "rollup"])
def test_batch_lines_per_batch_against_interactive_cloud_prices(ledger: Engine, source: str) -> None:
    report = savings(ledger, "batch", source=source)
    assert {r.group[0]: r for r in report.batch} == WANT
    total = report.batch_total
    assert total is not None and total.group == ()
    assert (total.requests, total.actual_micro_usd, total.interactive_micro_usd) == (4, 4750, 15500)
    assert total.saved_micro_usd == 15500 - 4750
    body = orjson.loads(to_json(report))["batch"]
    assert [r["batch"] for r in body["rows"]] == [X, Y]
    assert body["totals"]["saved_micro_usd"] == 10750 and body["totals"]["saved_usd"] == "0.01075"
    assert to_table(report).row_count == len(report.rows) + 1 + 3  # rows, total, two batches and theirs


def test_batch_line_in_total_unless_grouped_by_batch(ledger: Engine) -> None:
    report = savings(ledger)
    assert report.batch == ()
    assert report.batch_total is not None and report.batch_total.interactive_micro_usd == 15500


def test_batch_line_follows_the_filters(ledger: Engine) -> None:
    only_y = savings(ledger, "batch", batch=Y)
    assert only_y.batch == (WANT[Y],)
    team_a = savings(ledger, "batch", team="a")  # item 1 alone on gpu0: a quarter of the hour's busy time
    assert {r.group[0]: r for r in team_a.batch} == {
        X: BatchSavingsRow((X,), 2, 2000, 500, 1000.0, 1000 + 1250, 3000 + 2500),
        Y: WANT[Y],
    }
    none = savings(ledger, "batch", batch="interactive")
    assert none.batch == () and none.batch_total is not None and none.batch_total.requests == 0
