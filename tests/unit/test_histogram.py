"""live.histogram: bounds, bucket_of at and around every edge, quantile error within the stated bound."""

from __future__ import annotations

import math
import random

import pytest

from gateway.live import histogram as h


def test_bounds_are_log_spaced_and_cover_half_a_ms_to_twenty_minutes() -> None:
    assert h.BUCKETS == 48 and len(h.EDGES_MS) == h.BUCKETS - 1
    assert h.EDGES_MS[0] == 0.5 and h.EDGES_MS[-1] == 1_200_000.0
    assert h.bounds_ms(0) == (0.0, 0.5)
    assert h.bounds_ms(h.BUCKETS - 1) == (1_200_000.0, math.inf)
    for i in range(1, h.BUCKETS - 1):
        lo, hi = h.bounds_ms(i)
        assert hi / lo == pytest.approx(h.RATIO, rel=1e-12)
        assert h.bounds_ms(i + 1)[0] == hi  # contiguous
    assert 1.37 < h.RATIO < 1.38
    with pytest.raises(ValueError, match="does not exist"):
        h.bounds_ms(h.BUCKETS)


def test_bucket_of_puts_each_edge_in_the_bucket_it_starts() -> None:
    assert h.bucket_of(-5.0) == 0 and h.bucket_of(0.0) == 0 and h.bucket_of(0.4999) == 0
    assert h.bucket_of(math.inf) == h.BUCKETS - 1 and h.bucket_of(1e12) == h.BUCKETS - 1
    for i in range(1, h.BUCKETS):
        lo, hi = h.bounds_ms(i)
        assert h.bucket_of(lo) == i
        assert h.bucket_of(math.nextafter(lo, 0.0)) == i - 1
        if hi != math.inf:
            assert h.bucket_of(math.nextafter(hi, 0.0)) == i
    with pytest.raises(ValueError, match="NaN"):
        h.bucket_of(math.nan)


def test_column_names() -> None:
    names = h.column_names(h.LATENCY_PREFIX)
    assert names[0] == "lat_h00" and names[-1] == "lat_h47" and len(names) == h.BUCKETS
    assert h.column_names(h.TTFT_PREFIX)[7] == "ttft_h07"


def counts_of(values: list[float]) -> list[int]:
    counts = [0] * h.BUCKETS
    for v in values:
        counts[h.bucket_of(v)] += 1
    return counts


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@pytest.mark.parametrize("seed", range(5))
def test_quantiles_of_a_lognormal_sample_are_within_the_stated_factor(seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.lognormvariate(5.5, 1.3) for _ in range(rng.choice((1, 2, 17, 1000, 20_000)))]
    counts = counts_of(values)
    for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        estimate = h.quantile(counts, q)
        true = nearest_rank(values, q)
        assert estimate is not None
        assert h.bucket_of(estimate) == h.bucket_of(true) or estimate == h.bounds_ms(h.bucket_of(true))[1]
        slack = 1 + 1e-12  # float rounding of lo * (hi / lo) ** fraction
        assert 1 / (h.RATIO * slack) <= estimate / true <= h.RATIO * slack, (q, estimate, true)


def test_quantile_interpolates_log_linearly_within_a_bucket() -> None:
    lo, hi = h.bounds_ms(20)
    counts = [0] * h.BUCKETS
    counts[20] = 4
    assert h.quantile(counts, 0.5) == pytest.approx(math.sqrt(lo * hi))
    assert h.quantile(counts, 1.0) == pytest.approx(hi)
    assert h.quantile(counts, 0.0) == pytest.approx(lo)
    counts[0], counts[20] = 2, 0
    assert h.quantile(counts, 0.5) == pytest.approx(0.25)  # bucket 0: linear in [0, 0.5)
    counts[0], counts[-1] = 0, 3
    assert h.quantile(counts, 0.99) == 1_200_000.0  # the open last bucket answers its lower bound


def test_quantile_of_nothing_is_none_and_bad_input_is_refused() -> None:
    assert h.quantile([0] * h.BUCKETS, 0.5) is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        h.quantile([1] * h.BUCKETS, 1.5)
    with pytest.raises(ValueError, match="48 bucket counts"):
        h.quantile([1, 2], 0.5)
