"""The console's inline SVG charts: names are escaped (a team or backend name is user data), bars are
proportional to their values, and an empty range says so instead of drawing nothing."""

from __future__ import annotations

import re

from gateway.console import charts


def test_bar_names_are_escaped_and_widths_proportional() -> None:
    svg = str(charts.bars([("<script>x</script>", 10.0), ("b&c", 5.0), ("zero", 0.0)], label='a "label"'))
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "b&amp;c" in svg
    assert 'aria-label="a &#34;label&#34;"' in svg and 'role="img"' in svg
    widths = [float(w) for w in re.findall(r'<rect x="\d+" y="[\d.]+" width="([\d.]+)"', svg)]
    assert widths[0] == 2 * widths[1] and widths[2] == 0.0


def test_columns_draw_errors_over_totals_and_label_every_few_buckets() -> None:
    points = [(f"10:{m:02d}", float(m), float(m % 3 == 0)) for m in range(60)]
    svg = str(charts.columns(points, label="requests per minute"))
    assert svg.count("<title>") == 60
    assert svg.count('fill="#c0392b"') == sum(1 for _, _, e in points if e)
    assert 3 <= len(re.findall(r'font-size="10">10:\d\d<', svg)) <= 12


def test_empty_series_say_so() -> None:
    assert "No data" in charts.bars([], label="x") and "No data" in charts.columns([], label="x")
