"""Where batch items run, against a live gateway on PostgreSQL: on self-hosted capacity only while its engine
has room (its /metrics say so), and on cloud deployments once the completion window nears its end."""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from gateway.http.app import create_app
from gateway.store.db import make_engine
from tests.support.api_gateway import FAKE_UPSTREAM_KEY, Gateway
from tests.support.batch_rig import batch_config, batch_rows, chat_line, file_lines, submit, wait_final
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.services import PG_URL

pytestmark = pytest.mark.postgres


class EngineMetrics:
    """A stand-in engine /metrics page whose queue depth and KV use the test sets."""

    def __init__(self) -> None:
        self.queue_depth, self.kv_used = 0, 0.1

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = (
            f"switchboard_engine_queue_depth {self.queue_depth}\n"
            f"switchboard_engine_kv_cache_usage_ratio {self.kv_used}\n"
            "switchboard_engine_running_requests 1\n"
        ).encode()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": body})


def capacity_tokens(base_url: str) -> dict[tuple[str, str, str], float]:
    """switchboard_capacity_tokens_total by (capacity, priority, kind), read from a live /metrics page."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "switchboard_capacity_tokens_total":
                labels = sample.labels
                out[(labels["capacity"], labels["priority"], labels["kind"])] = sample.value
    return out


def _gateway(fake: FakeProvider, tmp: Path, schema: str, **overrides: Any) -> Iterator[Gateway]:
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    metrics_url = overrides.pop("metrics_url", None)
    db = {"url": PG_URL, "schema_name": schema, "auto_migrate": True, "spill_path": str(tmp / "spill")}
    config = batch_config(fake.base_url, db, str(tmp / "files"), **overrides)
    if metrics_url is not None:
        backend = config.backends["selfhosted"].model_copy(update={"metrics_url": metrics_url})
        routing = config.routing.model_copy(update={"metrics_poll_s": 0.05})
        config = config.model_copy(
            update={"backends": {**config.backends, "selfhosted": backend}, "routing": routing}
        )
    try:
        with LiveServer(create_app(config)) as server:
            engine = make_engine(PG_URL, schema)
            try:
                yield Gateway(server.base_url, config, engine, fake)
            finally:
                engine.dispose()
    finally:
        with sa.create_engine(PG_URL).begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_items_wait_while_the_engine_is_busy(fake: FakeProvider, tmp_path: Path) -> None:
    page = EngineMetrics()
    page.queue_depth, page.kv_used = 4, 0.95  # a queue and its KV nearly full: no room for batch work
    with LiveServer(page) as metrics:  # type: ignore[arg-type]
        gateways = _gateway(fake, tmp_path, "bplace_" + uuid.uuid4().hex[:8], metrics_url=metrics.base_url)
        gw = next(gateways)
        try:
            sdk = openai.OpenAI(base_url=gw.v1, api_key=gw.key(), max_retries=0)
            time.sleep(0.3)  # a few polls of the busy page
            created = submit(sdk, [chat_line(i, model="mixed") for i in range(6)])
            time.sleep(1.5)
            waiting = sdk.batches.retrieve(created.id)
            assert waiting.status == "in_progress" and waiting.request_counts is not None
            assert waiting.request_counts.completed == 0  # not sent to the cloud either: the window is long
            assert batch_rows(gw.db, created.id, 0, timeout_s=0) == []
            page.queue_depth, page.kv_used = 0, 0.2  # the interactive peak is over
            batch, _ = wait_final(sdk, created.id)
            assert batch.status == "completed"
            rows = batch_rows(gw.db, batch.id, 6)
            assert len(rows) == 6 and {r["backend"] for r in rows} == {"selfhosted"}
        finally:
            gateways.close()


def test_deadline_spill_moves_the_rest_to_the_cloud(fake: FakeProvider, tmp_path: Path) -> None:
    fake.configure("b-mixed-local", ttft_ms=300)  # a slow engine: the window cannot be met on it alone
    settings = {"window_s": 5.0, "spill_slack_s": 3.0, "concurrency": 1, "claim_size": 1}
    gateways = _gateway(fake, tmp_path, "bspill_" + uuid.uuid4().hex[:8], **settings)
    gw = next(gateways)
    try:
        sdk = openai.OpenAI(base_url=gw.v1, api_key=gw.key(), max_retries=0)
        created = submit(sdk, [chat_line(i, model="mixed") for i in range(30)])
        batch, seen = wait_final(sdk, created.id, timeout_s=30)
        assert batch.status == "completed", seen
        assert batch.completed_at is not None and batch.completed_at <= batch.expires_at
        ids = [o["custom_id"] for o in file_lines(sdk, batch.output_file_id)]
        assert sorted(ids) == sorted(f"req-{i}" for i in range(30))
        rows = batch_rows(gw.db, batch.id, 30)
        spill_at = dt.datetime.fromtimestamp(batch.expires_at - 3.0, dt.UTC)
        local = [r for r in rows if r["backend"] == "selfhosted"]
        cloud = [r for r in rows if r["backend"] == "cloud"]
        assert local and cloud and len(local) + len(cloud) == 30
        assert all(r["created_at"] < spill_at + dt.timedelta(seconds=1) for r in local)
        assert all(r["created_at"] >= spill_at - dt.timedelta(seconds=1) for r in cloud)
        for r in cloud:  # the cloud deployment's batch price
            assert r["cost_micro_usd"] == r["prompt_tokens"] * 1 + r["completion_tokens"] * 4
        sdk.chat.completions.create(model="mixed", messages=[{"role": "user", "content": "now"}])
        tokens = capacity_tokens(gw.base_url)  # /metrics: batch tokens by the capacity that served them
        for capacity, served in (("owned", local), ("cloud", cloud)):
            for kind in ("prompt", "completion"):
                want = sum(r[f"{kind}_tokens"] for r in served)
                assert tokens.get((capacity, "batch", kind), 0.0) == want > 0, (capacity, kind)
        interactive = sum(v for (_c, priority, _k), v in tokens.items() if priority == "interactive")
        assert interactive > 0 and {c for c, _p, _k in tokens} <= {"owned", "cloud"}
    finally:
        gateways.close()
        fake.configure("b-mixed-local", ttft_ms=0)
