"""The edge hub through a live gateway (uvicorn) and scripted nodes (fake_edge.py) over real WebSockets.

Enrollment and refusal (close codes), revocation within seconds, routing to nodes by label and load, the
fail-closed `edge` floor, a node dropping before and after its first chunk (fallback, error event, ledger
rows), cancellation, liveness by heartbeat, and the health probe of a static edge endpoint. The real engine
runs in tests/edge/test_edge_e2e.py; here nodes answer from scripts, so every test takes well under a second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai import AsyncOpenAI
from sqlalchemy.engine import Engine

from backends.base import Usage
from backends.edge import wire
from gateway.config import Config, parse_config
from gateway.edge import tokens
from gateway.http.app import create_app
from gateway.store import db, keys
from gateway.store.db import make_engine
from tests.support.fake_edge import FakeNode, denied, refused, until
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer, free_port
from tests.support.timing import CUT_OFF_S
from tests.support.usage import wait_for_usage_row

ADMIN_KEY = "admin-" + uuid.uuid4().hex
TTL_S = 1.0
HEARTBEAT_S = 0.2
TOKEN_CHECK_S = 0.25


def edge_config(fake_v1: str, tmp: str) -> Config:
    return parse_config(
        {
            "server": {"admin_key_env": "SB_EDGE_ADMIN_KEY", "key_cache_ttl_s": 0.5},
            "database": {
                "url": f"sqlite:///{tmp}/sb.db",
                "spill_path": f"{tmp}/spill.jsonl",
                "flush_interval_s": 0.02,
            },
            "backends": {
                "edge": {
                    "kind": "edge",
                    "timeout_s": 5,
                    "labels": {"region": "eu"},
                    "prior_tokens_per_s": 20,
                },
                "site": {"kind": "openai", "base_url": fake_v1},  # internal tier
                "plant9": {  # a static edge endpoint (llama.cpp at a site) that is down
                    "kind": "openai",
                    "base_url": f"http://127.0.0.1:{free_port()}/v1",
                    "privacy_tier": "edge",
                    "health_interval_s": 0.1,
                    "connect_timeout_s": 0.2,
                },
            },
            "models": {
                "smollm2": {"backend": "edge", "upstream_model": "smollm2"},
                "mixed": {
                    "deployments": [
                        {"backend": "edge", "upstream_model": "smollm2"},
                        {
                            "backend": "site",
                            "upstream_model": "site-fast",
                            "input_usd_per_mtok": 0,
                            "output_usd_per_mtok": 0,
                        },
                    ]
                },
                "static": {"backend": "plant9", "upstream_model": "llama"},
            },
            "teams": {"t": {"models": ["*"]}, "vault": {"models": ["*"], "privacy_floor": "edge"}},
            "routing": {"breaker_failures": 1_000_000},
            "edge": {
                "heartbeat_s": HEARTBEAT_S,
                "ttl_s": TTL_S,
                "token_check_s": TOKEN_CHECK_S,
                "hello_timeout_s": 1,
            },
        }
    )


@dataclass
class Hub:
    base_url: str
    db: Engine
    fake: FakeProvider

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + wire.CONNECT_PATH

    def token(self, name: str = "t", **labels: str) -> tokens.CreatedToken:
        return tokens.create_token(self.db, name=name, labels=labels)

    def key(self, team: str = "t") -> str:
        return keys.create_key(self.db, team, name="edge", models=None, expires_at=None).plaintext

    def client(self, team: str = "t") -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.key(team), max_retries=0, timeout=20)

    async def node(self, node_id: str | None = None, **kwargs: Any) -> FakeNode:
        token = kwargs.pop("token", None) or self.token().plaintext
        return await FakeNode(self.ws_url, token, node_id or f"n-{uuid.uuid4().hex[:6]}", **kwargs).start()

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        return httpx.request(method, self.base_url + path, headers=headers, timeout=10, **kwargs)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["node_id"]: n for n in self.admin("GET", "/admin/edge/nodes").json()["data"]}

    def usage_row(self, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        return wait_for_usage_row(self.db, request_id, timeout_s)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    os.environ["SB_EDGE_ADMIN_KEY"] = ADMIN_KEY
    tmp = tmp_path_factory.mktemp("edge-hub")
    with FakeProvider() as fake:
        config = edge_config(fake.base_url + "/v1", str(tmp))
        with LiveServer(create_app(config)) as server:
            engine = make_engine(config.database.url)
            try:
                yield Hub(server.base_url, engine, fake)
            finally:
                engine.dispose()


async def stopped(*nodes: FakeNode) -> None:
    await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


# ---- enrollment -------------------------------------------------------------------------------------------


async def test_node_enrolls_is_listed_and_serves_both_ways(hub: Hub) -> None:
    token = hub.token("plant-7", site="plant-7")
    node = await hub.node("enroll-a", token=token.plaintext, labels={"site": "spoofed", "line": "2"})
    try:
        assert node.welcome is not None
        assert dict(node.welcome.labels) == {"site": "plant-7", "line": "2"}  # the token's labels win
        assert node.welcome.heartbeat_s == HEARTBEAT_S
        listed = hub.nodes()["enroll-a"]
        assert listed["state"] == "connected" and listed["labels"] == {"site": "plant-7", "line": "2"}
        assert listed["token_id"] == token.info.token_id and listed["models"] == ["smollm2"]
        client = hub.client()
        raw = await client.chat.completions.with_raw_response.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            extra_headers={"x-switchboard-site": "plant-7"},
        )
        reply = raw.parse()
        assert reply.choices[0].message.content == "Hello from enroll-a"
        assert raw.headers["x-switchboard-backend"] == "edge/enroll-a"
        row = hub.usage_row(raw.headers["x-request-id"])
        assert (row["backend"], row["status"], row["completion_tokens"]) == ("edge/enroll-a", "ok", 3)
        assert row["privacy_class"] == "external" and "smollm2@edge/enroll-a" in row["route_reason"]
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello from enroll-a" and chunks[-1].usage is not None
        request = node.requests[-1]
        assert request.model == "smollm2" and request.max_tokens == 5
        assert "sk-sb-" not in wire.encode(request)  # nodes never see team API keys
    finally:
        await stopped(node)
    await until(lambda: hub.nodes().get("enroll-a", {}).get("state") == "disconnected")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda hub: "", "missing enrollment token"),
        (lambda hub: "sk-sb-" + "x" * 43, "unknown enrollment token"),
        (lambda hub: "sbe_" + "x" * 43, "unknown enrollment token"),
        (
            lambda hub: tokens.revoke_token(hub.db, (t := hub.token()).info.token_id) and t.plaintext,
            "was revoked",
        ),
    ],
    ids=["missing", "team-key", "unknown", "revoked"],
)
async def test_bad_tokens_are_refused_with_401_before_the_upgrade(hub: Hub, make: Any, reason: str) -> None:
    denial = await denied(hub.ws_url, make(hub))
    assert denial.status == 401 and reason in denial.error["message"]
    assert denial.error["type"] == "authentication_error" and denial.retry_after is None


async def test_a_bad_token_never_gets_a_101(hub: Hub) -> None:
    """On the raw socket: the answer to the upgrade request is a 401 with a JSON body, not a 101."""
    host, port = hub.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                f"GET {wire.CONNECT_PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\nAuthorization: Bearer sbe_nope\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 401"), status_line
    assert "content-type: application/json" in [h.lower() for h in header_lines]


async def test_an_unreadable_database_is_503_with_retry_after(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(*_: Any) -> None:
        raise sa.exc.OperationalError("SELECT", {}, Exception("database is down"))

    monkeypatch.setattr(tokens, "lookup_token", unreadable)
    denial = await denied(hub.ws_url, hub.token().plaintext)
    assert denial.status == 503 and denial.retry_after is not None and int(denial.retry_after) >= 1
    assert "retry later" in denial.error["message"]


async def test_expired_token_is_refused(hub: Hub) -> None:
    now = dt.datetime.now(dt.UTC)
    created = tokens.create_token(hub.db, name="short", expires_at=now + dt.timedelta(seconds=1), now=now)
    with hub.db.begin() as conn:  # as if the second had passed
        conn.execute(
            sa.update(db.edge_tokens)
            .values(expires_at=now - dt.timedelta(seconds=1))
            .where(db.edge_tokens.c.id == created.info.token_id)
        )
    denial = await denied(hub.ws_url, created.plaintext)
    assert denial.status == 401 and "expired at" in denial.error["message"]


async def test_bad_hello_and_duplicate_node_id(hub: Hub) -> None:
    first = await hub.node("dup-a")
    try:
        code, text = await refused(hub.ws_url, hub.token().plaintext, node_id="dup-a")
        assert code == wire.CloseCode.DUPLICATE_NODE and "--node-id" in (text or "")
        code, text = await refused(hub.ws_url, hub.token().plaintext, node_id="bad/id")
        assert code == wire.CloseCode.BAD_HELLO and "node_id" in (text or "")
    finally:
        await stopped(first)


async def test_revoking_disconnects_its_nodes_within_seconds(hub: Hub) -> None:
    by_admin, by_cli = hub.token("a"), hub.token("b")
    a = await hub.node("rev-a", token=by_admin.plaintext)
    b = await hub.node("rev-b", token=by_cli.plaintext)
    try:
        answer = hub.admin("DELETE", f"/admin/edge/tokens/{by_admin.info.token_id}").json()
        assert answer["state"] == "revoked" and answer["disconnected"] == 1
        assert await a.wait_closed(2) == wire.CloseCode.UNAUTHORIZED
        started = time.monotonic()
        tokens.revoke_token(hub.db, by_cli.info.token_id)  # what `switchboard edge token revoke` does
        assert await b.wait_closed(5) == wire.CloseCode.UNAUTHORIZED
        assert time.monotonic() - started < 3 * TOKEN_CHECK_S + CUT_OFF_S
        assert "was revoked" in (b.close_reason or "")
        assert hub.admin("DELETE", "/admin/edge/tokens/et_nope").status_code == 404
    finally:
        await stopped(a, b)


async def test_admin_token_api(hub: Hub) -> None:
    made = hub.admin(
        "POST", "/admin/edge/tokens", json={"name": "api", "labels": {"site": "p1"}, "expires_in": "7d"}
    )
    assert made.status_code == 201
    body = made.json()
    assert body["token"].startswith("sbe_") and body["state"] == "active" and body["labels"] == {"site": "p1"}
    listed = {t["id"]: t for t in hub.admin("GET", "/admin/edge/tokens").json()["data"]}
    assert listed[body["id"]]["name"] == "api" and "token" not in listed[body["id"]]
    bad = hub.admin("POST", "/admin/edge/tokens", json={"name": "x", "expires_in": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "expires_in"
    team_key = httpx.get(hub.base_url + "/admin/edge/nodes", headers={"authorization": f"Bearer {hub.key()}"})
    assert team_key.status_code == 403


# ---- routing --------------------------------------------------------------------------------------------


async def test_site_header_picks_the_node_and_an_absent_site_is_503(hub: Hub) -> None:
    a = await hub.node("site-a", token=hub.token(site="s-a").plaintext)
    b = await hub.node("site-b", token=hub.token(site="s-b").plaintext)
    client = hub.client()
    try:
        for site in ("s-a", "s-b", "s-a"):
            raw = await client.chat.completions.with_raw_response.create(
                model="smollm2",
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-switchboard-site": site},
            )
            assert raw.headers["x-switchboard-backend"] == f"edge/site-{site[-1]}"
        explained = hub.admin(
            "GET", "/admin/route/explain", params={"team": "t", "model": "smollm2", "site": "s-b"}
        )
        assert [c["backend"] for c in explained.json()["candidates"]] == ["edge/site-b"]
        assert explained.json()["policy"]["required_labels"] == {"site": ["s-b"]}
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-switchboard-site": "s-z"},
            )
        assert info.value.status_code == 503
        assert "no live edge node labelled site=s-z" in info.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-switchboard-labels": "oops"},
            )
        assert bad.value.body["param"] == "x-switchboard-labels"  # type: ignore[index]
    finally:
        await stopped(a, b)


async def test_edge_floor_never_leaves_the_edge(hub: Hub) -> None:
    vault = hub.client("vault")
    hub.fake.configure("site-fast", n_tokens=3)
    with pytest.raises(openai.APIStatusError) as info:
        await vault.chat.completions.create(model="mixed", messages=[{"role": "user", "content": "secret"}])
    err = info.value
    assert err.status_code == 503 and err.body["code"] == "no_live_edge_node"  # type: ignore[index]
    assert (
        "`edge`: no live edge node serves `mixed`" in err.message and "switchboard edge serve" in err.message
    )
    assert "secret" not in err.message
    assert hub.fake.received("site-fast") == []
    node = await hub.node("vault-n")
    try:
        raw = await vault.chat.completions.with_raw_response.create(
            model="mixed", messages=[{"role": "user", "content": "s"}]
        )
        assert raw.headers["x-switchboard-backend"] == "edge/vault-n"
    finally:
        await stopped(node)
    # The only node goes away: the edge floor still refuses, the internal server is never asked.
    with pytest.raises(openai.APIStatusError) as again:
        await vault.chat.completions.create(
            model="mixed", messages=[{"role": "user", "content": "secret"}], stream=True
        )
    assert again.value.status_code == 503 and hub.fake.received("site-fast") == []
    # Another team (floor external) may use the internal server for the same model.
    other = await hub.client().chat.completions.with_raw_response.create(
        model="mixed", messages=[{"role": "user", "content": "s"}]
    )
    assert other.headers["x-switchboard-backend"] == "site"


async def test_request_not_started_moves_to_another_node(hub: Hub) -> None:
    async def hang(request: wire.Request, node: FakeNode) -> AsyncIterator[wire.Frame]:
        await asyncio.sleep(3600)
        yield wire.Done(request.id, "stop")

    # Both nodes; the hanging one looks idle and fast, so routing prefers it.
    stuck = await hub.node("move-stuck", answer=hang, tokens_per_s=500.0)
    good = await hub.node("move-good", tokens_per_s=5.0)
    good.load = wire.Heartbeat(0, 3, 0.5, 5.0)
    client = hub.client()
    try:
        await asyncio.sleep(2 * HEARTBEAT_S)
        call = asyncio.create_task(
            client.chat.completions.with_raw_response.create(
                model="smollm2", messages=[{"role": "user", "content": "x"}]
            )
        )
        await until(lambda: len(stuck.requests) == 1)
        await stuck.vanish()  # killed before its first chunk
        raw = await asyncio.wait_for(call, 10)
        assert raw.headers["x-switchboard-backend"] == "edge/move-good"
        row = hub.usage_row(raw.headers["x-request-id"])
        assert row["status"] == "ok" and row["attempts"] == 2 and row["backend"] == "edge/move-good"
    finally:
        await stopped(stuck, good)


async def test_stream_cut_after_first_chunk_ends_with_error_event_and_ledger_row(hub: Hub) -> None:
    cut = asyncio.Event()

    async def one_then_hang(request: wire.Request, node: FakeNode) -> AsyncIterator[wire.Frame]:
        yield wire.Chunk(request.id, "partial")
        cut.set()
        await asyncio.sleep(3600)
        yield wire.Done(request.id, "stop")

    node = await hub.node("cut-a", answer=one_then_hang)
    client = hub.client()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="smollm2", messages=[{"role": "user", "content": "x"}], stream=True
        )
        stream = raw.parse()
        first = await stream.__anext__()
        assert first.choices[0].delta.content == "partial"
        await asyncio.wait_for(cut.wait(), 5)
        await node.vanish()
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
        assert "cut the stream" in info.value.message and "disconnected" in info.value.message
        row = hub.usage_row(raw.headers["x-request-id"])
        assert row["status"] == "error" and row["backend"] == "edge/cut-a" and row["stream"]
        assert row["error_type"] == "upstream_bad_response"
    finally:
        await stopped(node)


async def test_client_going_away_cancels_on_the_node(hub: Hub) -> None:
    async def slow(request: wire.Request, node: FakeNode) -> AsyncIterator[wire.Frame]:
        for i in range(1000):
            yield wire.Chunk(request.id, f"{i} ")
            await asyncio.sleep(0.02)
        yield wire.Done(request.id, "length", Usage(1, 1000))

    node = await hub.node("cancel-a", answer=slow)
    try:
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream(
                "POST",
                hub.base_url + "/v1/chat/completions",
                headers={"authorization": f"Bearer {hub.key()}"},
                json={"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stream": True},
            ) as resp,
        ):
            request_id = resp.headers["x-request-id"]
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    break
        await until(lambda: len(node.cancels) == 1, 5)
        assert node.cancels[0].startswith(request_id)
        row = hub.usage_row(request_id)
        assert row["status"] == "client_closed" and row["http_status"] == 499
    finally:
        await stopped(node)


async def test_silent_node_leaves_routing_within_ttl_and_is_listed_stale(hub: Hub) -> None:
    node = await hub.node("quiet-a", heartbeats=False)
    client = hub.client()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="smollm2", messages=[{"role": "user", "content": "x"}]
        )
        assert raw.headers["x-switchboard-backend"] == "edge/quiet-a"
        started = time.monotonic()
        await until(lambda: hub.nodes()["quiet-a"]["state"] == "stale", TTL_S + CUT_OFF_S)
        assert time.monotonic() - started <= TTL_S + CUT_OFF_S
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 503
        assert await node.wait_closed(3 * TTL_S + 2) == 4408  # then the hub closes the silent socket
    finally:
        await stopped(node)


async def test_static_edge_endpoint_is_probed_and_leaves_routing(hub: Hub) -> None:
    client = hub.client("vault")
    await asyncio.sleep(0.5)  # a few probes of a port nobody listens on
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="static", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503 and info.value.body["code"] == "no_healthy_deployment"  # type: ignore[index]
    assert "health probe" in info.value.message and "backends.plant9.health_interval_s" in info.value.message


async def test_a_gateway_without_edge_backends_turns_nodes_away_with_a_reason(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    os.environ["SB_EDGE_ADMIN_KEY"] = ADMIN_KEY
    tmp = tmp_path_factory.mktemp("no-edge")
    config = parse_config(
        {
            "server": {"admin_key_env": "SB_EDGE_ADMIN_KEY"},
            "database": {"url": f"sqlite:///{tmp}/sb.db", "spill_path": f"{tmp}/spill.jsonl"},
        }
    )
    with LiveServer(create_app(config)) as server:
        url = server.base_url.replace("http://", "ws://") + wire.CONNECT_PATH
        code, reason = await refused(url, "sbe_" + "x" * 43)
        assert code == 1008 and "edge.enabled" in (reason or "")
        listed = httpx.get(
            server.base_url + "/admin/edge/nodes", headers={"authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert listed.json() == {"data": [], "enabled": False}
