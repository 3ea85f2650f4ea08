"""A batch of 300 items across two `switchboard serve` replicas on PostgreSQL, one SIGKILLed midway: the
other takes over its expired leases and the batch completes with every custom_id exactly once; a replica
restarted afterwards replays its ledger journal and finds nothing left to do (state lives in SQL only)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy.engine import Engine

from tests.support.batch_rig import batch_rows, chat_line, file_lines, submit, wait_final
from tests.support.replica_rig import ENV
from tests.support.replicas import FakeUpstream, GatewayReplicas, pg_schema
from tests.support.services import PG_URL

pytestmark = pytest.mark.postgres
ITEMS = 300
CONCURRENCY = 6


def _config(upstream_url: str, schema: str, files_dir: Path) -> dict[str, Any]:
    return {
        "database": {"url": PG_URL, "schema_name": schema, "auto_migrate": False, "flush_interval_s": 0.02},
        "files": {"local_dir": str(files_dir)},  # one directory both replicas mount
        "batch": {"lease_s": 2.0, "poll_s": 0.1, "concurrency": CONCURRENCY, "claim_size": 3},
        "backends": {
            "up": {"kind": "openai", "base_url": upstream_url + "/v1", "api_key_env": "SB_REP_UPSTREAM_KEY"}
        },
        "models": {
            "chat": {
                "backend": "up",
                "upstream_model": "batch-slow",
                "input_usd_per_mtok": "1",
                "output_usd_per_mtok": "2",
            }
        },
        "teams": {"jobs": {"models": ["*"]}},
    }


@pytest.fixture
def pair(workdir: Path, upstream: FakeUpstream) -> Iterator[tuple[GatewayReplicas, Engine]]:
    upstream.configure("batch-slow", ttft_ms=60, n_tokens=4)
    with pg_schema(PG_URL, {"jobs": ["*"]}) as (schema, engine):
        config = _config(upstream.base_url, schema, workdir / "batch-files")
        replicas = GatewayReplicas(config, workdir, n=2, name="batch", env=ENV).start()
        try:
            yield replicas, engine
        finally:
            replicas.stop()


def test_a_batch_survives_a_sigkilled_replica_exactly_once(pair: tuple[GatewayReplicas, Engine]) -> None:
    from gateway.store import keys

    replicas, engine = pair
    key = keys.create_key(engine, "jobs", name="batch", models=None, expires_at=None).plaintext
    killed, survivor = (openai.OpenAI(base_url=u + "/v1", api_key=key, max_retries=0) for u in replicas.urls)
    created = submit(killed, [chat_line(i) for i in range(ITEMS)])

    deadline = time.monotonic() + 60
    while True:
        counts = survivor.batches.retrieve(created.id).request_counts
        if counts is not None and counts.completed >= ITEMS // 4:
            break
        assert time.monotonic() < deadline, "the batch did not get going"
        time.sleep(0.05)
    replicas.process(0).kill()  # SIGKILL: no drain, its leases are simply left behind
    replicas.process(0).wait(timeout=10)
    at_kill = counts.completed
    assert at_kill < ITEMS, "finished before the kill; make the upstream slower"

    batch, seen = wait_final(survivor, created.id, timeout_s=120)
    assert batch.status == "completed", seen
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": ITEMS, "completed": ITEMS, "failed": 0}
    out = file_lines(survivor, batch.output_file_id)
    ids = [o["custom_id"] for o in out]
    assert len(ids) == ITEMS and set(ids) == {f"req-{i}" for i in range(ITEMS)}  # each exactly once
    assert batch.error_file_id is None
    # Restarted, the killed replica replays its ledger journal (rows it had not flushed) and finds no batch
    # work left. Every answer has its ledger row; items the killed replica was running may have run twice
    # (at most one lease's worth), but only one of the two answers is in the output.
    replicas.restart(0)
    assert openai.OpenAI(base_url=replicas.urls[0] + "/v1", api_key=key).batches.retrieve(batch.id) == batch
    rows = {r["request_id"]: r for r in batch_rows(engine, batch.id, ITEMS, timeout_s=20)}
    assert {o["response"]["request_id"] for o in out} <= set(rows)
    assert ITEMS <= len(rows) <= ITEMS + CONCURRENCY
