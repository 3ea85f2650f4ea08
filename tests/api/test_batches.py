"""`/v1/batches` through the official `openai` SDK against a live gateway on PostgreSQL (and SQLite for the
basic round trip): upload, create, poll to completed, download the output and error files for the chat,
responses and embeddings endpoints; bad lines become error entries, never a failed batch; cancel midway;
team scoping; the privacy floor; budgets; one ledger row per item with the batch id, at batch prices."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from gateway.http.app import create_app
from gateway.store.db import make_engine
from tests.support.api_gateway import FAKE_UPSTREAM_KEY, Gateway
from tests.support.batch_rig import (
    PII,
    batch_config,
    batch_rows,
    chat_line,
    file_lines,
    line,
    submit,
    wait_final,
)
from tests.support.fake_provider import FakeProvider
from tests.support.fake_wire import fake_vector
from tests.support.live import LiveServer
from tests.support.services import PG_URL


def _serve(fake: FakeProvider, tmp: Path, db: dict[str, Any], **batch: Any) -> Iterator[Gateway]:
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    config = batch_config(
        fake.base_url, {**db, "spill_path": str(tmp / "spill")}, str(tmp / "files"), **batch
    )
    with LiveServer(create_app(config)) as server:
        engine = make_engine(config.database.url, config.database.schema_name)
        try:
            yield Gateway(server.base_url, config, engine, fake)
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def pg_batch(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    schema = "batch_" + uuid.uuid4().hex[:10]
    db = {"url": PG_URL, "schema_name": schema, "auto_migrate": True}
    try:
        yield from _serve(fake, tmp_path_factory.mktemp("batch-pg"), db)
    finally:
        with sa.create_engine(PG_URL).begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="module")
def sqlite_batch(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("batch-sqlite")
    yield from _serve(fake, tmp, {"url": f"sqlite:///{tmp}/sb.db"})


def sdk_for(gw: Gateway, team: str = "alpha") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=gw.key(team), max_retries=0, timeout=30)


def _tokens(content: str) -> int:
    return len(content.split(" "))


def check_chat_round_trip(gw: Gateway) -> None:
    sdk = sdk_for(gw)
    good = [chat_line(i) for i in range(12)]
    bad = [
        {
            "custom_id": "broken",
            "url": "/v1/chat/completions",
            "body": {},
        },  # no `method` (non-JSON: a 400 upload)
        line("other-endpoint", {"model": "chat", "input": "x"}, url="/v1/embeddings"),
        chat_line(100, model="no-such-model"),
    ]
    created = submit(sdk, [*good[:6], *bad, *good[6:]])
    assert created.status == "validating" and created.metadata == {"job": "test"}
    assert created.request_counts is not None and created.request_counts.total == 0
    batch, seen = wait_final(sdk, created.id)
    assert batch.status == "completed", (seen, batch.errors)
    assert seen[-2:] in (["in_progress", "completed"], ["finalizing", "completed"]) or seen == ["completed"]
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 15, "completed": 12, "failed": 3}
    assert batch.completed_at and batch.in_progress_at and batch.expires_at > batch.created_at

    out = file_lines(sdk, batch.output_file_id)
    by_id = {o["custom_id"]: o for o in out}
    assert len(out) == len(by_id) == 12 and set(by_id) == {f"req-{i}" for i in range(12)}
    for i in range(12):
        entry = by_id[f"req-{i}"]
        assert entry["id"].startswith("batch_req_") and entry["error"] is None
        response = entry["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == "chat"
        assert _tokens(body["choices"][0]["message"]["content"]) == i % 5 + 1  # its own max_tokens
    errors = {e["custom_id"]: e for e in file_lines(sdk, batch.error_file_id)}
    assert set(errors) == {"broken", "other-endpoint", "req-100"}
    assert errors["broken"]["response"] is None
    assert errors["broken"]["error"]["code"] == "missing_required_parameter"
    assert errors["other-endpoint"]["error"]["code"] == "invalid_url"
    unknown = errors["req-100"]["response"]
    assert unknown["status_code"] == 404 and unknown["body"]["error"]["code"] == "model_not_found"

    # Self-hosted engines are told these are batch work (they schedule it behind interactive requests).
    sent = gw.fake.received("b-chat")[-12:]
    assert [r["headers"].get("x-switchboard-priority") for r in sent] == ["batch"] * 12
    sdk.chat.completions.create(model="chat", messages=[{"role": "user", "content": "now"}], max_tokens=1)
    assert "x-switchboard-priority" not in gw.fake.received("b-chat")[-1]["headers"]

    # One ledger row per item that reached the pipeline (the unknown model's too), tagged and batch-priced.
    rows = batch_rows(gw.db, batch.id, 13)
    assert len(rows) == 13 and {r["request_id"] for r in rows} >= {o["response"]["request_id"] for o in out}
    for row in rows:
        if row["status"] != "ok":
            assert row["requested_model"] == "no-such-model"
            continue
        expected = Decimal(row["prompt_tokens"]) * 1 + Decimal(row["completion_tokens"]) * 4  # batch prices
        assert row["cost_micro_usd"] == int(expected) and row["backend"] == "selfhosted"


def test_chat_batch_round_trip_sqlite(sqlite_batch: Gateway) -> None:
    check_chat_round_trip(sqlite_batch)


@pytest.mark.postgres
def test_chat_batch_round_trip_postgres(pg_batch: Gateway) -> None:
    check_chat_round_trip(pg_batch)


@pytest.mark.postgres
def test_responses_and_embeddings_batches(pg_batch: Gateway) -> None:
    sdk = sdk_for(pg_batch)
    answers = [
        line(
            f"r-{i}", {"model": "chat", "input": f"tell me {i}", "max_output_tokens": i + 1}, "/v1/responses"
        )
        for i in range(5)
    ]
    texts = [f"embed this text {i}" for i in range(6)]
    vectors = [line(f"e-{i}", {"model": "emb", "input": t}, "/v1/embeddings") for i, t in enumerate(texts)]
    first = submit(sdk, answers, "/v1/responses")
    second = submit(sdk, vectors, "/v1/embeddings")
    for created, kind in ((first, "responses"), (second, "embeddings")):
        batch, _ = wait_final(sdk, created.id)
        assert batch.status == "completed" and batch.error_file_id is None, kind
        out = {o["custom_id"]: o["response"] for o in file_lines(sdk, batch.output_file_id)}
        if kind == "responses":
            assert set(out) == {f"r-{i}" for i in range(5)}
            for i in range(5):
                body = out[f"r-{i}"]["body"]
                assert body["object"] == "response" and body["status"] in ("completed", "incomplete")
                text = body["output"][0]["content"][0]["text"]
                assert _tokens(text) == i + 1
        else:
            assert set(out) == {f"e-{i}" for i in range(6)}
            for i, text in enumerate(texts):
                body = out[f"e-{i}"]["body"]
                assert body["object"] == "list" and body["data"][0]["embedding"] == fake_vector(text)
        assert len(batch_rows(pg_batch.db, batch.id, len(out))) == len(out)
    assert {r["endpoint"] for r in batch_rows(pg_batch.db, second.id, 6)} == {"embeddings"}


@pytest.mark.postgres
def test_cancel_midway_keeps_partial_output(pg_batch: Gateway, fake: FakeProvider) -> None:
    fake.configure("b-slow", ttft_ms=150)
    sdk = sdk_for(pg_batch)
    created = submit(sdk, [chat_line(i, model="slow") for i in range(60)])
    deadline = time.monotonic() + 30
    while (sdk.batches.retrieve(created.id).request_counts or created.request_counts).completed < 8:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelling = sdk.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    batch, seen = wait_final(sdk, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None, seen
    out = file_lines(sdk, batch.output_file_id)
    ids = [o["custom_id"] for o in out]
    assert 8 <= len(ids) < 60 and len(set(ids)) == len(ids)
    assert batch.request_counts is not None and batch.request_counts.completed == len(ids)
    assert all(o["response"]["status_code"] == 200 for o in out)
    # Nothing more runs after the cancel settled.
    rows = len(batch_rows(pg_batch.db, batch.id, 0))
    time.sleep(0.5)
    assert len(batch_rows(pg_batch.db, batch.id, 0)) == rows == len(ids)
    assert sdk.batches.cancel(created.id).status == "cancelled"  # idempotent


@pytest.mark.postgres
def test_team_scoping_and_bad_requests(pg_batch: Gateway) -> None:
    alpha, beta = sdk_for(pg_batch), sdk_for(pg_batch, "beta")
    uploaded = alpha.files.create(file=("a.jsonl", b'{"x": 1}\n'), purpose="batch")
    with pytest.raises(openai.NotFoundError) as caught:
        beta.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert caught.value.status_code == 404 and "file" in caught.value.message
    own = alpha.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        beta.batches.retrieve(own.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.cancel(own.id)
    assert own.id not in {b.id for b in beta.batches.list()}
    assert own.id in {b.id for b in alpha.batches.list()}
    for kwargs, param in (
        ({"endpoint": "/v1/completions", "completion_window": "24h"}, "endpoint"),
        ({"endpoint": "/v1/chat/completions", "completion_window": "1h"}, "completion_window"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            alpha.batches.create(input_file_id=uploaded.id, **kwargs)  # type: ignore[arg-type]
        assert bad.value.body["param"] == param  # type: ignore[index]
    # A file of bad lines makes a completed batch whose every line is in the error file.
    batch, _ = wait_final(alpha, own.id)
    assert batch.status == "completed" and batch.output_file_id is None
    assert [e["error"]["code"] for e in file_lines(alpha, batch.error_file_id)] == [
        "missing_required_parameter"
    ]


@pytest.mark.postgres
def test_privacy_floor_holds_for_batch_items(pg_batch: Gateway, fake: FakeProvider) -> None:
    sdk = sdk_for(pg_batch)
    before = len(fake.requests("b-gpt"))
    lines = [
        chat_line(0, model="gpt", content=PII),
        chat_line(1, model="gpt"),
        chat_line(2, model="mixed", content=PII),
    ]
    batch, _ = wait_final(sdk, submit(sdk, lines).id)
    assert batch.status == "completed"
    errors = {e["custom_id"]: e["response"] for e in file_lines(sdk, batch.error_file_id)}
    assert set(errors) == {"req-0"} and errors["req-0"]["status_code"] == 400
    assert "privacy floor" in errors["req-0"]["body"]["error"]["message"]
    assert PII not in str(fake.requests("b-gpt")[before:]) and len(fake.requests("b-gpt")) == before + 1
    rows = {r["request_id"]: r for r in batch_rows(pg_batch.db, batch.id, 3)}
    served = {
        o["custom_id"]: rows[o["response"]["request_id"]] for o in file_lines(sdk, batch.output_file_id)
    }
    assert served["req-2"]["backend"] == "selfhosted" and served["req-2"]["privacy_class"].startswith(
        "internal"
    )
    assert served["req-1"]["backend"] == "cloud"  # nothing self-hosted serves `gpt`: the cloud, batch-priced
    expected = served["req-1"]["prompt_tokens"] * 1 + served["req-1"]["completion_tokens"] * 4
    assert served["req-1"]["cost_micro_usd"] == expected


@pytest.mark.postgres
def test_budget_runs_out_mid_batch(pg_batch: Gateway) -> None:
    sdk = sdk_for(pg_batch, "broke")  # 500 micro-USD a day; each answer costs about 60 at batch prices
    lines = [chat_line(i, content="word " * 40) for i in range(40)]
    batch, _ = wait_final(sdk, submit(sdk, lines).id)
    assert batch.status == "completed"
    errors = file_lines(sdk, batch.error_file_id)
    assert errors and {e["response"]["body"]["error"]["code"] for e in errors} == {"insufficient_quota"}
    assert batch.request_counts is not None and batch.request_counts.completed + len(errors) == 40


@pytest.mark.postgres
def test_operator_cli_and_metrics(pg_batch: Gateway, fake: FakeProvider, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gateway.cli import app

    cfg = tmp_path / "sb.toml"
    db = pg_batch.config.database
    cfg.write_text(f'[database]\nurl = "{db.url}"\nschema_name = "{db.schema_name}"\n')

    def cli(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, [*args, "--config", str(cfg)], terminal_width=200)
        return result.exit_code, result.output

    fake.configure("b-slow", ttft_ms=400)  # 100 items, 8 at a time: about 5 s, and /metrics updates every 2
    sdk = sdk_for(pg_batch, "beta")
    created = submit(sdk, [chat_line(i, model="slow") for i in range(100)])
    deadline = time.monotonic() + 20
    gauges: dict[str, float] = {}
    while time.monotonic() < deadline:  # /metrics counts the batch's items while it runs
        text = httpx.get(pg_batch.base_url + "/metrics").text
        gauges = {
            name: float(value)
            for name, value in (
                ln.split(" ") for ln in text.splitlines() if ln.startswith("switchboard_batch_items")
            )
        }
        # Both at once: a refresh taken while the batch's lines are still being read in shows a few leased
        # and none queued yet (CI saw running 3, queued 0); the next one, 2 s on, shows both.
        running = gauges.get("switchboard_batch_items_running", 0)
        if running > 0 and gauges.get("switchboard_batch_items_queued", 0) > 0:
            break
        time.sleep(0.1)
    assert gauges["switchboard_batch_items_running"] > 0 and gauges["switchboard_batch_items_queued"] > 0

    code, out = cli("batches", "list", "--team", "beta")
    assert code == 0 and created.id in out and "in_progress" in out
    code, out = cli("batches", "cancel", created.id)
    assert code == 0 and "cancelling" in out
    code, out = cli("batches", "show", created.id, "--watch")
    assert code == 0 and "cancelled" in out and created.id in out
    assert sdk.batches.retrieve(created.id).status == "cancelled"
    code, out = cli("batches", "cancel", created.id)
    assert code == 0 and "already cancelled" in out
    code, out = cli("batches", "show", "batch_nope")
    assert code == 2 and "no batch" in out
