"""Cost charts: a valid PNG for both stackings, stacks capped, and a clear error without matplotlib."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from gateway.reports import Dimension, ReportQuery, ReportRow, Source
from gateway.reports.chart import (
    MAX_STACKS,
    OTHER,
    ChartBy,
    ChartUnavailable,
    chart_query,
    cost_by_day,
    draw_cost_chart,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(day: str, stack: str | None, cost_micro_usd: int) -> ReportRow:
    return ReportRow(
        group=(day, stack),
        requests=1,
        errors=0,
        client_closed=0,
        prompt_tokens=1,
        completion_tokens=1,
        cost_micro_usd=cost_micro_usd,
        cache_hits=0,
        cost_saved_micro_usd=0,
        fallbacks=0,
        latency_p50_ms=None,
        latency_p95_ms=None,
        ttft_p50_ms=None,
        ttft_p95_ms=None,
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


ROWS = [
    row("2030-01-01", "alpha", 1_500_000),
    row("2030-01-01", "beta", 250_000),
    row("2030-01-02", "alpha", 2_000_000),
    row("2030-01-03", "beta", 10_000),
    row("2030-01-03", None, 5_000),
]


@pytest.mark.parametrize("by", list(ChartBy))
def test_chart_is_a_png_for_both_stackings(by: ChartBy, tmp_path: Path) -> None:
    path = draw_cost_chart(ROWS, by=by, path=tmp_path / "sub" / f"cost-{by}.png")
    width, height = png_size(path)
    assert width >= 600 and height == 450
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)


def test_empty_report_still_draws(tmp_path: Path) -> None:
    assert png_size(draw_cost_chart([], by=ChartBy.TEAM, path=tmp_path / "empty.png"))[0] > 0


def test_cost_by_day_fills_missing_days_with_zero_and_ranks_stacks() -> None:
    days, stacks = cost_by_day(ROWS)
    assert days == ["2030-01-01", "2030-01-02", "2030-01-03"]
    assert stacks == {
        "alpha": [1_500_000, 2_000_000, 0],
        "beta": [250_000, 0, 10_000],
        "(none)": [0, 0, 5_000],
    }


def test_many_stacks_fold_into_other() -> None:
    rows = [row("2030-01-01", f"team{i:02d}", 1000 * (i + 1)) for i in range(MAX_STACKS + 5)]
    _, stacks = cost_by_day(rows)
    assert len(stacks) == MAX_STACKS and OTHER in stacks
    assert sum(v[0] for v in stacks.values()) == sum(r.cost_micro_usd for r in rows)


def test_chart_query_keeps_filters_and_groups_by_day_and_stack() -> None:
    query = ReportQuery((Dimension.MODEL,), None, None, team="alpha", model="m", source=Source.RAW)
    charted = chart_query(query, ChartBy.BACKEND)
    assert charted.group_by == (Dimension.DAY, Dimension.BACKEND)
    assert (charted.team, charted.model, charted.source) == ("alpha", "m", Source.RAW)


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ChartUnavailable, match=r"pip install 'switchboard\[charts\]'"):
        draw_cost_chart(ROWS, by=ChartBy.TEAM, path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
