"""PostgreSQL goes away in the middle of traffic through the live gateway: afterwards the ledger holds exactly
one row per request. The database is reached through a TCP proxy that the test cuts and restores."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from openai import AsyncOpenAI

from gateway.http.app import create_app
from gateway.store import db, keys
from tests.support.api_gateway import FAKE_UPSTREAM_KEY, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.services import PG_URL
from tests.support.tcp_proxy import TcpProxy

REQUESTS = 240
CONCURRENCY = 12


async def test_ledger_survives_database_outage_mid_traffic(
    fake: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SB_TEST_FAKE_KEY", FAKE_UPSTREAM_KEY)
    schema = "outage_" + uuid.uuid4().hex[:10]
    url = sa.engine.make_url(PG_URL)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    db.migrate(PG_URL, schema)
    direct = db.make_engine(PG_URL, schema)
    config = gateway_config(
        fake.base_url, {"url": proxied, "schema_name": schema, "spill_path": str(tmp_path / "spill.jsonl")}
    )
    keys.upsert_teams(direct, {name: team.models for name, team in config.teams.items()})
    key = keys.create_key(direct, "alpha", name="outage", models=None, expires_at=None).plaintext
    server = LiveServer(create_app(config))
    await asyncio.to_thread(server.__enter__)
    ids: list[str] = []
    try:
        async with AsyncOpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0) as client:
            await client.models.list()  # warm the key cache while the database is up
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(REQUESTS):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    raw = await client.chat.completions.with_raw_response.create(
                        model="fast", messages=[{"role": "user", "content": f"n{i}"}], stream=i % 3 == 0
                    )
                    if i % 3 == 0:
                        async for _ in raw.parse():
                            pass
                    ids.append(raw.headers["x-request-id"])

            async def outage() -> None:
                while len(ids) < REQUESTS // 4:
                    await asyncio.sleep(0.01)
                await proxy.cut()
                await asyncio.sleep(1.5)
                await proxy.restore()

            await asyncio.gather(outage(), *(worker() for _ in range(CONCURRENCY)))
        assert len(ids) == REQUESTS == len(set(ids))
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)  # flushes the ledger on shutdown
        await proxy.aclose()
    deadline = time.monotonic() + 10
    while True:
        with direct.connect() as conn:
            rows = conn.execute(sa.select(db.usage.c.request_id, db.usage.c.status)).all()
        if len(rows) >= REQUESTS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert sorted(r.request_id for r in rows) == sorted(ids)
    assert {r.status for r in rows} == {"ok"}
    direct.dispose()
    with sa.create_engine(PG_URL).begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
