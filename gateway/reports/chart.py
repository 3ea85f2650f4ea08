"""Cost per day as a PNG: one bar per UTC day, stacked by team or by backend.

Input is a report grouped by (day, team) or (day, backend); `chart_query` turns any query into that shape.
matplotlib is optional (`pip install 'switchboard[charts]'`) and imported only when a chart is drawn; the
figure is drawn on the Agg canvas directly, never through pyplot, so no global GUI state is touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from gateway.reports import Dimension, ReportQuery, ReportRow

INSTALL_HINT = "pip install 'switchboard[charts]'"
MAX_STACKS = 12  # more teams or backends than this: the smallest are summed into "other"
OTHER = "other"
NONE_LABEL = "(none)"


class ChartBy(StrEnum):
    TEAM = "team"
    BACKEND = "backend"


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def chart_query(query: ReportQuery, by: ChartBy) -> ReportQuery:
    """The same filters and window as `query`, grouped by (day, `by`)."""
    return dataclasses.replace(query, group_by=(Dimension.DAY, Dimension(by.value)))


def cost_by_day(rows: Sequence[ReportRow]) -> tuple[list[str], dict[str, list[int]]]:
    """Days in order and, per stack label, its cost in micro-USD on each of those days.

    `rows` are grouped by (day, stack). Stacks beyond `MAX_STACKS` (by total cost) are merged into "other".
    """
    days = sorted({str(r.group[0]) for r in rows})
    index = {d: i for i, d in enumerate(days)}
    stacks: dict[str, list[int]] = {}
    for r in rows:
        label = NONE_LABEL if r.group[1] is None else str(r.group[1])
        stacks.setdefault(label, [0] * len(days))[index[str(r.group[0])]] += r.cost_micro_usd
    ranked = sorted(stacks, key=lambda s: (-sum(stacks[s]), s))
    if len(ranked) <= MAX_STACKS:
        return days, {s: stacks[s] for s in ranked}
    kept = {s: stacks[s] for s in ranked[: MAX_STACKS - 1]}
    kept[OTHER] = [sum(stacks[s][i] for s in ranked[MAX_STACKS - 1 :]) for i in range(len(days))]
    return days, kept


def require_matplotlib() -> None:
    """Raise `ChartUnavailable` (naming the extra to install) unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ChartUnavailable(f"charts need matplotlib, which is not installed: {INSTALL_HINT}") from None


def draw_cost_chart(rows: Sequence[ReportRow], *, by: ChartBy, path: Path, title: str | None = None) -> Path:
    """Write a PNG of cost per day stacked by `by` to `path`; raises `ChartUnavailable` without matplotlib."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    days, stacks = cost_by_day(rows)
    fig = Figure(figsize=(max(6.0, 0.35 * len(days) + 3.0), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(len(days)))
    bottom = [0.0] * len(days)
    for label, micro in stacks.items():
        usd = [m / 1_000_000 for m in micro]
        ax.bar(positions, usd, bottom=bottom, label=label, width=0.8)
        bottom = [b + u for b, u in zip(bottom, usd, strict=True)]
    ax.set_xticks(positions, days, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("cost (USD)")
    ax.set_title(title or f"cost per day by {by.value}")
    if stacks:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, "no usage in this window", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
