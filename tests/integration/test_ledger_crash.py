"""A `switchboard serve` replica on PostgreSQL is SIGKILLed mid-load (as by the OOM killer or a node failure):
some answered requests have no ledger row yet, because their rows were in the writer's in-memory queue. A
replica restarted on the same journal directory replays the dead one's journal, and then every request that
was answered 200 has exactly one row."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store import db, keys
from tests.support.replicas import FakeUpstream, GatewayReplicas, pg_schema
from tests.support.services import PG_URL

TEAM = "crash"
KILL_AFTER = 300  # answers counted before the kill
CONCURRENCY = 8


def config(upstream_url: str, schema: str) -> dict[str, object]:
    return {
        "database": {
            "url": PG_URL,
            "schema_name": schema,
            "auto_migrate": False,
            # Rows wait up to half a second in memory: at the kill, some answered ones are not in the table.
            "flush_interval_s": 0.5,
            "replay_interval_s": 0.2,
        },
        "backends": {"up": {"kind": "openai", "base_url": upstream_url + "/v1"}},
        "models": {"fast": {"backend": "up", "input_usd_per_mtok": "1.5", "output_usd_per_mtok": "6"}},
        "teams": {TEAM: {"models": ["*"]}},
    }


async def load_until_killed(url: str, key: str, pid: int) -> list[str]:
    """Requests from CONCURRENCY clients; after KILL_AFTER answers the replica is SIGKILLed. Returns the
    request ids of every answer received with status 200 (some arrive between the kill and its effect)."""
    answered: list[str] = []
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}"}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http:
            while True:
                try:
                    resp = await http.post("/v1/chat/completions", json=body)
                except httpx.TransportError:
                    return  # the replica is gone
                assert resp.status_code == 200, resp.text
                answered.append(resp.headers["x-request-id"])
                if len(answered) == KILL_AFTER:
                    os.kill(pid, signal.SIGKILL)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return answered


def rows_per_id(engine: Engine, ids: list[str]) -> dict[str, int]:
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(db.usage.c.request_id, sa.func.count())
            .where(db.usage.c.request_id.in_(ids))
            .group_by(db.usage.c.request_id)
        ).all()
    return {request_id: int(n) for request_id, n in found}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_replica_loses_no_answered_row(tmp_path: Path) -> None:
    upstream = FakeUpstream(tmp_path).spawn()
    try:
        upstream.wait_ready()
        with pg_schema(PG_URL, {TEAM: ["*"]}) as (schema, engine):
            key = keys.create_key(engine, TEAM, name="crash", models=None, expires_at=None).plaintext
            cfg = config(upstream.base_url, schema)
            first = GatewayReplicas(cfg, tmp_path, n=1, name="gw").start()
            try:
                answered = asyncio.run(load_until_killed(first.urls[0], key, first.pids[0]))
            finally:
                first.stop()
            assert len(answered) >= KILL_AFTER and len(set(answered)) == len(answered)
            missing = [i for i in answered if i not in rows_per_id(engine, answered)]
            # The point of the test: without the journal these rows would be lost.
            assert missing, "every answered row was already in the table at the kill; nothing was tested"
            journal = tmp_path / "gw-0.spill.jsonl.journal"
            assert any(p.stat().st_size for p in journal.glob("*/*.jsonl"))

            second = GatewayReplicas(cfg, tmp_path, n=1, name="gw").start()  # same spill path and journal
            try:
                deadline = time.monotonic() + 30
                while len(rows := rows_per_id(engine, answered)) < len(answered):
                    left = len(answered) - len(rows)
                    assert time.monotonic() < deadline, f"{left} answered rows still missing"
                    time.sleep(0.1)
            finally:
                second.stop()
            assert rows == dict.fromkeys(answered, 1), f"{len(missing)} rows were missing after the kill"
            log = second.logs[0].read_text()
            assert "replaying" in log and "journal" in log
            assert not [p for p in journal.glob("*/*.jsonl") if p.stat().st_size]  # emptied on shutdown
    finally:
        upstream.stop()
