"""Limits, budgets, cache and ledger hold exactly across three gateway processes sharing Redis and SQL.

Every burst goes round-robin over the three replicas at once. Rate limits are GCRA on Redis's clock with
time floored to slots of window/limit, so a burst that crosses a slot boundary may admit one more: bursts
that count exactly start just after a boundary and check that they ended before the next one.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from tests.support.replica_rig import (
    WINDOW_S,
    Reply,
    Rig,
    chat_body,
    check_ledger_matches,
    content_of,
    hammer,
    post_chat,
    usage_of,
)

# Headers that differ between two answers to the same request by design.
PER_REQUEST_HEADERS = {"x-request-id", "x-switchboard-overhead-ms", "x-switchboard-cache", "date"}
# Routing's predictions describe the decision made for this request; a cache hit makes none.
PER_REQUEST_PREFIXES = (
    "x-ratelimit-remaining-",
    "x-ratelimit-reset-",
    "x-switchboard-predicted-",
    "x-switchboard-marginal-cost-",
    "x-switchboard-slo",
    "x-switchboard-affinity",
)


def statuses(replies: Sequence[Reply]) -> Counter[tuple[int, str | None]]:
    return Counter((r.status, r.error_code) for r in replies)


async def at_slot_start(slot_s: float, margin_s: float = 0.05) -> float:
    """Sleep until just after a GCRA slot boundary (multiples of slot_s since the epoch, on the shared
    clock); returns the wall time at which the slot ends."""
    phase = time.time() % slot_s
    if phase > margin_s:
        await asyncio.sleep(slot_s - phase + margin_s)
    return (time.time() // slot_s + 1) * slot_s


async def sdk_reply(client: AsyncOpenAI, replica: int, **kwargs: Any) -> Reply:
    """A request through the official SDK (no retries), as a `Reply` whether it succeeded or not."""
    started = time.monotonic()
    try:
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
    except openai.APIStatusError as exc:
        resp = exc.response
        return Reply(replica, resp.status_code, resp.headers, resp.json(), time.monotonic() - started)
    completion = raw.parse()
    return Reply(replica, raw.status_code, raw.headers, completion.model_dump(), time.monotonic() - started)


def sdk_clients(rig: Rig, keys: Sequence[str]) -> list[AsyncOpenAI]:
    return [
        AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)
        for url, key in zip(rig.urls, keys, strict=True)
    ]


def assert_rate_limited(refused: Sequence[Reply]) -> None:
    for r in refused:
        assert (r.status, r.error_code) == (429, "rate_limit_exceeded"), r.describe()
        assert int(r.headers["retry-after"]) >= 1, r.describe()


# ---- rate limits -----------------------------------------------------------------------------------------


RPM_LIMIT = 10  # teams.rpm_N.limits.requests and teams.rpm_model_N.limits.models.fast.requests


@dataclass
class Burst:
    team: list[Reply]  # team rpm_N through the SDK
    fast: list[Reply]  # team rpm_model_N, model `fast` (limited)
    other: list[Reply]  # team rpm_model_N, model `other` (not limited)
    crossed: bool  # it did not end before the next GCRA slot boundary


async def rpm_burst(rig: Rig, attempt: int) -> Burst:
    """30 requests for `rpm_<attempt>` (SDK, three keys) with 15 + 4 for `rpm_model_<attempt>` at once,
    round-robin over the replicas, started just after a slot boundary; keys are resolved beforehand."""
    team_keys = [rig.key(f"rpm_{attempt}") for _ in rig.urls]
    model_key = rig.key(f"rpm_model_{attempt}")
    clients = sdk_clients(rig, team_keys)
    messages = [{"role": "user", "content": "Count me."}]
    try:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=100)) as http:
            for url in rig.urls:  # authenticate every key on every replica (cached), charging nothing
                for key in [*team_keys, model_key]:
                    resp = await http.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"})
                    assert resp.status_code == 200, resp.text
            slot_end = await at_slot_start(WINDOW_S / RPM_LIMIT)
            replies = await asyncio.gather(
                *(
                    sdk_reply(clients[i % 3], i % 3, model="fast", messages=messages, max_tokens=8)
                    for i in range(30)
                ),
                *(
                    post_chat(http, rig.urls, i % 3, model_key, chat_body("fast", max_tokens=8))
                    for i in range(15)
                ),
                *(
                    post_chat(http, rig.urls, i % 3, model_key, chat_body("other", max_tokens=8))
                    for i in range(4)
                ),
            )
            crossed = time.time() >= slot_end
    finally:
        for client in clients:
            await client.close()
    return Burst(list(replies[:30]), list(replies[30:45]), list(replies[45:]), crossed)


async def test_requests_per_window_exact_over_three_replicas(rig: Rig) -> None:
    """A team limited to 10 requests per window (`rpm_N`, through the SDK) and a team limited to 10 on
    model `fast` only (`rpm_model_N`), hammered together: exactly 10 successes each, every refusal a 429
    with Retry-After, the other model unlimited. A burst that outlasts its slot (a loaded machine) is
    repeated on fresh teams, at most three times: the exact count holds only within one slot."""
    for attempt in range(3):
        burst = await rpm_burst(rig, attempt)
        if not burst.crossed:
            break
    assert not burst.crossed, (
        f"three bursts each outlasted a {WINDOW_S / RPM_LIMIT:g} s slot: machine too busy"
    )
    team, fast, other = burst.team, burst.fast, burst.other

    ok = [r for r in team if r.status == 200]
    assert len(ok) == RPM_LIMIT, f"team rpm_{attempt}: {statuses(team)}"
    assert_rate_limited([r for r in team if r.status != 200])
    assert {r.headers["x-ratelimit-limit-requests"] for r in ok} == {str(RPM_LIMIT)}
    # One atomic counter: the admitted requests saw 9, 8, ..., 0 remaining, each exactly once.
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(RPM_LIMIT))
    assert all("x-ratelimit-reset-requests" in r.headers for r in ok)

    assert sum(r.status == 200 for r in fast) == RPM_LIMIT, (
        f"rpm_model_{attempt}, model fast: {statuses(fast)}"
    )
    assert_rate_limited([r for r in fast if r.status != 200])
    assert [r.status for r in other] == [200] * len(other), f"model other is not limited: {statuses(other)}"

    check_ledger_matches(rig, f"rpm_{attempt}", team)
    rows = check_ledger_matches(rig, f"rpm_model_{attempt}", [*fast, *other])
    refused_rows = [rows[r.request_id] for r in fast if r.status == 429]
    assert {(row["status"], row["error_type"]) for row in refused_rows} == {("error", "rate_limit_exceeded")}


async def test_concurrency_cap_is_shared(rig: Rig) -> None:
    """Team `conc` may have 2 requests in flight over all replicas: 9 at once on a 1 s upstream, 2 pass."""
    key = rig.key("conc")
    replies = await hammer(rig.urls, [key], chat_body("hold", max_tokens=8), 9)
    assert sum(r.status == 200 for r in replies) == 2, statuses(replies)
    assert all(r.status == 429 for r in replies if r.status != 200), statuses(replies)
    check_ledger_matches(rig, "conc", replies)


async def test_tokens_per_window_never_exceeded_by_more_than_one_request(rig: Rig) -> None:
    """Team `tpm` (600 tokens per window): waves of concurrent requests reserving prompt + max_tokens (40)
    and using far less (8 completion tokens). The real tokens of all successes stay within the limit plus
    what the window refilled during the run plus one request; settlement hands back the unused reservation,
    so the real total also gets close to the limit."""
    limit = 600
    key = rig.key("tpm")
    body = chat_body("slow", prompt="Tokens please " + uuid.uuid4().hex, max_tokens=40)
    replies: list[Reply] = []
    started = time.monotonic()
    for _ in range(10):
        wave = await hammer(rig.urls, [key], body, 24)
        replies += wave
        if not any(r.status == 200 for r in wave):
            break
    elapsed_s = time.monotonic() - started
    ok = [r for r in replies if r.status == 200]
    assert ok and len(ok) < len(replies), statuses(replies)
    assert_rate_limited([r for r in replies if r.status != 200])
    assert {r.headers["x-ratelimit-limit-tokens"] for r in ok} == {str(limit)}

    rows = check_ledger_matches(rig, "tpm", replies)
    real = [rows[r.request_id]["prompt_tokens"] + rows[r.request_id]["completion_tokens"] for r in ok]
    assert real == [usage_of(r)["total_tokens"] for r in ok], "ledger tokens differ from the responses"
    refill = math.ceil(elapsed_s * limit / WINDOW_S)
    assert sum(real) <= limit + refill + max(real), (sum(real), limit, refill, max(real), elapsed_s)
    assert sum(real) >= limit // 2, f"only {sum(real)} of {limit} tokens used: reservations not settled?"


# ---- budgets ---------------------------------------------------------------------------------------------


async def test_budget_not_overshot_beyond_cost_in_flight(rig: Rig) -> None:
    """Team `budget` (0.05 USD a day) on a model costing ~0.01 USD a request: 30 at once over three
    replicas spend at most the budget plus one request, then every replica answers 429 insufficient_quota."""
    budget_micro_usd = 50_000
    key = rig.key("budget")
    body = chat_body("pricey", prompt="Spend " + uuid.uuid4().hex, max_tokens=8)
    burst = await hammer(rig.urls, [key], body, 30)
    ok = [r for r in burst if r.status == 200]
    assert ok, statuses(burst)
    assert all((r.status, r.error_code) == (429, "insufficient_quota") for r in burst if r.status != 200), (
        statuses(burst)
    )
    rows = check_ledger_matches(rig, "budget", burst)
    costs = [rows[r.request_id]["cost_micro_usd"] for r in ok]
    assert min(costs) > 0
    spent = sum(row["cost_micro_usd"] for row in rig.team_rows("budget"))
    assert spent <= budget_micro_usd + max(costs), (spent, budget_micro_usd, costs)
    assert spent + max(costs) > budget_micro_usd, f"spent {spent}: the budget refused a request that fitted"

    after = await hammer(rig.urls, [key], body, 3)
    for r in after:
        assert (r.status, r.error_code) == (429, "insufficient_quota"), r.describe()
        assert "daily budget" in r.error_message and "teams.budget.budgets" in r.error_message, r.describe()
    check_ledger_matches(rig, "budget", [*burst, *after])


# ---- the ledger ------------------------------------------------------------------------------------------


async def test_ledger_has_one_row_per_request(rig: Rig) -> None:
    """Team `mixed` (team, key and token limits): JSON and streamed requests (SDK and httpx), refusals,
    an unknown model and a cache hit, all at once over three replicas: one row per request id, with the
    status the client saw, and no other row."""
    team_keys = [rig.key("mixed") for _ in range(4)]
    clients = sdk_clients(rig, team_keys[:3])
    cached = chat_body("fast", prompt="Ledger cache " + uuid.uuid4().hex, max_tokens=8, temperature=0)
    streamed = chat_body("slow", stream=True, **_USAGE)
    try:
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as http:
            first = await post_chat(http, rig.urls, 0, team_keys[0], cached)
            replies = await asyncio.gather(
                *(sdk_reply(clients[i % 3], i % 3, **chat_body("fast", max_tokens=8)) for i in range(15)),
                *(post_chat(http, rig.urls, i % 3, team_keys[i % 4], streamed) for i in range(15)),
                *(post_chat(http, rig.urls, i % 3, team_keys[i % 4], chat_body("fast")) for i in range(12)),
                *(
                    post_chat(http, rig.urls, i % 3, team_keys[3], chat_body("no-such-model"))
                    for i in range(3)
                ),
                post_chat(http, rig.urls, 1, team_keys[1], cached),
            )
    finally:
        for client in clients:
            await client.close()
    every = [first, *replies]
    seen = statuses(every)
    assert seen[(200, None)] and seen[(429, "rate_limit_exceeded")], seen
    unknown = replies[42:45]
    assert all(r.status in (400, 404) for r in unknown), statuses(unknown)
    assert all(r.status in (200, 429) for r in [first, *replies[:42], replies[-1]]), seen
    ok_streams = [r for r in replies[15:30] if r.status == 200]
    assert ok_streams and all(r.chunks and content_of(r) for r in ok_streams)
    rows = check_ledger_matches(rig, "mixed", every)
    for r in every:
        assert rows[r.request_id]["cache_hit"] == (r.headers.get("x-switchboard-cache") == "hit"), (
            r.describe()
        )


_USAGE = {"stream_options": {"include_usage": True}}


# ---- the response cache ----------------------------------------------------------------------------------


def stable_headers(reply: Reply) -> dict[str, str]:
    return {
        k: v
        for k, v in reply.headers.items()
        if k not in PER_REQUEST_HEADERS and not k.startswith(PER_REQUEST_PREFIXES)
    }


def answer_of(reply: Reply) -> Any:
    """What a hit must repeat: choices, usage and model (not the per-response id and created)."""
    if reply.chunks:
        return [{k: c.get(k) for k in ("object", "model", "choices", "usage")} for c in reply.chunks]
    assert reply.json is not None
    return {k: reply.json.get(k) for k in ("object", "model", "choices", "usage")}


async def _check_hit_replay(rig: Rig, *, stream: bool) -> None:
    key = rig.key("cache_a")
    extra = {"stream": True, **_USAGE} if stream else {}
    body = chat_body("fast", prompt="Cache me " + uuid.uuid4().hex, max_tokens=8, temperature=0, **extra)
    async with httpx.AsyncClient(timeout=10) as http:
        miss = await post_chat(http, rig.urls, 0, key, body)
        hits = [await post_chat(http, rig.urls, i, key, body) for i in (1, 2, 0)]
    assert miss.status == 200 and miss.headers["x-switchboard-cache"] == "miss", miss.describe()
    assert content_of(miss)
    for hit in hits:
        assert hit.status == 200 and hit.headers.get("x-switchboard-cache") == "hit", hit.describe()
        assert answer_of(hit) == answer_of(miss)
        assert stable_headers(hit) == stable_headers(miss)
    rows = rig.ledger([miss.request_id, *(h.request_id for h in hits)])
    original = rows[miss.request_id]
    assert not original["cache_hit"] and original["cost_micro_usd"] > 0
    for hit in hits:
        row = rows[hit.request_id]
        assert row["cache_hit"] and row["cost_micro_usd"] == 0, row
        assert row["cost_saved_micro_usd"] == original["cost_micro_usd"], row
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            original["prompt_tokens"],
            original["completion_tokens"],
        )


async def test_cache_hit_is_identical_on_another_replica(rig: Rig) -> None:
    """Stored by replica 0, served by replicas 1, 2 and 0: same choices, usage, model and headers (but the
    per-request ones); the hits' ledger rows cost 0 and record the original's cost as saved."""
    await _check_hit_replay(rig, stream=False)


async def test_streamed_cache_hit_is_identical_on_another_replica(rig: Rig) -> None:
    await _check_hit_replay(rig, stream=True)


async def test_cache_is_per_team_unless_shared(rig: Rig) -> None:
    """`cache_a` and `cache_b` never see each other's entries; `share_x` and `share_y` (cache_share
    "grp") do, and the group does not see `cache_a`'s."""
    body = chat_body("fast", prompt="Whose answer " + uuid.uuid4().hex, max_tokens=8, temperature=0)
    key = {team: rig.key(team) for team in ("cache_a", "cache_b", "share_x", "share_y")}
    order = [("cache_a", "miss"), ("cache_b", "miss"), ("share_x", "miss"), ("share_y", "hit")]
    order += [("cache_a", "hit"), ("cache_b", "hit"), ("share_x", "hit")]
    async with httpx.AsyncClient(timeout=10) as http:
        for i, (team, expected) in enumerate(order):
            reply = await post_chat(http, rig.urls, i % 3, key[team], body)
            assert reply.status == 200, reply.describe()
            assert reply.headers.get("x-switchboard-cache") == expected, (
                f"step {i}: {team} {reply.describe()}"
            )


async def test_cache_control_no_store_and_no_cache(rig: Rig) -> None:
    key = rig.key("cache_b")
    body = chat_body("fast", prompt="Directives " + uuid.uuid4().hex, max_tokens=8, temperature=0)
    steps = [
        ({"cache-control": "no-store"}, "miss"),
        ({}, "miss"),
        ({}, "hit"),
        ({"cache-control": "no-cache"}, None),
    ]
    async with httpx.AsyncClient(timeout=10) as http:
        for i, (headers, expected) in enumerate(steps):
            reply = await post_chat(http, rig.urls, i % 3, key, body, headers)
            assert reply.status == 200, reply.describe()
            got = reply.headers.get("x-switchboard-cache")
            if expected is None:
                assert got != "hit", f"no-cache was answered from the cache ({got})"
            else:
                assert got == expected, f"step {i} {headers}: {got}"
