"""A rolling restart under load: three replicas on PostgreSQL and Redis are stopped with SIGTERM and started
again one after another while clients keep sending requests.

The clients spread requests round-robin and, as a load balancer would, retry on the next replica only when a
connection is refused (a stopped or draining replica); any other failure counts. Each request goes on a fresh
connection, so what is measured is the gateway's drain, not the race of a client reusing a keep-alive
connection that the server is closing. Requests are a mix of short and one-second answers, whole and
streamed, so some are always in flight when a replica gets its SIGTERM.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store import db, keys
from tests.support.replica_rig import ENV, chat_body, gateway_config
from tests.support.replicas import FakeUpstream, GatewayReplicas
from tests.support.services import REDIS_URL, delete_prefix

TEAM = "rolling"
CLIENTS = 8


@pytest.fixture
def replicas(workdir: Path, upstream: FakeUpstream, pg: tuple[str, Engine]) -> Iterator[GatewayReplicas]:
    """Three replicas of their own (the session rig's stay untouched), draining for up to 30 s."""
    schema, _ = pg
    prefix = f"test:rolling:{uuid.uuid4().hex[:12]}:"
    config = gateway_config(
        upstream.base_url, schema, REDIS_URL, prefix, timeout_ms=2000, connect_timeout_ms=5000
    )
    config["server"]["drain_timeout_s"] = 30.0
    group = GatewayReplicas(config, workdir, n=3, name="rolling", env=ENV).start()
    try:
        yield group
    finally:
        group.stop()
        delete_prefix(REDIS_URL, prefix)


@dataclass
class Load:
    served: list[str] = field(default_factory=list)  # x-request-id of every answered request
    statuses: Counter[int] = field(default_factory=Counter)
    refused: Counter[int] = field(default_factory=Counter)  # connection refused, per replica: retried
    failures: list[str] = field(default_factory=list)  # anything else: the test fails


def refused(exc: BaseException | None) -> bool:
    """Whether a connect error was a refusal (anyio wraps it: an OSError from a group of attempts' errors)."""
    if exc is None:
        return False
    if isinstance(exc, ConnectionRefusedError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(refused(e) for e in exc.exceptions)
    return refused(exc.__cause__ or exc.__context__)


async def one_request(
    client: httpx.AsyncClient, urls: list[str], turn: Iterator[int], n: int, load: Load
) -> None:
    body = chat_body("hold" if n % 5 == 0 else "slow", max_tokens=8, stream=n % 3 == 0)
    for _ in range(50 * len(urls)):
        replica = next(turn) % len(urls)
        try:
            async with client.stream("POST", urls[replica] + "/v1/chat/completions", json=body) as resp:
                raw = await resp.aread()
        except httpx.ConnectError as exc:
            if not refused(exc):
                load.failures.append(f"replica {replica}: connect error {exc!r}")
                return
            load.refused[replica] += 1
            await asyncio.sleep(0.01)
            continue
        except httpx.TransportError as exc:
            load.failures.append(f"replica {replica}: {exc!r} after the connection was accepted")
            return
        load.statuses[resp.status_code] += 1
        if resp.status_code != 200 or (body["stream"] and not raw.rstrip().endswith(b"data: [DONE]")):
            load.failures.append(f"replica {replica}: {resp.status_code} {raw[-300:]!r}")
        load.served.append(resp.headers.get("x-request-id", ""))
        return
    load.failures.append("every replica refused for too long")


async def run_load(urls: list[str], key: str, stop: asyncio.Event, load: Load) -> None:
    turn = itertools.count()
    numbers = itertools.count()
    limits = httpx.Limits(max_keepalive_connections=0)  # a fresh connection per request
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while not stop.is_set():
                await one_request(client, urls, turn, next(numbers), load)

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))


async def team_rows(engine: Engine, expected: int, timeout_s: float = 15.0) -> list[sa.Row[tuple[str, str]]]:
    """The team's ledger rows, once `expected` are there (the last ones may still be in a writer's batch)."""
    query = sa.select(db.usage.c.request_id, db.usage.c.status).where(db.usage.c.team == TEAM)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        with engine.connect() as conn:
            rows = list(conn.execute(query).all())
        if len(rows) >= expected or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_rolling_restart_under_load_loses_no_request(
    replicas: GatewayReplicas, pg: tuple[str, Engine]
) -> None:
    _, engine = pg
    key = keys.create_key(engine, TEAM, name="rolling", models=None, expires_at=None).plaintext
    load, stop = Load(), asyncio.Event()
    clients = asyncio.create_task(run_load(replicas.urls, key, stop, load))
    try:
        await asyncio.sleep(1.0)  # load on all three before the first restart
        exits = []
        for i in range(3):
            before = len(load.served)
            exits.append(await asyncio.to_thread(replicas.restart, i))
            assert not load.failures, load.failures[:5]
            assert len(load.served) > before, f"nothing was served while replica {i} restarted"
        await asyncio.sleep(1.0)  # and on all three after the last
    finally:
        stop.set()
        await clients
    assert not load.failures, f"{len(load.failures)} failures, first: {load.failures[:5]}"
    assert exits == [-signal.SIGTERM] * 3
    assert set(load.refused) == {0, 1, 2}, f"the load never met a stopped replica: {load.refused}"
    ids = load.served
    assert all(ids) and len(set(ids)) == len(ids)
    rows = await team_rows(engine, len(ids))
    assert sorted(r.request_id for r in rows) == sorted(ids), "ledger rows and answered requests differ"
    assert {r.status for r in rows} == {"ok"}
    print(f"rolling restart: {len(ids)} requests answered, refused and retried: {dict(load.refused)}")
