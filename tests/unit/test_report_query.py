"""Report queries from text, the AUTO rule, the SQLite percentile interpolation, reference prices and
rendering; no I/O."""

from __future__ import annotations

import datetime as dt
import math
import random
from decimal import Decimal
from typing import Any

import orjson
import pytest
from rich.console import Console

from gateway.config import parse_config
from gateway.errors import InvalidRequest
from gateway.reports import (
    Dimension,
    ReferencePrice,
    Report,
    ReportQuery,
    ReportRow,
    SavingsReport,
    SavingsRow,
    ServedBy,
    Source,
    parse_query,
)
from gateway.reports.costs import busy_cost_micro_usd
from gateway.reports.query import RAW_ONLY_MAX_SPAN, RollupState, ceil_hour, floor_hour, raw_suffices
from gateway.reports.render import to_csv, to_json, to_table
from gateway.reports.savings import reference_price
from gateway.reports.sql import interpolate
from tests.support.ledger_gen import percentile_cont

UTC = dt.UTC
T = dt.datetime(2030, 1, 31, 15, tzinfo=UTC)


# ---- parse_query ---------------------------------------------------------------------------------------


def test_group_by_is_comma_separated_case_and_space_tolerant() -> None:
    q = parse_query(" Team, model ,DAY", None, None)
    assert q.group_by == (Dimension.TEAM, Dimension.MODEL, Dimension.DAY)
    assert parse_query(None, None, None).group_by == ()
    assert parse_query("", None, None).group_by == ()
    every = parse_query("team,key,model,backend,privacy,endpoint,batch,day,hour", None, None)
    assert every.group_by == tuple(Dimension)


def test_unknown_group_by_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_query("team,region", None, None)
    assert err.value.param == "group_by"
    assert "`region`" in err.value.message
    assert "team, key, model, backend, privacy, endpoint, batch, day, hour" in err.value.message
    with pytest.raises(InvalidRequest, match="listed twice"):
        parse_query("team,team", None, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-31", dt.datetime(2030, 1, 31, tzinfo=UTC)),
        ("2030-01-31T15:00:00Z", T),
        ("2030-01-31T15:00:00z", T),
        ("2030-01-31T15:00", T),  # naive: UTC
        ("2030-01-31 15:00:00", T),
        ("2030-01-31T17:00:00+02:00", T),
        ("2030-01-31T15:00:00.250000Z", T + dt.timedelta(milliseconds=250)),
    ],
)
def test_times_parse_to_aware_utc(text: str, expected: dt.datetime) -> None:
    q = parse_query(None, text, None)
    assert q.since == expected
    assert q.since is not None and q.since.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "text", ["yesterday", "2030-13-01", "31/01/2030", "2030-1-31", "20300131", "2030-01-31T25:00"]
)
@pytest.mark.parametrize("param", ["since", "until"])
def test_a_malformed_time_says_which_format_to_use(text: str, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_query(None, **{"since": None, "until": None, param: text})
    assert err.value.param == param
    assert "YYYY-MM-DD" in err.value.message and "ISO 8601" in err.value.message
    assert text in err.value.message


@pytest.mark.parametrize(("since", "until"), [("2030-02-01", "2030-01-01"), ("2030-01-01", "2030-01-01")])
def test_since_must_be_before_until(since: str, until: str) -> None:
    with pytest.raises(InvalidRequest, match="exclusive") as err:
        parse_query("team", since, until)
    assert err.value.param == "until"


def test_filters_and_source() -> None:
    q = parse_query("team", "2030-01-01", "2030-02-01", team="research", model="", source="RAW")
    assert (q.team, q.model, q.endpoint, q.source) == ("research", None, None, Source.RAW)
    assert parse_query("endpoint", None, None, endpoint="embeddings").endpoint == "embeddings"
    assert parse_query(None, None, None, endpoint="").endpoint is None  # `endpoint=`: no filter, as model
    assert q.until == dt.datetime(2030, 2, 1, tzinfo=UTC)
    with pytest.raises(InvalidRequest, match="auto, raw, rollup") as err:
        parse_query("team", None, None, source="cache")
    assert err.value.param == "source"


def test_error_rate() -> None:
    assert row(requests=8, errors=2).error_rate == 0.25
    assert row(requests=0, errors=0).error_rate == 0.0


# ---- the AUTO rule -------------------------------------------------------------------------------------

STATE = RollupState(watermark=dt.datetime(2030, 6, 1, tzinfo=UTC), pruned_before=None)


def auto(since: dt.datetime | None, until: dt.datetime | None) -> ReportQuery:
    return ReportQuery(group_by=(), since=since, until=until)


def test_auto_reads_raw_rows_alone_when_that_is_cheap_and_complete() -> None:
    assert raw_suffices(auto(None, None), None)  # no rollup has run
    assert raw_suffices(auto(T, T + RAW_ONLY_MAX_SPAN), STATE)
    assert not raw_suffices(auto(T, T + RAW_ONLY_MAX_SPAN + dt.timedelta(seconds=1)), STATE)
    assert not raw_suffices(auto(None, T), STATE)
    assert raw_suffices(auto(STATE.watermark - dt.timedelta(minutes=5), None), STATE)  # all still pending
    pruned = RollupState(STATE.watermark, pruned_before=T + dt.timedelta(hours=1))
    assert not raw_suffices(auto(T, T + dt.timedelta(hours=2)), pruned)  # its raw rows are gone
    assert raw_suffices(auto(T + dt.timedelta(hours=1), T + dt.timedelta(hours=2)), pruned)


def test_hour_rounding() -> None:
    mid = T + dt.timedelta(minutes=1, microseconds=1)
    assert (floor_hour(mid), ceil_hour(mid)) == (T, T + dt.timedelta(hours=1))
    assert floor_hour(T) == ceil_hour(T) == T


# ---- percentiles ---------------------------------------------------------------------------------------


def test_reference_percentile_cont() -> None:
    assert percentile_cont([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile_cont([1.0, 2.0, 3.0, 4.0], 0.95) == pytest.approx(3.85)
    assert percentile_cont([7.0], 0.95) == 7.0
    assert percentile_cont([], 0.5) is None


def test_sqlite_interpolation_equals_percentile_cont_bit_for_bit() -> None:
    rng = random.Random(11)
    for n in range(1, 300):
        values = sorted(round(rng.lognormvariate(5, 1.2), 3) for _ in range(n))
        for q in (0.5, 0.95):
            first = math.floor(q * (n - 1))
            hi = values[first + 1] if first + 1 < n else None
            assert interpolate(q, n, values[first], hi) == percentile_cont(values, q)


# ---- savings prices ------------------------------------------------------------------------------------


def config(**reports: Any) -> Any:
    return parse_config(
        {
            "backends": {
                "gpu0": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "usd_per_hour": "2.40"},
                "cloud": {"kind": "cloud", "provider": "openai"},
            },
            "models": {
                "small": {"backend": "gpu0"},
                "big": {"backend": "cloud", "input_usd_per_mtok": "2.5", "output_usd_per_mtok": 10},
                "listed": {"backend": "cloud", "upstream_model": "gpt-x", "output_usd_per_mtok": 4},
            },
            "reports": reports,
        }
    )


def no_list_price(_provider: str, _model: str) -> tuple[Decimal, Decimal] | None:
    return None


def test_reference_prices_in_order_of_preference() -> None:
    explicit = reference_price(
        config(reference_model="big", reference_input_usd_per_mtok="1", reference_output_usd_per_mtok="3")
    )
    assert (explicit.input_usd_per_mtok, explicit.output_usd_per_mtok) == (Decimal(1), Decimal(3))
    from_model = reference_price(config(reference_model="big"), no_list_price)
    assert (from_model.input_usd_per_mtok, from_model.output_usd_per_mtok) == (Decimal("2.5"), Decimal(10))
    assert "models.big" in from_model.source
    seen: list[tuple[str, str]] = []

    def list_price(provider: str, model: str) -> tuple[Decimal, Decimal]:
        seen.append((provider, model))
        return Decimal("0.5"), Decimal("1.5")

    listed = reference_price(config(reference_model="listed"), list_price)
    assert seen == [("openai", "gpt-x")]
    assert (listed.input_usd_per_mtok, listed.output_usd_per_mtok) == (
        Decimal("0.5"),
        Decimal(4),
    )  # config wins


@pytest.mark.parametrize(
    ("reports", "fragment"),
    [
        ({}, "set reports.reference_model"),
        ({"reference_input_usd_per_mtok": "1"}, "set both"),
        ({"reference_model": "small"}, "no price is known for reports.reference_model `small`"),
        ({"reference_model": "listed"}, "input_usd_per_mtok and output_usd_per_mtok under models.listed"),
    ],
)
def test_missing_reference_price_says_what_to_set(reports: dict[str, str], fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        reference_price(config(**reports), no_list_price)


def test_busy_cost() -> None:
    assert busy_cost_micro_usd(3_600_000.0, Decimal("2.40")) == 2_400_000
    assert busy_cost_micro_usd(1.5, Decimal("3.6")) == 2  # 1.5 micro-USD rounds half up
    assert busy_cost_micro_usd(0.0, Decimal(5)) == 0


# ---- rendering -----------------------------------------------------------------------------------------


def row(group: tuple[str | None, ...] = (), **kw: Any) -> ReportRow:
    figures: dict[str, Any] = dict.fromkeys(
        ("requests", "errors", "client_closed", "prompt_tokens", "completion_tokens", "cost_micro_usd"), 0
    )
    figures |= dict.fromkeys(("cache_hits", "cost_saved_micro_usd", "fallbacks"), 0)
    figures |= dict.fromkeys(("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms"), None)
    return ReportRow(group=group, **{**figures, **kw})


def usage_report_value() -> Report:
    query = parse_query("team,key", "2030-01-01", None)
    rows = (
        row(("research", "k1"), requests=4, errors=1, cost_micro_usd=12_500_000, latency_p50_ms=12.3456),
        row(("research", None), requests=1, cost_micro_usd=1, cost_saved_micro_usd=7),
    )
    totals = row((), requests=5, errors=1, cost_micro_usd=12_500_001, cost_saved_micro_usd=7)
    return Report(query=query, rows=rows, totals=totals, source="mixed", percentiles_exact=False)


def test_usage_json_keeps_exact_money_and_null_groups() -> None:
    body = orjson.loads(to_json(usage_report_value()))
    assert body["query"]["since"] == "2030-01-01T00:00:00Z" and body["query"]["group_by"] == ["team", "key"]
    assert body["query"]["endpoint"] is None
    first, second = body["rows"]
    assert (first["team"], first["key"], first["cost_usd"], first["cost_micro_usd"]) == (
        "research",
        "k1",
        "12.50",
        12_500_000,
    )
    assert first["error_rate"] == 0.25 and first["latency_p50_ms"] == 12.3456
    assert second["key"] is None and second["cost_usd"] == "0.000001"
    assert "team" not in body["totals"] and body["totals"]["cost_saved_micro_usd"] == 7
    assert (body["source"], body["percentiles_exact"]) == ("mixed", False)


def test_usage_csv_and_table() -> None:
    lines = to_csv(usage_report_value()).splitlines()
    assert lines[0].split(",")[:5] == ["team", "key", "requests", "errors", "error_rate"]
    assert lines[1].startswith("research,k1,4,1,0.250000,0,0,0,12.50,")
    assert lines[1].endswith(",12.346,,,")
    assert lines[2].startswith("research,,1,0,")
    console = Console(record=True, width=250)
    console.print(to_table(usage_report_value()))
    text = console.export_text()
    assert "(none)" in text and "total" in text and "12.50" in text and "approximate" in text


def test_savings_renders() -> None:
    ref = ReferencePrice(Decimal("2.5"), Decimal(10), "config: models.big prices")
    rows = (
        SavingsRow(("gpu0",), ServedBy.SELF_HOSTED, 3, 1000, 500, 7_200_000.0, 4_800_000, 7_500),
        SavingsRow(("cloud",), ServedBy.CACHE, 1, 10, 10, 0.0, 0, 125),
    )
    totals = SavingsRow((), ServedBy.ALL, 4, 1010, 510, 7_200_000.0, 4_800_000, 7_625)
    rep = SavingsReport(
        query=parse_query("team", None, None),
        group_by=(Dimension.BACKEND,),
        since=None,
        until=T,
        reference=ref,
        rows=rows,
        totals=totals,
        source="rollup",
    )
    body = orjson.loads(to_json(rep))
    assert body["reference"] == {
        "input_usd_per_mtok": "2.5",
        "output_usd_per_mtok": "10",
        "source": "config: models.big prices",
    }
    assert body["rows"][0]["backend"] == "gpu0" and body["rows"][0]["saved_micro_usd"] == 7_500 - 4_800_000
    assert body["rows"][0]["saved_usd"] == "-4.7925" and body["totals"]["served_by"] == "all"
    assert to_csv(rep).splitlines()[1] == "gpu0,self_hosted,3,1000,500,2.000,4.80,0.0075,-4.7925"
    console = Console(record=True, width=200)
    console.print(to_table(rep))
    text = console.export_text()
    assert "self_hosted" in text and "total" in text and "-4.7925" in text
