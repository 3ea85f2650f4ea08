"""Usage and savings reports on SQLite and PostgreSQL against a generated ledger with known totals.

Every grouping and filter must give exactly the sums the pure-Python reference computes, from raw rows,
from rollups and from both (AUTO); raw percentiles must equal `percentile_cont`, rollup percentiles must
stay within the histogram's stated error. Rows written after a rollup, pruned hours and late rows for
pruned hours must still be counted exactly once.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.config import Config, parse_config
from gateway.errors import InvalidRequest
from gateway.live import histogram
from gateway.reports import (
    Dimension,
    Report,
    ServedBy,
    Source,
    parse_query,
    savings_report,
    usage_report,
)
from gateway.reports.render import to_csv, to_json
from gateway.store.db import backend_busy_hourly
from gateway.store.rollups import Rollup
from tests.support.db import migrated_copy
from tests.support.ledger_gen import (
    START,
    Expected,
    LedgerSpec,
    Row,
    aggregate,
    generate_rows,
    insert_rows,
    percentile_cont,
    row_filter,
)

SPEC = LedgerSpec()
H = dt.timedelta(hours=1)
ROLLED_AT = START + dt.timedelta(days=30)  # the rollup's clock: long after every generated row was written
ALL_DIMS = tuple(d.value for d in Dimension)
GROUPINGS = [
    *[(d,) for d in ALL_DIMS],
    ("team", "model"),
    ("day", "backend"),
    ("team", "key", "privacy"),
    ("hour", "model", "privacy"),
    ("endpoint", "model"),
    ("day", "endpoint", "backend"),
    ("batch", "model"),
    ("hour", "batch", "team"),
    ALL_DIMS,
    (),
]
SOURCES = [s.value for s in Source]


@dataclass(frozen=True)
class Ledger:
    engine: Engine
    rows: list[Row]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """The generated ledger, loaded once per database and rolled up."""
    copy = migrated_copy(request, request.param, tmp_path_factory.mktemp("reports"))
    target = next(copy)
    eng = target.make_engine()
    rows = list(generate_rows(SPEC))
    insert_rows(eng, rows)
    Rollup(eng, clock=lambda: ROLLED_AT).run_once()
    yield Ledger(eng, rows)
    eng.dispose()
    next(copy, None)  # drops a PostgreSQL clone


def report(eng: Engine, group_by: tuple[str, ...], source: str, **kw: Any) -> Report:
    since, until = kw.pop("since", None), kw.pop("until", None)
    return usage_report(
        eng,
        parse_query(
            ",".join(group_by),
            None if since is None else since.isoformat(),
            None if until is None else until.isoformat(),
            source=source,
            **kw,
        ),
    )


def check(rep: Report, expected: dict[tuple[str | None, ...], Expected]) -> None:
    """Exact sums per group and in total; percentiles exact (raw) or within the histogram's error."""
    got = {r.group: r for r in rep.rows}
    assert sorted(got, key=str) == sorted(expected, key=str)
    total = Expected()
    for key, exp in expected.items():
        row = got[key]
        assert {f: getattr(row, f) for f in exp.sums()} == exp.sums(), key
        check_percentiles(rep, row, exp)
        for f, v in exp.sums().items():
            setattr(total, f, getattr(total, f) + v)
        total.latencies_ms += exp.latencies_ms
        total.ttfts_ms += exp.ttfts_ms
    assert {f: getattr(rep.totals, f) for f in total.sums()} == total.sums()
    assert rep.totals.group == ()
    check_percentiles(rep, rep.totals, total)


def check_percentiles(rep: Report, row: Any, exp: Expected) -> None:
    for values, names in (
        (exp.latencies_ms, ("latency_p50_ms", "latency_p95_ms")),
        (exp.ttfts_ms, ("ttft_p50_ms", "ttft_p95_ms")),
    ):
        for q, name in zip((0.5, 0.95), names, strict=True):
            got = getattr(row, name)
            if rep.percentiles_exact:
                assert got == percentile_cont(values, q), (row.group, name)
            else:
                assert within_histogram_error(got, values, q), (row.group, name, got)


def within_histogram_error(estimate: float | None, values: list[float], q: float) -> bool:
    """The estimate lies in the bucket of a value ranked next to q*(n-1), give or take the bucket's width
    (a factor RATIO; 0.5 ms absolute in the first bucket)."""
    if not values:
        return estimate is None
    assert estimate is not None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    lo = ordered[max(0, math.floor(position) - 1)]
    hi = ordered[min(len(ordered) - 1, math.ceil(position) + 1)]
    low = min(lo / histogram.RATIO, lo - histogram.LOW_MS)
    high = max(hi * histogram.RATIO, hi + histogram.LOW_MS)
    return low - 1e-9 <= estimate <= high + 1e-9


# ---- groupings and filters -----------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("group_by", GROUPINGS, ids=lambda g: "+".join(g) or "none")
def test_every_grouping_sums_exactly(ledger: Ledger, group_by: tuple[str, ...], source: str) -> None:
    rep = report(ledger.engine, group_by, source)
    check(rep, aggregate(ledger.rows, group_by))
    assert rep.percentiles_exact == (source == "raw")
    assert rep.source == ("raw" if source == "raw" else "rollup")


WINDOWS = {
    "whole-hours": dict(since=START + 5 * H, until=START + 30 * H),
    "mid-hour-ends": dict(
        since=START + 5 * H + dt.timedelta(minutes=17), until=START + dt.timedelta(hours=41.7)
    ),
    "since-only": dict(since=START + dt.timedelta(hours=20.5)),
    "until-only": dict(until=START + dt.timedelta(hours=33.25)),
    "inside-one-hour": dict(since=START + dt.timedelta(hours=3.1), until=START + dt.timedelta(hours=3.9)),
    "short": dict(since=START + dt.timedelta(hours=7.5), until=START + dt.timedelta(hours=19)),
    "team": dict(team="support"),
    "model": dict(model="claude-haiku", since=START + 2 * H),
    "team-model-window": dict(team="ops", model="smollm2", since=START + 24 * H, until=START + 48 * H),
    "endpoint": dict(endpoint="embeddings"),
    "team-endpoint-window": dict(
        team="research",
        endpoint="messages",
        since=START + 5 * H + dt.timedelta(minutes=40),
        until=START + 40 * H,
    ),
    "empty": dict(since=START + 100 * H, until=START + 200 * H),
    "interactive": dict(batch="interactive"),
    "any-batch-window": dict(
        batch="batch", since=START + 5 * H + dt.timedelta(minutes=10), until=START + 40 * H
    ),
    "one-batch-team": dict(batch=f"batch_{1:032x}", team="ops"),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize(
    "group_by",
    [("team", "model"), ("hour",), ("endpoint",), ("batch",)],
    ids=["team+model", "hour", "endpoint", "batch"],
)
def test_filters_select_exactly_their_rows(
    ledger: Ledger, window: str, source: str, group_by: tuple[str, ...]
) -> None:
    kw: dict[str, Any] = WINDOWS[window]
    rep = report(ledger.engine, group_by, source, **kw)
    check(rep, aggregate(ledger.rows, group_by, keep=row_filter(**kw)))


def test_boundary_rows_belong_to_the_hour_they_start(ledger: Ledger) -> None:
    on_hour = [r for r in ledger.rows if r["created_at"].minute == r["created_at"].second == 0]
    assert on_hour, "the generator puts rows exactly on hour boundaries"
    at = on_hour[0]["created_at"]
    for source in SOURCES:
        inside = report(ledger.engine, (), source, since=at, until=at + 2 * H).totals.requests
        before = report(ledger.engine, (), source, since=at - 2 * H, until=at).totals.requests
        keep_in, keep_before = row_filter(since=at, until=at + 2 * H), row_filter(since=at - 2 * H, until=at)
        assert inside == sum(map(keep_in, ledger.rows))
        assert before == sum(map(keep_before, ledger.rows))


def test_group_values_are_formatted(ledger: Ledger) -> None:
    rep = report(ledger.engine, ("day", "hour", "privacy", "key"), "auto")
    days = {r.group[0] for r in rep.rows}
    assert days == {"2030-03-01", "2030-03-02", "2030-03-03"}
    assert "2030-03-02T05:00Z" in {r.group[1] for r in rep.rows}
    assert {r.group[2] for r in rep.rows} == {None, "internal", "external", "edge", "external_zdr"}
    assert None in {r.group[3] for r in rep.rows}  # rows without a key


def test_batch_groups_are_batch_ids_and_interactive(ledger: Ledger) -> None:
    raw, rollup = (report(ledger.engine, ("batch",), source) for source in ("raw", "rollup"))
    batches = {f"batch_{i:032x}" for i in range(4)}
    assert {r.group[0] for r in raw.rows} == batches | {"interactive"}
    assert [(r.group, r.requests, r.cost_micro_usd) for r in raw.rows] == [
        (r.group, r.requests, r.cost_micro_usd) for r in rollup.rows
    ]
    interactive = report(ledger.engine, (), "rollup", batch="interactive").totals.requests
    batched = report(ledger.engine, (), "rollup", batch="batch").totals.requests
    assert interactive + batched == len(ledger.rows) and batched == sum(
        1 for r in ledger.rows if r["batch_id"]
    )


def test_a_bad_batch_filter_names_its_parameter() -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_query("batch", None, None, batch="not-a-batch")
    assert err.value.param == "batch" and "interactive" in err.value.message


def test_every_endpoint_is_a_group_and_raw_and_rollup_agree(ledger: Ledger) -> None:
    raw, rollup = (report(ledger.engine, ("endpoint", "team"), source) for source in ("raw", "rollup"))
    assert {r.group[0] for r in raw.rows} == set(SPEC.endpoints)
    assert raw.percentiles_exact and (rollup.source, rollup.percentiles_exact) == ("rollup", False)
    assert [(r.group, r.requests, r.cost_micro_usd, r.prompt_tokens) for r in raw.rows] == [
        (r.group, r.requests, r.cost_micro_usd, r.prompt_tokens) for r in rollup.rows
    ]
    one = report(ledger.engine, ("team",), "rollup", endpoint="chat.completions")
    assert one.totals.requests == sum(r.requests for r in raw.rows if r.group[0] == "chat.completions") > 0


def test_progress_counts_up_to_its_total(ledger: Ledger) -> None:
    seen: list[tuple[int, int]] = []
    query = parse_query("team", None, None, source="rollup")
    usage_report(ledger.engine, query, progress=lambda done, total: seen.append((done, total)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_json_and_csv_carry_the_exact_money(ledger: Ledger) -> None:
    rep = report(ledger.engine, ("team",), "raw")
    body = orjson.loads(to_json(rep))
    assert body["totals"]["cost_micro_usd"] == sum(r["cost_micro_usd"] for r in ledger.rows)
    assert Decimal(body["totals"]["cost_usd"]) * 1_000_000 == body["totals"]["cost_micro_usd"]
    assert [r["team"] for r in body["rows"]] == ["ops", "research", "support"]
    lines = to_csv(rep).splitlines()
    assert lines[0].startswith("team,requests,errors,error_rate")
    assert len(lines) == 1 + len(rep.rows)


# ---- rows written after a rollup, pruning, late rows ---------------------------------------------------


def sums(rep: Report) -> dict[str, int]:
    return {f: getattr(rep.totals, f) for f in Expected().sums()}


def expected_sums(rows: list[Row], **kw: Any) -> dict[str, int]:
    return aggregate(rows, (), keep=row_filter(**kw), keep_values=False).get((), Expected()).sums()


def test_auto_adds_rows_written_after_the_rollup(engine: Engine) -> None:
    first = list(generate_rows(LedgerSpec(rows=800)))
    insert_rows(engine, first)
    Rollup(engine, clock=lambda: ROLLED_AT).run_once()
    late_spec = LedgerSpec(rows=60, start=START + 10 * H, hours=2, seed=3, prefix="late")
    late = [{**r, "written_at": ROLLED_AT + dt.timedelta(minutes=5)} for r in generate_rows(late_spec)]
    insert_rows(engine, late)
    auto = report(engine, ("team", "hour"), "auto")
    check(auto, aggregate(first + late, ("team", "hour")))
    assert auto.source == "mixed"
    assert sums(report(engine, (), "rollup")) == expected_sums(first)  # the rollups lag until the next run
    Rollup(engine, clock=lambda: ROLLED_AT + 2 * H).run_once()
    again = report(engine, ("team", "hour"), "auto")
    check(again, aggregate(first + late, ("team", "hour")))
    assert again.source == "rollup"


def test_pruned_hours_come_from_rollups_and_late_rows_count_once(engine: Engine) -> None:
    rows = list(generate_rows(LedgerSpec(rows=800)))
    insert_rows(engine, rows)
    cutoff = START + 30 * H
    assert Rollup(engine, clock=lambda: cutoff + dt.timedelta(days=1)).prune(1) > 0
    everything = expected_sums(rows)
    assert sums(report(engine, (), "auto")) == everything
    assert sums(report(engine, (), "raw")) == expected_sums(rows, since=cutoff)
    short = dict(since=START + 2 * H, until=START + 5 * H)  # short, but pruned: must not be raw alone
    assert sums(report(engine, (), "auto", **short)) == expected_sums(rows, **short)

    late_spec = LedgerSpec(rows=40, start=START + 3 * H, hours=1, seed=5, prefix="late")
    written = cutoff + dt.timedelta(days=1, minutes=3)
    late = [{**r, "written_at": written} for r in generate_rows(late_spec)]
    insert_rows(engine, late)
    check(report(engine, ("hour", "model"), "auto"), aggregate(rows + late, ("hour", "model")))
    assert sums(report(engine, (), "rollup")) == everything
    Rollup(engine, clock=lambda: written + H).run_once()  # adds the late rows to the rollups, deletes them
    check(report(engine, ("hour", "model"), "auto"), aggregate(rows + late, ("hour", "model")))
    assert sums(report(engine, (), "raw")) == expected_sums(rows, since=cutoff)


# ---- savings -------------------------------------------------------------------------------------------

T0 = dt.datetime(2030, 5, 1, 10, tzinfo=dt.UTC)
MIN = dt.timedelta(minutes=1)


SAVINGS_BACKENDS: dict[str, Any] = {
    "gpu0": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "usd_per_hour": "3.6"},
    "cloud": {"kind": "cloud", "provider": "openai"},
}
SAVINGS_MODELS: dict[str, Any] = {
    "small": {"backend": "gpu0", "input_usd_per_mtok": 0, "output_usd_per_mtok": 0},
    "big": {"backend": "cloud", "input_usd_per_mtok": "2.5", "output_usd_per_mtok": 10},
    "listed": {"backend": "cloud", "upstream_model": "gpt-4o-mini"},
}


def savings_config(**reports: Any) -> Config:
    return parse_config(
        {
            "backends": SAVINGS_BACKENDS,
            "models": SAVINGS_MODELS,
            "teams": {"a": {}, "b": {}},
            "reports": reports or {"reference_model": "big"},
        }
    )


def served(
    i: int, team: str, backend: str, at: dt.datetime, latency_ms: float, tokens: tuple[int, int], **kw: Any
) -> Row:
    row = {
        "request_id": f"s-{i}",
        "created_at": at,
        "team": team,
        "key_id": f"k-{team}",
        "requested_model": "small" if backend == "gpu0" else "big",
        "backend": backend,
        "served_model": None,
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
        "cost_micro_usd": 0,
        "latency_ms": latency_ms,
        "ttft_ms": None,
        "status": "ok",
        "http_status": 200,
        "error_type": None,
        "stream": False,
        "endpoint": "chat.completions",
        "cache_hit": False,
        "privacy_class": None,
        "route_reason": None,
        "attempts": 1,
        "route_candidates": None,
        "cost_saved_micro_usd": 0,
        "written_at": at + dt.timedelta(seconds=1),
    }
    return {**row, **kw}


SAVINGS_LEDGER = [
    served(1, "a", "gpu0", T0, 600_000, (1000, 500)),  # hour 1: 10 min busy
    served(2, "b", "gpu0", T0 + 20 * MIN, 300_000, (3000, 1500)),  # hour 1: 5 min
    served(3, "a", "gpu0", T0 + 5 * MIN, 1, (200, 100), cache_hit=True, attempts=0),  # no busy time
    served(4, "a", "gpu0", T0 + 45 * MIN, 1000, (0, 0), status="error", http_status=502),  # 1 s
    served(5, "b", "cloud", T0 + 30 * MIN, 2000, (400, 200), cost_micro_usd=3000),  # not self-hosted
    served(6, "b", "cloud", T0 + 40 * MIN, 1, (1000, 1000), cache_hit=True, cost_saved_micro_usd=12_500),
    served(7, "a", "gpu0", T0 + 60 * MIN, 60_000, (100, 100), endpoint="completions"),  # hour 2: 1 min
    served(8, "b", "gpu0", T0 + 110 * MIN, 1_200_000, (400, 600)),  # hour 2: 10 min, hour 3: 10 min
]
# usd_per_hour 3.6 makes one busy millisecond one micro-dollar; reference: 2.5 and 10 micro-USD per token.
BUSY_MS = {T0: 901_000.0, T0 + H: 660_000.0, T0 + 2 * H: 600_000.0}


@pytest.fixture
def savings_db(engine: Engine) -> Engine:
    insert_rows(engine, SAVINGS_LEDGER)
    Rollup(engine, clock=lambda: T0 + dt.timedelta(days=1)).run_once()
    with engine.connect() as conn:
        b = backend_busy_hourly.c
        busy = {h: ms for h, ms in conn.execute(sa.select(b.hour, b.busy_ms).where(b.backend == "gpu0"))}
    assert busy == pytest.approx(BUSY_MS)
    return engine


def savings_rows(rep: Any) -> dict[tuple[Any, ...], tuple[int, int, int, int, int]]:
    return {
        (r.served_by, *r.group): (
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.actual_micro_usd,
            r.reference_micro_usd,
        )
        for r in rep.rows
    }


@pytest.mark.parametrize("source", SOURCES)
def test_savings_per_backend(savings_db: Engine, source: str) -> None:
    query = parse_query("model", T0.isoformat(), (T0 + 2 * H + 30 * MIN).isoformat(), source=source)
    rep = savings_report(savings_db, savings_config(), query)
    assert rep.group_by == (Dimension.BACKEND,)
    assert (rep.since, rep.until) == (T0, T0 + 3 * H)  # whole hours
    assert savings_rows(rep) == {
        (ServedBy.SELF_HOSTED, "gpu0"): (5, 4500, 2700, 2_161_000, 4500 * 5 // 2 + 2700 * 10),
        (ServedBy.CACHE, "cloud"): (1, 1000, 1000, 0, 12_500),
        (ServedBy.CACHE, "gpu0"): (1, 200, 100, 0, 1_500),
    }
    assert rep.totals.actual_micro_usd == 2_161_000
    assert rep.totals.saved_micro_usd == 38_250 + 12_500 + 1_500 - 2_161_000
    assert rep.rows[0].busy_ms == pytest.approx(sum(BUSY_MS.values()))


def test_savings_apportion_busy_time_to_teams_by_token_share(savings_db: Engine) -> None:
    rep = savings_report(savings_db, savings_config(), parse_query("team", None, None))
    # hour 1: tokens a 1800 (cache hit included), b 4500; hour 2: a 200, b 1000; hour 3 (no request starts
    # there) by the window's shares: a 2000, b 5500.
    busy_a = 901_000 * 1800 / 6300 + 660_000 * 200 / 1200 + 600_000 * 2000 / 7500
    busy_b = 901_000 * 4500 / 6300 + 660_000 * 1000 / 1200 + 600_000 * 5500 / 7500
    assert savings_rows(rep) == {
        (ServedBy.SELF_HOSTED, "a", "gpu0"): (3, 1100, 600, round(busy_a), 2750 + 6000),
        (ServedBy.SELF_HOSTED, "b", "gpu0"): (2, 3400, 2100, round(busy_b), 8500 + 21_000),
        (ServedBy.CACHE, "a", "gpu0"): (1, 200, 100, 0, 1_500),
        (ServedBy.CACHE, "b", "cloud"): (1, 1000, 1000, 0, 12_500),
    }
    assert rep.totals.actual_micro_usd == 2_161_000
    team_b = savings_report(savings_db, savings_config(), parse_query(None, None, None, team="b"))
    assert [(r.served_by, r.actual_micro_usd) for r in team_b.rows] == [
        (ServedBy.SELF_HOSTED, round(busy_b)),
        (ServedBy.CACHE, 0),
    ]


@pytest.mark.parametrize("source", SOURCES)
def test_savings_filtered_by_endpoint_share_busy_time_by_tokens(savings_db: Engine, source: str) -> None:
    query = parse_query("team", None, None, endpoint="completions", source=source)
    rep = savings_report(savings_db, savings_config(), query)
    # Request 7 alone: 200 of hour 2's 1200 gpu0 tokens; hour 3 (no request starts there) by its share of
    # the window's 7500.
    busy = 660_000 * 200 / 1200 + 600_000 * 200 / 7500
    assert savings_rows(rep) == {(ServedBy.SELF_HOSTED, "a", "gpu0"): (1, 100, 100, round(busy), 250 + 1000)}


def test_savings_reference_prices(savings_db: Engine) -> None:
    query = parse_query(None, None, None)
    explicit = savings_config(reference_input_usd_per_mtok="1", reference_output_usd_per_mtok="2")
    rep = savings_report(savings_db, explicit, query)
    assert rep.reference.input_usd_per_mtok == Decimal(1)
    assert rep.totals.reference_micro_usd == (4500 + 1000 + 200) * 1 + (2700 + 1000 + 100) * 2
    listed = savings_report(savings_db, savings_config(reference_model="listed"), query)  # litellm's cost map
    assert (listed.reference.input_usd_per_mtok, listed.reference.output_usd_per_mtok) == (
        Decimal("0.15"),
        Decimal("0.6"),
    )
    body = orjson.loads(to_json(listed))
    assert body["reference"]["source"].startswith("list price of openai/gpt-4o-mini")
    assert body["totals"]["saved_micro_usd"] == listed.totals.saved_micro_usd
    assert to_csv(listed).splitlines()[0] == (
        "backend,served_by,requests,prompt_tokens,completion_tokens,busy_hours,actual_usd,reference_usd,saved_usd"
    )


def edge_savings_config() -> Config:
    """`savings_config` plus edge nodes (`edge`) and a static edge endpoint (`plant7`, priced by the hour)."""
    return parse_config(
        {
            "backends": {
                **SAVINGS_BACKENDS,
                "edge": {"kind": "edge"},
                "plant7": {
                    "kind": "openai",
                    "base_url": "http://127.0.0.1:9/v1",
                    "privacy_tier": "edge",
                    "usd_per_hour": "3.6",
                },
            },
            "models": {
                **SAVINGS_MODELS,
                "tiny": {"deployments": [{"backend": "edge", "upstream_model": "smollm2"}]},
            },
            "teams": {"a": {}, "b": {}},
            "reports": {"reference_model": "big"},
        }
    )


def at_edge(
    i: int, team: str, backend: str, at: dt.datetime, latency_ms: float, tokens: tuple[int, int], **kw: Any
) -> Row:
    return served(i, team, backend, at, latency_ms, tokens, requested_model="tiny", **kw)


EDGE_LEDGER = [
    at_edge(21, "a", "edge/plant7-a", T0 + 2 * MIN, 4000, (300, 200), cost_micro_usd=700),
    at_edge(22, "b", "edge/plant7-a", T0 + 70 * MIN, 2000, (100, 100)),  # an idle node: free
    # A stream cut after its first token: an error row with what was delivered and what it cost.
    at_edge(23, "a", "edge/plant7-a", T0 + 80 * MIN, 1500, (100, 20), cost_micro_usd=40, status="error"),
    at_edge(24, "b", "edge/plant7-b", T0 + 15 * MIN, 3000, (500, 300), cost_micro_usd=1234),
    at_edge(25, "a", "edge/plant7-b", T0 + 16 * MIN, 1, (300, 200), cache_hit=True, attempts=0),
    at_edge(26, "a", "plant7", T0 + 25 * MIN, 360_000, (50, 50)),  # static edge endpoint: 6 min busy
    at_edge(27, "b", "gone/n1", T0 + 30 * MIN, 1000, (10, 10), cost_micro_usd=99),  # no such edge backend
]


@pytest.fixture
def edge_savings_db(engine: Engine) -> Engine:
    insert_rows(engine, [*SAVINGS_LEDGER, *EDGE_LEDGER])
    Rollup(engine, clock=lambda: T0 + dt.timedelta(days=1)).run_once()
    return engine


@pytest.mark.parametrize("source", SOURCES)
def test_savings_of_edge_nodes_at_the_cost_the_ledger_recorded(edge_savings_db: Engine, source: str) -> None:
    rep = savings_report(edge_savings_db, edge_savings_config(), parse_query(None, None, None, source=source))
    # Reference: 2.5 micro-USD per prompt token, 10 per completion token.
    assert savings_rows(rep) == {
        (ServedBy.SELF_HOSTED, "gpu0"): (5, 4500, 2700, 2_161_000, 38_250),
        (ServedBy.SELF_HOSTED, "plant7"): (1, 50, 50, 360_000, 125 + 500),  # busy time x usd_per_hour
        (ServedBy.EDGE, "edge/plant7-a"): (3, 500, 320, 700 + 40, 1250 + 3200),
        (ServedBy.EDGE, "edge/plant7-b"): (1, 500, 300, 1234, 1250 + 3000),
        (ServedBy.CACHE, "cloud"): (1, 1000, 1000, 0, 12_500),
        (ServedBy.CACHE, "edge/plant7-b"): (1, 300, 200, 0, 750 + 2000),
        (ServedBy.CACHE, "gpu0"): (1, 200, 100, 0, 1_500),
    }
    assert [r.served_by for r in rep.rows][:4] == [ServedBy.SELF_HOSTED] * 2 + [ServedBy.EDGE] * 2
    edge = {r.group[0]: r.busy_ms for r in rep.rows if r.served_by is ServedBy.EDGE}
    assert edge == pytest.approx({"edge/plant7-a": 7500.0, "edge/plant7-b": 3000.0})  # shown, not charged
    assert rep.totals.actual_micro_usd == 2_161_000 + 360_000 + 740 + 1234
    body = orjson.loads(to_json(rep))
    edge_json = [r for r in body["rows"] if r["served_by"] == "edge"]
    assert [(r["backend"], r["actual_micro_usd"], r["actual_usd"]) for r in edge_json] == [
        ("edge/plant7-a", 740, "0.00074"),
        ("edge/plant7-b", 1234, "0.001234"),
    ]
    assert "edge/plant7-b,edge,1,500,300,0.001,0.001234,0.00425,0.003016" in to_csv(rep).splitlines()


def test_savings_of_edge_nodes_per_team(edge_savings_db: Engine) -> None:
    rep = savings_report(edge_savings_db, edge_savings_config(), parse_query("team", None, None))
    edge = {key: value for key, value in savings_rows(rep).items() if key[0] is ServedBy.EDGE}
    assert edge == {  # team a's only request on plant7-b was a cache hit: no edge row for it
        (ServedBy.EDGE, "a", "edge/plant7-a"): (2, 400, 200 + 20, 740, 1000 + 2200),
        (ServedBy.EDGE, "b", "edge/plant7-a"): (1, 100, 100, 0, 250 + 1000),
        (ServedBy.EDGE, "b", "edge/plant7-b"): (1, 500, 300, 1234, 1250 + 3000),
    }
    assert savings_rows(rep)[(ServedBy.CACHE, "a", "edge/plant7-b")] == (1, 300, 200, 0, 2750)
    team_a = savings_report(edge_savings_db, edge_savings_config(), parse_query(None, None, None, team="a"))
    edge_a = [(r.group, r.actual_micro_usd) for r in team_a.rows if r.served_by is ServedBy.EDGE]
    assert edge_a == [(("edge/plant7-a",), 740)]


def test_savings_over_an_empty_window(savings_db: Engine) -> None:
    rep = savings_report(savings_db, savings_config(), parse_query("team", "2031-01-01", "2031-02-01"))
    assert rep.rows == () and rep.totals.requests == 0 and rep.totals.actual_micro_usd == 0


def test_a_window_from_year_one_reads_only_the_rollups_that_exist(ledger: Ledger) -> None:
    # Security finding: `since=0001-01-01` read the rollups one 31-day chunk at a time for 2,000 years
    # (~24,000 statements, a core busy for minutes). Chunks now start at the first rollup hour.
    seen: list[tuple[int, int]] = []
    query = parse_query("team", "0001-01-01", "9999-01-01", source="rollup")
    rep = usage_report(ledger.engine, query, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][1] <= 3, seen[-1]
    assert rep.totals.requests == report(ledger.engine, (), "rollup").totals.requests


def test_a_tripped_guard_stops_the_report(ledger: Ledger) -> None:
    from sqlalchemy.exc import OperationalError

    from gateway.reports.runner import Guard, ReportCancelled

    guard = Guard(60.0)
    guard.cancel()
    # Stopped between statements (ReportCancelled), or inside the first one by the database (SQLite's
    # progress handler, PostgreSQL's statement_timeout): the runner reports either as report_timeout.
    with pytest.raises((ReportCancelled, OperationalError)):
        usage_report(ledger.engine, parse_query("team", None, None, source="rollup"), guard=guard)
    expired = Guard(60.0, clock=iter([0.0, 1e9, 1e9, 1e9, 1e9]).__next__)
    with pytest.raises(Exception):  # noqa: B017 - ReportCancelled, or the database's own interruption
        usage_report(ledger.engine, parse_query("team", None, None, source="raw"), guard=expired)
