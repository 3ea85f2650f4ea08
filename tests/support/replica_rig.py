"""Three `switchboard serve` processes sharing Redis and PostgreSQL: their config, the `Rig` tests reach them
through, and the helpers that hammer them and check the ledger. The fixtures that start the rig are in
tests/replicas/conftest.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store import db, keys
from tests.support import logscan
from tests.support.replicas import FakeUpstream, GatewayReplicas
from tests.support.services import PG_URL

WINDOW_S = 60.0  # long: no refill during a test's burst, so "N per window" is exactly N
ADMIN_KEY = "admin-" + uuid.uuid4().hex
ENV = {"SB_REP_ADMIN_KEY": ADMIN_KEY, "SB_REP_UPSTREAM_KEY": "sk-upstream-" + uuid.uuid4().hex}
logscan.register(ADMIN_KEY, "admin key")
logscan.register(ENV["SB_REP_UPSTREAM_KEY"], "upstream API key")
UPSTREAM_TTFT_MS = {"fast": 0.0, "slow": 40.0, "hold": 1000.0}  # upstream model -> delay before its answer

TEAMS: dict[str, dict[str, Any]] = {
    **{f"rpm_{i}": {"limits": {"requests": 10}} for i in range(3)},  # a fresh pair for each attempt
    **{f"rpm_model_{i}": {"limits": {"models": {"fast": {"requests": 10}}}} for i in range(3)},
    "conc": {"limits": {"max_concurrent": 2}},
    "tpm": {"limits": {"tokens": 600}},
    "budget": {"budgets": [{"period": "day", "usd": "0.05", "soft_usd": "0.03"}]},
    "mixed": {"limits": {"requests": 24, "key_requests": 8, "tokens": 50_000}},
    "cache_a": {"limits": {"requests": 100_000, "tokens": 100_000_000}},
    "cache_b": {},
    "share_x": {"cache_share": "grp"},
    "share_y": {"cache_share": "grp"},
    "out_lim": {"limits": {"requests": 6}},
    "warm": {
        "limits": {"requests": 1_000_000, "tokens": 1_000_000_000, "max_concurrent": 1000},
        "budgets": [{"period": "day", "usd": "1000"}],
    },
    "out_free": {},
    "rolling": {},  # tests/replicas/test_rolling_restart.py
}


def gateway_config(
    upstream_url: str,
    schema: str,
    redis_url: str,
    prefix: str,
    *,
    timeout_ms: float,
    connect_timeout_ms: float,
) -> dict[str, Any]:
    def model(upstream: str, usd_in: str, usd_out: str) -> dict[str, Any]:
        return {
            "backend": "up",
            "upstream_model": upstream,
            "input_usd_per_mtok": usd_in,
            "output_usd_per_mtok": usd_out,
        }

    return {
        "server": {"admin_key_env": "SB_REP_ADMIN_KEY", "key_cache_ttl_s": 60.0},
        "database": {
            "url": PG_URL,
            "schema_name": schema,
            "auto_migrate": False,
            "flush_interval_s": 0.02,
            "replay_interval_s": 0.2,
        },
        "backends": {
            "up": {"kind": "openai", "base_url": upstream_url + "/v1", "api_key_env": "SB_REP_UPSTREAM_KEY"}
        },
        "models": {
            "fast": model("fast", "1.5", "6"),
            "other": model("fast", "1.5", "6"),
            "slow": model("slow", "1.5", "6"),
            "hold": model("hold", "1.5", "6"),
            "pricey": model("slow", "100", "1000"),  # ~9,000 micro-USD per 8-token answer
        },
        "teams": TEAMS,
        "routing": {"breaker_failures": 1_000_000},
        "redis": {
            "url": redis_url,
            "prefix": prefix,
            "timeout_ms": timeout_ms,
            "connect_timeout_ms": connect_timeout_ms,
            "retry_after_s": 0.2,
        },
        "limits": {"window_s": WINDOW_S, "fail_open": False, "budgets_fail_open": False},
        "cache": {"enabled": True, "ttl_s": 600.0},
    }


# ---- the rig ---------------------------------------------------------------------------------------------


@dataclass
class Rig:
    """Running replicas plus what tests need to reach them: keys, the ledger, the upstream's knobs."""

    replicas: GatewayReplicas
    db: Engine
    upstream: FakeUpstream
    schema: str
    prefix: str

    @property
    def urls(self) -> list[str]:
        return self.replicas.urls

    def key(self, team: str, **kwargs: Any) -> str:
        kwargs.setdefault("name", "replicas-test")
        kwargs.setdefault("models", None)
        kwargs.setdefault("expires_at", None)
        return keys.create_key(self.db, team, **kwargs).plaintext

    def ledger(self, request_ids: Sequence[str], timeout_s: float = 15.0) -> dict[str, dict[str, Any]]:
        """The ledger rows of these requests, once every one has been written (fails naming the missing)."""
        wanted = set(request_ids)
        deadline = time.monotonic() + timeout_s
        while True:
            with self.db.connect() as conn:
                rows = conn.execute(sa.select(db.usage).where(db.usage.c.request_id.in_(wanted))).mappings()
                found = {r["request_id"]: dict(r) for r in rows}
            if len(found) == len(wanted) or time.monotonic() > deadline:
                missing = sorted(wanted - set(found))
                assert not missing, (
                    f"{len(missing)} of {len(wanted)} requests have no ledger row: {missing[:5]}"
                )
                return found
            time.sleep(0.05)

    def team_rows(self, team: str) -> list[dict[str, Any]]:
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(db.usage).where(db.usage.c.team == team)).mappings()
            return [dict(r) for r in rows]


async def warm_up(rig: Rig) -> None:
    """Concurrent requests through every replica (team `warm`: every kind of check, none refusing), so
    pools, scripts and first-request work are done before any test times a burst."""
    key = rig.key("warm")
    for _ in range(2):
        body = chat_body("fast", prompt=logscan.planted_messages()[0]["content"], max_tokens=8)  # scanned for
        replies = await hammer(rig.urls, [key], body, 36)
        assert all(r.status == 200 for r in replies), [r.describe() for r in replies if r.status != 200][:3]


# ---- requests --------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One answer as the client saw it. `chunks` holds the parsed SSE events of a stream."""

    replica: int
    status: int
    headers: httpx.Headers
    json: dict[str, Any] | None
    elapsed_s: float
    chunks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    @property
    def error_code(self) -> str | None:
        error = (self.json or {}).get("error")
        return error.get("code") if isinstance(error, dict) else None

    @property
    def error_message(self) -> str:
        error = (self.json or {}).get("error")
        return str(error.get("message", "")) if isinstance(error, dict) else ""

    def describe(self) -> str:
        return f"replica {self.replica}: {self.status} {self.error_code} {self.error_message[:200]}"


def chat_body(model: str = "fast", *, prompt: str = "Say hello.", max_tokens: int = 16, **extra: Any) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        **extra,
    }


def _parse_sse(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(orjson.loads(line[6:]))
    return events


async def post_chat(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    replica: int,
    key: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """One chat request to `urls[replica]`; a stream is read to its end before this returns."""
    started = time.monotonic()
    url = urls[replica] + "/v1/chat/completions"
    sent = {"authorization": f"Bearer {key}", **(headers or {})}
    async with client.stream("POST", url, json=dict(body), headers=sent) as resp:
        raw = await resp.aread()
    elapsed = time.monotonic() - started
    is_sse = resp.headers.get("content-type", "").startswith("text/event-stream")
    if is_sse:
        return Reply(replica, resp.status_code, resp.headers, None, elapsed, _parse_sse(raw.decode()))
    return Reply(replica, resp.status_code, resp.headers, orjson.loads(raw) if raw else None, elapsed)


async def hammer(
    urls: Sequence[str],
    keys_: Sequence[str],
    body: Mapping[str, Any],
    n: int,
    *,
    timeout_s: float = 10.0,
) -> list[Reply]:
    """`n` requests fired at once, round-robin over the replicas (and over the keys)."""
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        return await asyncio.gather(
            *(post_chat(client, urls, i % len(urls), keys_[i % len(keys_)], body) for i in range(n))
        )


def content_of(reply: Reply) -> str:
    if reply.chunks:
        return "".join(
            (c["choices"][0]["delta"].get("content") or "") for c in reply.chunks if c.get("choices")
        )
    assert reply.json is not None
    return str(reply.json["choices"][0]["message"]["content"])


def usage_of(reply: Reply) -> dict[str, int]:
    usage = reply.chunks[-1].get("usage") if reply.chunks else (reply.json or {}).get("usage")
    assert usage, f"no usage in {reply.describe()}"
    return dict(usage)


def check_ledger_matches(rig: Rig, team: str | None, replies: Sequence[Reply]) -> dict[str, dict[str, Any]]:
    """Exactly one ledger row per request (ids from x-request-id, refusals included), each with the HTTP
    status the client saw, and (given `team`) no row of that team that no client request explains."""
    ids = [r.request_id for r in replies]
    assert all(ids), "a response has no x-request-id"
    assert len(set(ids)) == len(ids), "two responses carry the same x-request-id"
    rows = rig.ledger(ids)
    wrong = [
        (r.request_id, r.status, rows[r.request_id]["http_status"])
        for r in replies
        if rows[r.request_id]["http_status"] != r.status
    ]
    assert not wrong, f"ledger http_status differs from the response (id, client, ledger): {wrong[:5]}"
    extra = {row["request_id"] for row in rig.team_rows(team)} - set(ids) if team else set()
    assert not extra, (
        f"team {team} has {len(extra)} ledger rows no client request explains: {sorted(extra)[:5]}"
    )
    return rows
