"""Two gateway replicas sharing Redis and PostgreSQL, one real edge node (SmolLM2, int4) connected to replica
A only, and every request sent to replica B: B reaches the node through the relay (gateway/edge/relay.py).

Checked through the official `openai` SDK: B serves completions and streams from the node, with one ledger
row per request naming `edge/<node>`; a node killed mid-stream cuts B's stream with an error event and a
ledger row, as a local link's drop does; and the dead node leaves B's routing within ttl_s, after which a
request whose floor is `edge` gets the clean `no_live_edge_node` error. The tests run in file order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai import AsyncOpenAI
from sqlalchemy.engine import Engine

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gateway.edge import tokens  # noqa: E402
from gateway.store import (
    db,
    keys,  # noqa: E402
)
from tests.support.edge_node import wait_until  # noqa: E402
from tests.support.model_cache import smollm2_directory  # noqa: E402
from tests.support.replicas import ROOT, GatewayReplicas, pg_schema  # noqa: E402
from tests.support.services import PG_URL, REDIS_URL, delete_prefix  # noqa: E402
from tests.support.timing import CUT_OFF_S

pytestmark = [pytest.mark.model, pytest.mark.timeout(240)]

ADMIN_KEY = "admin-" + uuid.uuid4().hex
NODE = "relay-n1"
HEARTBEAT_S = 0.5
TTL_S = 3.0
HELLO = [{"role": "user", "content": "Say hello."}]
COUNT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


def config(schema: str, prefix: str) -> dict[str, Any]:
    return {
        "server": {"admin_key_env": "SB_RELAY_ADMIN_KEY", "key_cache_ttl_s": 0.5},
        "database": {"url": PG_URL, "schema_name": schema, "auto_migrate": False, "flush_interval_s": 0.02},
        "backends": {"edge": {"kind": "edge", "timeout_s": 60}},
        "models": {"smollm2": {"backend": "edge"}},
        "teams": {"t": {"models": ["*"]}, "vault": {"models": ["*"], "privacy_floor": "edge"}},
        "routing": {"breaker_failures": 1_000_000},
        "redis": {"url": REDIS_URL, "prefix": prefix, "timeout_ms": 1000, "retry_after_s": 0.2},
        "edge": {"heartbeat_s": HEARTBEAT_S, "ttl_s": TTL_S, "token_check_s": 1.0, "relay_timeout_s": 1.5},
    }


@dataclass
class Rig:
    replicas: GatewayReplicas
    db: Engine
    node: subprocess.Popen[bytes]
    node_log: Path

    @property
    def b(self) -> str:
        return self.replicas.urls[1]

    def logs(self) -> str:
        return self.replicas.logs_since_mark() + "\n--- node ---\n" + self.node_log.read_text()[-3000:]

    def routable(self, url: str, team: str = "t") -> set[str]:
        reply = httpx.get(
            url + "/admin/route/explain",
            params={"team": team, "model": "smollm2"},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
            timeout=10,
        )
        return {c["backend"] for c in reply.json().get("candidates", [])}

    def client(self, team: str = "t") -> AsyncOpenAI:
        key = keys.create_key(self.db, team, name="relay-e2e", models=None, expires_at=None).plaintext
        return AsyncOpenAI(base_url=self.b + "/v1", api_key=key, max_retries=0, timeout=120)

    def rows(self, request_id: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.db.connect() as conn:
                query = sa.select(db.usage).where(db.usage.c.request_id == request_id)
                found = [dict(r) for r in conn.execute(query).mappings()]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    async def wait(self, check: Any, what: str, timeout_s: float) -> float:
        return await wait_until(check, what, timeout_s, self.logs)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("edge-relay")
    prefix = f"test:relay-e2e:{uuid.uuid4().hex[:10]}:"
    model_dir = smollm2_directory()
    with pg_schema(PG_URL, {"t": ["*"], "vault": ["*"]}) as (schema, engine):
        token = tokens.create_token(engine, name="relay-node").plaintext
        replicas = GatewayReplicas(
            config(schema, prefix), tmp, n=2, name="relay", env={"SB_RELAY_ADMIN_KEY": ADMIN_KEY}
        )
        node_log = tmp / "node.log"
        node: subprocess.Popen[bytes] | None = None
        try:
            replicas.start()
            args = [
                "edge",
                "serve",
                "--gateway",
                replicas.urls[0],
                "--node-id",
                NODE,
                "--model",
                str(model_dir),
                "--quant",
                "int4",  # pinned: no autotune in this node process
            ]
            args += [
                "--threads",
                "1",
                "--max-batch",
                "2",
                "--kv-cache-mb",
                "32",
                "--max-tokens-default",
                "64",
            ]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "SWITCHBOARD_EDGE_TOKEN": token}
            with node_log.open("wb") as out:
                node = subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            built = Rig(replicas, engine, node, node_log)
            replicas.mark()
            asyncio.run(
                built.wait(lambda: f"edge/{NODE}" in built.routable(built.b), "node routable on B", 120)
            )
            yield built
        finally:
            if node is not None and node.poll() is None:
                node.kill()
                node.wait(10)
            replicas.stop()
            delete_prefix(REDIS_URL, prefix)


async def test_replica_b_serves_through_the_node_held_by_replica_a(rig: Rig) -> None:
    client = rig.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
    )
    reply = raw.parse()
    assert raw.headers["x-switchboard-backend"] == f"edge/{NODE}"
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens > 0
    streamed = await client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert streamed.headers["x-switchboard-backend"] == f"edge/{NODE}"
    chunks = [c async for c in streamed.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    for request_id, stream in (
        (raw.headers["x-request-id"], False),
        (streamed.headers["x-request-id"], True),
    ):
        rows = rig.rows(request_id)
        assert len(rows) == 1, rows  # B's row only: the holding replica writes none
        row = rows[0]
        assert (row["backend"], row["status"], row["stream"]) == (f"edge/{NODE}", "ok", stream)
        assert row["completion_tokens"] > 0


async def test_a_node_killed_mid_stream_cuts_the_relayed_stream_then_leaves_routing(rig: Rig) -> None:
    client = rig.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=COUNT,  # type: ignore[arg-type]
        max_tokens=400,
        stream=True,
        temperature=0,
    )
    stream = raw.parse()
    first = await stream.__anext__()
    assert first.choices
    rig.node.send_signal(signal.SIGKILL)
    killed_s = time.monotonic()
    with pytest.raises(openai.APIError) as cut:
        async for _ in stream:
            pass
    assert "cut the stream" in cut.value.message
    [row] = rig.rows(raw.headers["x-request-id"])
    assert (row["status"], row["backend"], row["stream"]) == ("error", f"edge/{NODE}", True)
    assert row["error_type"] == "upstream_bad_response"
    out_of_b = "node out of B's routing"
    await rig.wait(lambda: f"edge/{NODE}" not in rig.routable(rig.b), out_of_b, TTL_S + CUT_OFF_S)
    assert time.monotonic() - killed_s <= TTL_S + CUT_OFF_S
    vault = rig.client("vault")
    for streaming in (False, True):
        with pytest.raises(openai.APIStatusError) as refused:
            await vault.chat.completions.create(  # type: ignore[call-overload]
                model="smollm2", messages=HELLO, max_tokens=4, stream=streaming
            )
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "no_live_edge_node"  # type: ignore[index]
