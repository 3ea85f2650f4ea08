"""Owned capacity: what a box we already pay for can do, and the latency a new request would see on it.

A company pays for a self-hosted GPU or an edge node by the hour, whatever it serves, so routing prices such
capacity at marginal cost 0 while it has SLO-safe room; the cloud is paid per token. `Capacity` is a box's
throughput curve from config (`[backends.X.capacity]`): aggregate decode tokens/s against concurrency, and
optionally TTFT against queue depth and the rate it computes prompt tokens (prefill). `predict` turns it and
the live load (gateway in-flight count and pending prompt tokens, engine /metrics running and queue depth)
into the terms of a latency prediction that is linear in the request's prompt and output tokens. A curve
may keep a reserve for must-stay traffic (requests whose privacy floor forbids the cloud): requests that
could overflow use only the unreserved slots, and only while their predicted TTFT is within the reserve's
bound (past it, only on a box the tier can spare: `routing.placement.by_slo`). The ledger's
chargeback figure (`owned_share_micro_usd`) uses the same busy-time arithmetic as the savings report.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

_MS_PER_HOUR = Decimal(3_600_000)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Capacity:
    """One box's throughput curve. Points are (x, y) with strictly increasing x; between points y is linear.

    `tokens_per_s`: (concurrency, aggregate decode tokens/s); flat beyond the last point, proportional to
    concurrency below the first. `ttft_ms`: (queue depth, TTFT ms), where queue depth counts the requests
    waiting for a slot including the new one (0: it starts at once); extrapolated along the last segment.
    Empty: the measured TTFT plus the queue wait implied by the service time. `max_concurrency`: requests
    the box runs at once (its batch slots); more wait. 0: the last throughput point's concurrency.
    `prefill_tokens_per_s`: prompt tokens/s the box computes (its engine prefills in arrival order); > 0
    makes TTFT = one step + the prompt tokens pending ahead + this request's own prompt at this rate (or
    the wait for a slot, when longer). 0: prompt length is not modelled (the measured TTFT stands in).
    The reserve for must-stay traffic, honoured by requests that could go to the cloud instead:
    `reserve_slots` slots they leave free, and `reserve_ttft_ms`: they are placed here only while their
    predicted TTFT is at most this, so a must-stay request arriving next finds a short prefill queue; or, for
    a prompt whose own prefill takes it past this, while the queue ahead of it is and most of the tier's
    boxes keep such room without this one (`routing.placement.by_slo`).
    `kv_cache_tokens`: the engine's KV cache in tokens, which its prefix cache shares with running requests;
    > 0 lets routing judge whether a conversation's earlier turns can still be cached there (`holds_prefix`).
    `prefill_chunk_tokens` and `short_prefill_tokens`: the engine's `--max-prefill-tokens` and
    `--short-prefill-tokens`. With both, a request with at most `short_prefill_tokens` of prompt left to
    compute (a conversation's next turn on the replica that caches its history) is computed ahead of the
    prompts pending there, alone in its own step, so it waits for at most one chunk of them (the step in
    progress), not all. 0: prompts are computed oldest first.
    `prefill_us_per_context_token`, with a prefill rate: what a prompt token costs more for each token before
    it in its sequence (its attention over them), in µs: a prompt of n uncached tokens after s cached ones
    takes n / rate plus this x n x (s + n / 2) µs (`prompt_context`), so a long prompt is not predicted at a
    short one's rate, nor are the prompts pending ahead of a request (`python -m
    bench.routing_eval.calibrate` measures it: its `prefill_ms_per_context_token` x 1000). 0: a flat rate.
    `decode_us_per_context_token`: what each decoding stream's step costs more per token in its context
    (prompt and answer so far), in µs: with it, a step on a box whose running requests hold c prompt tokens
    in all takes this x c µs more than `tokens_per_s` says (measured with short contexts), for the first
    token and every one after it (calibrate: `decode_ms_per_context_token` x 1000). 0: not modelled.
    """

    tokens_per_s: tuple[tuple[float, float], ...]
    ttft_ms: tuple[tuple[float, float], ...] = ()
    max_concurrency: int = 0
    prefill_tokens_per_s: float = 0.0
    reserve_slots: int = 0
    reserve_ttft_ms: float | None = None
    kv_cache_tokens: int = 0
    prefill_chunk_tokens: int = 0
    short_prefill_tokens: int = 0
    prefill_us_per_context_token: float = 0.0
    decode_us_per_context_token: float = 0.0

    def __post_init__(self) -> None:
        for name, points, x_min in (("tokens_per_s", self.tokens_per_s, 1), ("ttft_ms", self.ttft_ms, 0)):
            xs = [x for x, _ in points]
            if any(b <= a for a, b in zip(xs, xs[1:], strict=False)) or any(x < x_min for x in xs):
                raise ValueError(f"capacity.{name}: x values must increase and be >= {x_min}, got {xs}")
            if any(y < 0 for _, y in points):
                raise ValueError(f"capacity.{name}: values must be >= 0")
        if not self.tokens_per_s or any(y <= 0 for _, y in self.tokens_per_s):
            raise ValueError("capacity.tokens_per_s: give at least one point, each with tokens/s > 0")
        if self.max_concurrency < 0:
            raise ValueError(f"capacity.max_concurrency must be >= 0, got {self.max_concurrency}")
        if self.prefill_tokens_per_s < 0:
            raise ValueError(f"capacity.prefill_tokens_per_s must be >= 0, got {self.prefill_tokens_per_s}")
        if not 0 <= self.reserve_slots < self.slots:
            raise ValueError(
                f"capacity.reserve_slots must be >= 0 and below the box's {self.slots} slots "
                f"(capacity.max_concurrency), got {self.reserve_slots}"
            )
        if self.reserve_ttft_ms is not None and self.reserve_ttft_ms <= 0:
            raise ValueError(f"capacity.reserve_ttft_ms must be > 0, got {self.reserve_ttft_ms}")
        if self.kv_cache_tokens < 0:
            raise ValueError(f"capacity.kv_cache_tokens must be >= 0, got {self.kv_cache_tokens}")
        if self.prefill_chunk_tokens < 0 or self.short_prefill_tokens < 0:
            raise ValueError("capacity.prefill_chunk_tokens and capacity.short_prefill_tokens must be >= 0")
        if self.prefill_us_per_context_token < 0 or (
            self.prefill_us_per_context_token and not self.prefill_tokens_per_s
        ):
            raise ValueError(
                "capacity.prefill_us_per_context_token must be >= 0, and needs capacity.prefill_tokens_per_s"
            )
        if self.decode_us_per_context_token < 0:
            raise ValueError(
                f"capacity.decode_us_per_context_token must be >= 0, got {self.decode_us_per_context_token}"
            )
        if self.short_prefill_tokens and not self.prefill_chunk_tokens:
            raise ValueError(
                "capacity.short_prefill_tokens needs capacity.prefill_chunk_tokens (the engine's "
                "--max-prefill-tokens)"
            )

    @property
    def slots(self) -> int:
        return self.max_concurrency or max(1, int(self.tokens_per_s[-1][0]))

    def aggregate_tokens_per_s(self, concurrency: float) -> float:
        points = self.tokens_per_s
        x0, y0 = points[0]
        if concurrency <= x0:
            return y0 * max(concurrency, 1.0) / x0
        return _interpolate(points, concurrency, extrapolate=False)

    def ttft_at(self, queue_depth: float) -> float | None:
        return _interpolate(self.ttft_ms, queue_depth, extrapolate=True) if self.ttft_ms else None


def _interpolate(points: tuple[tuple[float, float], ...], x: float, *, extrapolate: bool) -> float:
    if len(points) == 1 or x <= points[0][0]:
        return points[0][1]
    for (xa, ya), (xb, yb) in zip(points, points[1:], strict=False):
        if x <= xb:
            return ya + (yb - ya) * (x - xa) / (xb - xa)
    if not extrapolate:
        return points[-1][1]
    (xa, ya), (xb, yb) = points[-2], points[-1]
    return max(0.0, yb + (yb - ya) * (x - xb) / (xb - xa))


@dataclass(frozen=True, slots=True)
class Prediction:
    """TTFT = ttft_base + out * ttft_per_token + prompt * per_prompt, e2e = base + out * per_token +
    prompt * per_prompt (out, prompt: the request's output and prompt tokens). `waiting`: requests that
    would queue for a slot ahead of and including this one (0: starts at once). `unreserved`: whether a
    request that could go elsewhere fits in the slots outside the reserve for must-stay traffic.
    `short_saving_ms`: how much sooner a request with at most `short_prompt_tokens` of prompt left to
    compute gets its first token (the engine computes it ahead of the prompts pending; `Capacity`).
    `ms_per_prompt_token_sq`: added per prompt token squared, on TTFT and e2e alike (a prompt's attention
    over its own earlier tokens: half of `Capacity.prefill_us_per_context_token`, in ms)."""

    ttft_base_ms: float
    ttft_ms_per_output_token: float
    base_ms: float
    ms_per_output_token: float
    waiting: int
    ms_per_prompt_token: float = 0.0
    unreserved: bool = True
    short_prompt_tokens: int = 0
    short_saving_ms: float = 0.0
    ms_per_prompt_token_sq: float = 0.0


def predict(
    *,
    ttft_ms: float,
    decode_tokens_per_s: float,
    p50_latency_ms: float,
    in_flight: int,
    queue_depth: int,
    running: int | None,
    capacity: Capacity | None,
    pending_prompt_tokens: int = 0,
    pending_prompt_context: float = 0.0,
    in_flight_context: int = 0,
) -> Prediction:
    """Latency terms on one deployment from its live stats and (if configured) its capacity curve.

    Without a curve: queue wait = queue depth x service time (the measured p50, else this request's own
    TTFT + decode time), then TTFT and decode at the measured per-stream rate. With a curve: the requests on
    the box are max(in-flight, running + queue depth); the new one starts when a slot frees (each completion
    frees one of `slots`), decodes at aggregate(c)/c tokens/s with c the requests running beside it. With a
    prefill rate, its first token comes after the prompt tokens pending on the box (`pending_prompt_tokens`:
    the gateway's in-flight requests without a first token yet) and its own, or after its slot wait; with a
    context cost too, the pending prompts' attention is charged on `pending_prompt_context` (their
    `prompt_context`, summed), as the request's own is. With the engine's chunk size, each chunk of prompt
    also waits for a step of the streams decoding beside it. With a decode context cost, every step grows by
    the running streams' context: `in_flight_context` (the gateway's in-flight prompts, whole) scaled to the
    share of them that hold a slot.
    """
    ms_per_token = 1000.0 / decode_tokens_per_s
    if capacity is None:
        if p50_latency_ms > 0:
            wait = queue_depth * p50_latency_ms
            return Prediction(wait + ttft_ms, 0.0, wait + ttft_ms, ms_per_token, queue_depth)
        q = queue_depth
        return Prediction((q + 1) * ttft_ms, q * ms_per_token, (q + 1) * ttft_ms, (q + 1) * ms_per_token, q)
    slots = capacity.slots
    on_box = max(in_flight, (running or 0) + queue_depth)
    waiting = max(0, on_box + 1 - slots)
    concurrency = min(on_box + 1, slots)
    stream_ms_per_token = 1000.0 * concurrency / capacity.aggregate_tokens_per_s(concurrency)
    if capacity.decode_us_per_context_token and on_box:  # the running streams' attention, each step
        running_context = in_flight_context * min(1.0, slots / on_box)
        stream_ms_per_token += capacity.decode_us_per_context_token / 1000 * running_context
    unreserved = capacity.reserve_slots == 0 or on_box + 1 <= slots - capacity.reserve_slots
    if capacity.prefill_tokens_per_s > 0:
        pending = (pending_prompt_tokens, pending_prompt_context)
        return _prefill_bound(capacity, p50_latency_ms, ttft_ms, pending, waiting, stream_ms_per_token,
                              unreserved)  # fmt: skip
    curve_ttft = capacity.ttft_at(waiting)
    if curve_ttft is not None:
        ttft_base, ttft_per_token = curve_ttft, 0.0
    elif p50_latency_ms > 0:
        ttft_base, ttft_per_token = ttft_ms + waiting * p50_latency_ms / slots, 0.0
    else:  # each slot frees after about this request's own service time
        rounds = waiting / slots
        ttft_base, ttft_per_token = ttft_ms * (1 + rounds), rounds * stream_ms_per_token
    return Prediction(
        ttft_base, ttft_per_token, ttft_base, ttft_per_token + stream_ms_per_token, waiting, 0.0, unreserved
    )


def prompt_context(tokens: int, cached_tokens: int = 0) -> float:
    """What `Capacity.prefill_us_per_context_token` is charged on for a prompt's `tokens` computed after
    `cached_tokens` cached ones: the tokens before each of them, summed (tokens x (cached + tokens / 2))."""
    return tokens * (cached_tokens + tokens / 2)


def _prefill_bound(
    capacity: Capacity,
    p50_latency_ms: float,
    ttft_ms: float,
    pending: tuple[int, float],
    waiting: int,
    stream_ms: float,
    unreserved: bool,
) -> Prediction:
    """`predict` with a prefill rate: one step + max(prefill of the pending prompts, slot wait) + own prompt.
    The slot wait is the curve's TTFT at that queue depth, else queue x the measured p50 / slots, else
    rounds of this request's own service time. `pending`: (prompt tokens, their context; `predict`)."""
    ms_per_prompt = 1000.0 / capacity.prefill_tokens_per_s
    if capacity.prefill_chunk_tokens:  # each chunk rides in a step with the decoding streams
        ms_per_prompt += stream_ms / capacity.prefill_chunk_tokens
    ms_per_context = capacity.prefill_us_per_context_token / 1000
    pending_tokens, pending_context = pending
    slot_ms, slot_per_token = 0.0, 0.0
    if waiting:
        curve = capacity.ttft_at(waiting)
        if curve is not None:
            slot_ms = curve
        elif p50_latency_ms > 0:
            slot_ms = waiting * p50_latency_ms / capacity.slots
        else:
            rounds = waiting / capacity.slots
            slot_ms, slot_per_token = rounds * ttft_ms, rounds * stream_ms
    base = stream_ms + max(pending_tokens * ms_per_prompt + pending_context * ms_per_context, slot_ms)
    short, saving = capacity.short_prefill_tokens, 0.0
    if short:  # ahead of a short prompt: the chunk in progress, at most (its own step runs it alone)
        ahead = min(pending_tokens, capacity.prefill_chunk_tokens)
        # that chunk at the pending prompts' mean context a token
        context = ahead * pending_context / pending_tokens if pending_tokens else 0.0
        saving = base - (stream_ms + max(ahead * ms_per_prompt + context * ms_per_context, slot_ms))
    return Prediction(
        base, slot_per_token, base, slot_per_token + stream_ms, waiting, ms_per_prompt, unreserved, short,
        saving, capacity.prefill_us_per_context_token / 2000,
    )  # fmt: skip


PREFIX_KEPT_SHARE = 0.5  # of the KV cache: the rest holds running requests and the prefixes all share


def holds_prefix(capacity: Capacity | None, written_since: int) -> bool:
    """Whether an engine can still hold a conversation's earlier turns in its prefix cache, given the KV
    tokens written on it since that turn (prompts computed and tokens generated there, as the gateway
    counts them). Its cache evicts the least recently used blocks first, and shares its room with running
    requests and with the prefixes every request touches, so the turn counts as evicted once more than
    `PREFIX_KEPT_SHARE` of the cache was written after it. Without a known cache size: kept."""
    if capacity is None or capacity.kv_cache_tokens == 0:
        return True
    return written_since <= PREFIX_KEPT_SHARE * capacity.kv_cache_tokens


TAIL_QUANTILE = 0.9  # the SLO is a p95; judging by the p90 of the lateness leaves room for the rest
TAIL_MIN_SAMPLES = 20  # fewer measured requests than this: no correction (factor 1)
LATENESS_FLOOR_MS = 250.0  # added to measured and predicted TTFT before their ratio (`lateness`)


def lateness(measured_ms: float, predicted_ms: float) -> float:
    """One request's sample for `tail_factor`: measured / predicted TTFT, each plus `LATENESS_FLOOR_MS`.
    A first token waits for the step in flight (a full prefill chunk is ~0.5 s on a CPU engine) and the
    network, whatever the prediction: 250 ms measured for 80 predicted is that wait, not a queue running
    3x late, and the factor multiplies the multi-second predictions the SLO checks judge. In the routing
    evaluation's fleet (bench/routing_eval, bursty-agents, 8 boxes) the ratios above 2 had a median
    prediction of 77 ms, while requests measured over 1 s ran at a median 0.96x their prediction."""
    return (measured_ms + LATENESS_FLOOR_MS) / (predicted_ms + LATENESS_FLOOR_MS)


def tail_factor(ratios: Sequence[float]) -> float:
    """`DeploymentStats.ttft_tail_factor` from recent measured / predicted TTFT ratios: their
    `TAIL_QUANTILE` (nearest rank), at least 1 (predictions that run early are left as they are), 1 with
    fewer than `TAIL_MIN_SAMPLES`. A queue the load figures cannot show (a slot held by a long answer, an
    evicted prefix the prediction counted as cached) shows up here."""
    if len(ratios) < TAIL_MIN_SAMPLES:
        return 1.0
    ordered = sorted(ratios)
    value = ordered[min(len(ordered) - 1, max(0, math.ceil(TAIL_QUANTILE * len(ordered)) - 1))]
    return value if value > 1.0 and math.isfinite(value) else 1.0


def owned_share_micro_usd(busy_ms: float, usd_per_hour: Decimal) -> int:
    """usd_per_hour x busy time, in whole micro-dollars (half up): one request's share of owned capacity
    (its serving time divided among the requests sharing the box), and the savings report's busy cost."""
    exact = Decimal(repr(busy_ms)) * usd_per_hour * 1_000_000 / _MS_PER_HOUR
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


# ---- prefix affinity: rendezvous (highest-random-weight) hashing -----------------------------------------


def stable_hash64(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's `hash` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def hrw_weight(prefix_key: int, seed: int) -> int:
    """Rendezvous weight of one replica (`seed`: stable_hash64 of its backend, so a box ranks alike under
    every public name) for one prefix key: splitmix64's finalizer over their xor, so every gateway replica
    ranks replicas alike with no shared state, and removing one replica moves only the keys it held."""
    z = (prefix_key ^ seed) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
