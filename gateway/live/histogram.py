"""Fixed log-spaced latency histograms: bucket bounds, quantile estimates, and the SQL that counts per bucket.

Invariant: bucket `i` holds values in [EDGES_MS[i-1], EDGES_MS[i]); bucket 0 everything below 0.5 ms (also
negative values), the last bucket everything from 20 min up. `bucket_of` in Python and `sql_bucket_counts`
in SQL compare the same float64 edges, so a value lands in the same bucket on both sides. `quantile` returns
a value in the bucket of the nearest-rank quantile: for values in [0.5 ms, 20 min) it is within a factor
RATIO (~1.376) of the true value, i.e. at most 37.6 % too high or 27.3 % too low; below 0.5 ms the error is
under 0.5 ms; from 20 min up the estimate is 20 min. The bounds never change: stored rollups depend on them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement, Label

BUCKETS = 48
LOW_MS = 0.5  # upper bound of bucket 0
HIGH_MS = 1_200_000.0  # 20 min: lower bound of the last bucket
RATIO = (HIGH_MS / LOW_MS) ** (1 / (BUCKETS - 2))  # hi / lo of every bucket between them
EDGES_MS: tuple[float, ...] = tuple(
    LOW_MS * (HIGH_MS / LOW_MS) ** (k / (BUCKETS - 2)) for k in range(BUCKETS - 1)
)
LATENCY_PREFIX = "lat_h"  # usage_hourly columns lat_h00 .. lat_h47
TTFT_PREFIX = "ttft_h"  # usage_hourly columns ttft_h00 .. ttft_h47


def column_names(prefix: str) -> tuple[str, ...]:
    """The per-bucket column names for `prefix`: `lat_h00`, `lat_h01`, ..."""
    return tuple(f"{prefix}{i:02d}" for i in range(BUCKETS))


def bucket_of(ms: float) -> int:
    """The bucket index of a value in milliseconds."""
    if math.isnan(ms):
        raise ValueError("a latency of NaN ms has no histogram bucket")
    return bisect.bisect_right(EDGES_MS, ms)


def bounds_ms(i: int) -> tuple[float, float]:
    """[lo, hi) of bucket `i`; bucket 0 is reported as [0, 0.5) and the last bucket as [20 min, inf)."""
    if not 0 <= i < BUCKETS:
        raise ValueError(f"histogram bucket {i} does not exist (0..{BUCKETS - 1})")
    lo = 0.0 if i == 0 else EDGES_MS[i - 1]
    hi = math.inf if i == BUCKETS - 1 else EDGES_MS[i]
    return lo, hi


def quantile(counts: Sequence[int], q: float) -> float | None:
    """Estimate the q-quantile (0 <= q <= 1) of the values counted in `counts` (one count per bucket); None
    when there are none. The rank q*n falls in one bucket; the estimate interpolates within it, linearly in
    log(ms) (linearly in bucket 0; the last bucket answers its lower bound). See the module docstring for
    the worst-case error."""
    if len(counts) != BUCKETS:
        raise ValueError(f"a histogram has {BUCKETS} bucket counts, not {len(counts)}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is not between 0 and 1")
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    below = 0
    for i, count in enumerate(counts):
        if count > 0 and below + count >= rank:
            fraction = max(0.0, (rank - below) / count)
            lo, hi = bounds_ms(i)
            if i == 0:
                return lo + (hi - lo) * fraction
            if i == BUCKETS - 1:
                return lo
            return lo * (hi / lo) ** fraction
        below += count
    raise AssertionError("unreachable: the last non-empty bucket reaches the total")


def _in_bucket(column: ColumnElement[Any], i: int) -> ColumnElement[bool]:
    if i == 0:
        return column < EDGES_MS[0]
    if i == BUCKETS - 1:
        return column >= EDGES_MS[-1]
    return sa.and_(column >= EDGES_MS[i - 1], column < EDGES_MS[i])


def sql_bucket_counts(column: ColumnElement[Any], prefix: str) -> list[Label[Any]]:
    """`SUM(CASE WHEN column >= lo AND column < hi THEN 1 ELSE 0 END)` per bucket, labelled with
    `column_names(prefix)`, for a GROUP BY query; NULL values count in no bucket."""
    return [
        sa.func.sum(sa.case((_in_bucket(column, i), 1), else_=0)).label(name)
        for i, name in enumerate(column_names(prefix))
    ]
