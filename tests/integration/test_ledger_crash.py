"""A `switchboard serve` replica on PostgreSQL is SIGKILLed mid-load (as by the OOM killer or a node failure):
some answered requests have no ledger row yet, because their rows were in the writer's in-memory queue. A
replica restarted on the same journal directory replays the dead one's journal, and then every request that
was answered 200 has exactly one row."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store import db, keys
from tests.support.replicas import ROOT, FakeUpstream, GatewayReplicas, free_port, merged, pg_schema, to_toml
from tests.support.services import PG_URL, REDIS_URL, delete_prefix

TEAM = "crash"
KILL_AFTER = 300  # answers counted before the kill
CONCURRENCY = 8
WORKER_LINE = re.compile(r"worker (\d+) \(pid (\d+)\) serving on")


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


async def load_until_killed(url: str, key: str, pid: int, *, total: int | None = None) -> list[str]:
    """Requests from CONCURRENCY clients; after KILL_AFTER answers process `pid` is SIGKILLed. Without
    `total`, a client stops at its first connection error (the replica is gone); with it, clients go on
    until `total` answers (other workers serve them). Returns the request ids of every 200 answer."""
    answered: list[str] = []
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}"}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http:
            while total is None or len(answered) < total:
                try:
                    resp = await http.post("/v1/chat/completions", json=body)
                except httpx.TransportError:
                    if total is None:
                        return
                    continue
                assert resp.status_code == 200, resp.text
                answered.append(resp.headers["x-request-id"])
                if len(answered) == KILL_AFTER:
                    os.kill(pid, signal.SIGKILL)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return answered


def wait_for_rows(engine: Engine, ids: list[str], timeout_s: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while len(rows := rows_per_id(engine, ids)) < len(ids):
        assert time.monotonic() < deadline, f"{len(ids) - len(rows)} answered rows still missing"
        time.sleep(0.1)
    return rows


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
                rows = wait_for_rows(engine, answered)
            finally:
                second.stop()
            assert rows == dict.fromkeys(answered, 1), f"{len(missing)} rows were missing after the kill"
            log = second.logs[0].read_text()
            assert "replaying" in log and "journal" in log
            assert not [p for p in journal.glob("*/*.jsonl") if p.stat().st_size]  # emptied on shutdown
    finally:
        upstream.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_worker_loses_no_answered_row(tmp_path: Path) -> None:
    """`serve --workers 2`: worker 1 is SIGKILLed mid-load; the supervisor restarts it, the new worker takes
    the dead one's journal slot (or worker 0 adopts it), and every answer has exactly one row."""
    upstream = FakeUpstream(tmp_path).spawn()
    prefix = f"sbjournal{uuid.uuid4().hex[:8]}:"
    try:
        upstream.wait_ready()
        with pg_schema(PG_URL, {TEAM: ["*"]}) as (schema, engine):
            key = keys.create_key(engine, TEAM, name="crash", models=None, expires_at=None).plaintext
            port = free_port()
            cfg = merged(
                config(upstream.base_url, schema),
                {
                    "server": {"host": "127.0.0.1", "port": port},
                    "database": {"spill_path": str(tmp_path / "spill.jsonl")},
                    "redis": {"url": REDIS_URL, "prefix": prefix},
                },
            )
            path = tmp_path / "sb.toml"
            path.write_text(to_toml(cfg))
            log = tmp_path / "serve.log"
            cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--workers", "2"]
            with log.open("wb") as out:
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                workers = worker_pids(log, proc, 2)
                url = f"http://127.0.0.1:{port}"
                answered = asyncio.run(load_until_killed(url, key, workers[1], total=2 * KILL_AFTER))
                rows = wait_for_rows(engine, answered)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                finally:
                    if proc.poll() is None:
                        proc.kill()
            assert rows == dict.fromkeys(answered, 1)
            text = log.read_text()
            assert "worker 1" in text and "restarting" in text, text[-3000:]
            journal = tmp_path / "spill.jsonl.journal"
            assert len(list(journal.glob("*/lock"))) >= 2  # one slot per live worker
            assert not [p for p in journal.glob("*/*.jsonl") if p.stat().st_size]
    finally:
        upstream.stop()
        delete_prefix(REDIS_URL, prefix)


def worker_pids(log: Path, proc: subprocess.Popen[bytes], n: int, timeout_s: float = 90.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {int(i): int(pid) for i, pid in WORKER_LINE.findall(log.read_text(errors="replace"))}
        if len(found) == n:
            return found
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{n} workers did not start:\n{log.read_text()[-3000:]}")
