"""The `/v1/responses` store on SQLite and PostgreSQL: team scoping, retention on read, the prune job."""

from __future__ import annotations

import asyncio
import datetime as dt

from gateway.config import ResponsesConfig
from gateway.store.responses import ResponsePruneJob, ResponseStore, StoredResponse
from tests.support.db import DbTarget

NOW = dt.datetime(2027, 1, 10, 12, 0, tzinfo=dt.UTC)


def stored(response_id: str, team: str, created_at: dt.datetime) -> StoredResponse:
    return StoredResponse(
        id=response_id,
        team=team,
        key_id="k1",
        created_at=created_at,
        previous_response_id=None,
        response={"id": response_id, "object": "response", "output": []},
        input_items=[{"id": "msg_1", "type": "message", "role": "user", "content": []}],
        history=[{"role": "user", "content": "hello"}],
    )


def test_scoping_retention_and_prune(migrated_target: DbTarget) -> None:
    engine = migrated_target.make_engine()
    store = ResponseStore(engine, ResponsesConfig(retention_days=7), {"quiet": False})
    try:
        asyncio.run(store.save(stored("resp_new", "alpha", NOW - dt.timedelta(days=1))))
        asyncio.run(store.save(stored("resp_old", "alpha", NOW - dt.timedelta(days=8))))
        found = asyncio.run(store.load("resp_new", "alpha", now=NOW))
        assert found is not None and found.history == [{"role": "user", "content": "hello"}]
        assert found.created_at == NOW - dt.timedelta(days=1) and found.key_id == "k1"
        assert asyncio.run(store.load("resp_new", "beta", now=NOW)) is None  # another team's: absent
        assert asyncio.run(store.load("resp_old", "alpha", now=NOW)) is None  # past retention, not yet pruned
        assert not asyncio.run(store.delete("resp_new", "beta", now=NOW))
        assert store.prune(NOW) == 1 and store.prune(NOW) == 0
        assert asyncio.run(store.load("resp_old", "alpha", now=NOW - dt.timedelta(days=2))) is None  # gone
        assert asyncio.run(store.delete("resp_new", "alpha", now=NOW))
        assert asyncio.run(store.load("resp_new", "alpha", now=NOW)) is None
        assert store.team_may_store("alpha") and not store.team_may_store("quiet")
    finally:
        engine.dispose()


def test_the_prune_job_runs_at_start(migrated_target: DbTarget) -> None:
    engine = migrated_target.make_engine()
    store = ResponseStore(engine, ResponsesConfig(retention_days=1), {})
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    try:
        asyncio.run(store.save(stored("resp_stale", "alpha", old)))

        async def run_once() -> None:
            assert not await _gone(store, old)  # read as of its own time, it is still there
            job = ResponsePruneJob(store, interval_s=3600)
            job.start()
            for _ in range(300):
                await asyncio.sleep(0.01)
                if await _gone(store, old):
                    break
            await job.aclose()

        asyncio.run(run_once())
        assert asyncio.run(_gone(store, old))  # deleted by the job, not hidden by the retention
    finally:
        engine.dispose()


async def _gone(store: ResponseStore, at: dt.datetime) -> bool:
    return await store.load("resp_stale", "alpha", now=at) is None
