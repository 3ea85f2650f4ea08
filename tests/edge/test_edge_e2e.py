"""End to end, real processes: a `switchboard serve` gateway and three `switchboard edge serve` nodes running
the bundled SmolLM2 (int4), enrolled over real loopback WebSockets, driven through the official `openai` SDK.

The nodes load SmolLM2 from a directory converted once from the bundled GGUF (tests/support/model_cache.py):
the same weights, quantized to int4 by each node, in seconds instead of ~35 s of GGUF conversion per process.
One gateway and three nodes are shared by the module; the tests run in file order and each leaves the rig as
the next one expects: serve (streaming too) -> a frozen node leaves routing within ttl_s and comes back ->
a node killed mid-load (queued requests move, the cut stream ends with an error event and a ledger row) and
restarted -> a revoked token's node is disconnected and its token refused -> the restarted node has rejoined
-> with every node down, a request whose floor is `edge` gets 503 and reaches no other tier.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.edge import wire  # noqa: E402
from gateway.cli import app as cli_app  # noqa: E402
from gateway.edge import tokens  # noqa: E402
from gateway.store import keys  # noqa: E402
from gateway.store.db import make_engine  # noqa: E402
from tests.support.edge_node import wait_until  # noqa: E402
from tests.support.fake_edge import denied  # noqa: E402
from tests.support.fake_provider import FakeProvider  # noqa: E402
from tests.support.live import free_port  # noqa: E402
from tests.support.model_cache import smollm2_directory  # noqa: E402
from tests.support.timing import CUT_OFF_S
from tests.support.usage import wait_for_usage_row

pytestmark = [pytest.mark.model, pytest.mark.timeout(420)]

ADMIN_KEY = "admin-" + uuid.uuid4().hex
HEARTBEAT_S = 0.5
TTL_S = 3.0
TOKEN_CHECK_S = 1.0
NODES = ("node-a", "node-b", "node-c")
LOAD_TIMEOUT_S = 180.0  # three model loads at once on two busy cores
COUNT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
HELLO = [{"role": "user", "content": "Say hello."}]

CONFIG = """
[server]
admin_key_env = "SB_E2E_ADMIN_KEY"
key_cache_ttl_s = 0.5
[database]
url = "sqlite:///{tmp}/sb.db"
spill_path = "{tmp}/spill.jsonl"
flush_interval_s = 0.05
[backends.edge]
kind = "edge"
timeout_s = 60
[backends.site]
kind = "openai"
base_url = "{fake}/v1"
[models.smollm2]
backend = "edge"
[[models.mixed.deployments]]
backend = "edge"
upstream_model = "smollm2"
[[models.mixed.deployments]]
backend = "site"
upstream_model = "site-model"
input_usd_per_mtok = 0
output_usd_per_mtok = 0
[teams.t]
models = ["*"]
[teams.vault]
models = ["*"]
privacy_floor = "edge"
[routing]
breaker_failures = 1000000
[edge]
heartbeat_s = {heartbeat}
ttl_s = {ttl}
token_check_s = {check}
"""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)


@dataclass
class Rig:
    base_url: str
    config: Path
    tmp: Path
    db: Engine
    fake: FakeProvider
    tokens: dict[str, str]  # node -> plaintext
    token_ids: dict[str, str]
    model_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    gateway: Proc | None = None

    def spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        log = self.tmp / f"{name}.{len(self.procs)}.log"
        full_env = {**os.environ, "SB_E2E_ADMIN_KEY": ADMIN_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env | (env or {}),
            )
        return Proc(name, popen, log)

    def start_node(self, node: str) -> Proc:
        max_batch = "1" if node == "node-a" else "4"  # node-a queues what it cannot run: a "not started" pool
        args = ["edge", "serve", "--gateway", self.base_url, "--node-id", node, "--label", f"line={node[-1]}"]
        args += ["--model", str(self.model_dir), "--quant", "int4"]  # pinned: no autotune per node process
        args += [
            "--threads",
            "1",
            "--max-batch",
            max_batch,
            "--kv-cache-mb",
            "32",
            "--max-tokens-default",
            "64",
        ]
        proc = self.spawn(
            args, node, {"SWITCHBOARD_EDGE_TOKEN": self.tokens[node]}
        )  # never on the command line
        self.procs[node] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(p.tail() for p in [*([self.gateway] if self.gateway else []), *self.procs.values()])

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        return httpx.request(method, self.base_url + path, headers=headers, timeout=10, **kwargs)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["node_id"]: n for n in self.admin("GET", "/admin/edge/nodes").json()["data"]}

    def routable(self, team: str = "t", model: str = "smollm2") -> set[str]:
        explained = self.admin("GET", "/admin/route/explain", params={"team": team, "model": model}).json()
        return {c["backend"] for c in explained["candidates"]}

    async def wait(self, check: Any, what: str, timeout_s: float) -> float:
        return await wait_until(check, what, timeout_s, self.logs)

    def client(self, team: str = "t") -> AsyncOpenAI:
        key = keys.create_key(self.db, team, name="e2e", models=None, expires_at=None).plaintext
        return AsyncOpenAI(base_url=self.base_url + "/v1", api_key=key, max_retries=0, timeout=120)

    def row(self, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        return wait_for_usage_row(self.db, request_id, timeout_s)


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("edge-e2e")
    port = free_port()
    with FakeProvider() as fake:
        fake.configure("site-model", n_tokens=4)
        config = tmp / "gateway.toml"
        text = CONFIG.format(
            tmp=tmp, fake=fake.base_url, heartbeat=HEARTBEAT_S, ttl=TTL_S, check=TOKEN_CHECK_S
        )
        config.write_text(text)
        os.environ["SB_E2E_ADMIN_KEY"] = ADMIN_KEY
        made = {
            n: _cli("edge", "token", "create", "--name", n, "--label", "site=plant-7", "-c", str(config))
            for n in NODES
        }
        plain = {n: out.strip().splitlines()[-1] for n, out in made.items()}
        engine = make_engine(f"sqlite:///{tmp}/sb.db")
        ids = {n: info.token_id for n in NODES for info in tokens.list_tokens(engine) if info.name == n}
        rig = Rig(f"http://127.0.0.1:{port}", config, tmp, engine, fake, plain, ids, smollm2_directory())
        try:
            rig.gateway = rig.spawn(["serve", "--config", str(config), "--port", str(port)], "gateway")
            for node in NODES:
                rig.start_node(node)
            asyncio.run(rig.wait(lambda: _healthy(rig.base_url), "gateway up", 60))
            asyncio.run(
                rig.wait(lambda: _connected(rig) >= set(NODES), "three nodes connected", LOAD_TIMEOUT_S)
            )
            yield rig
        finally:
            for proc in rig.procs.values():
                proc.stop()
            if rig.gateway is not None:
                rig.gateway.stop()
            engine.dispose()


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _connected(rig: Rig) -> set[str]:
    return {n for n, v in rig.nodes().items() if v["state"] == "connected"}


async def test_three_nodes_enroll_and_serve_through_the_openai_sdk(rig: Rig) -> None:
    listed = rig.nodes()
    for node in NODES:
        assert listed[node]["labels"] == {"site": "plant-7", "line": node[-1]}  # token's site + node's line
        assert listed[node]["tokens_per_s"] > 0 and "smollm2" in listed[node]["models"]
    client = rig.client()
    for node in NODES:  # each node, picked by a label header
        raw = await client.chat.completions.with_raw_response.create(
            model="smollm2",
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=6,
            temperature=0,
            extra_headers={"x-switchboard-labels": f"line={node[-1]}", "x-switchboard-site": "plant-7"},
        )
        reply = raw.parse()
        assert raw.headers["x-switchboard-backend"] == f"edge/{node}"
        assert (
            reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens > 0
        )
        row = rig.row(raw.headers["x-request-id"])
        assert (row["backend"], row["status"]) == (f"edge/{node}", "ok")
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="smollm2",
                messages=HELLO,  # type: ignore[arg-type]
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
            for _ in range(4)
        )
    )
    for stream in replies:
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_a_frozen_node_leaves_routing_within_ttl_and_returns(rig: Rig) -> None:
    node = rig.procs["node-c"]
    assert "edge/node-c" in rig.routable()
    node.signal(signal.SIGSTOP)  # no heartbeats, socket still open: only the TTL can tell
    try:
        gone_after_s = await rig.wait(
            lambda: "edge/node-c" not in rig.routable(), "node-c out of routing", TTL_S + 5
        )
        assert gone_after_s <= TTL_S + CUT_OFF_S, gone_after_s
        assert rig.nodes()["node-c"]["state"] == "stale"
    finally:
        node.signal(signal.SIGCONT)
    await rig.wait(lambda: "edge/node-c" in rig.routable(), "node-c back in routing", 10)


async def test_killing_a_node_mid_load(rig: Rig) -> None:
    client = rig.client()
    first_a = {"switchboard": {"order": ["edge/node-a"]}}  # node-a first; the others after it
    raw = await client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=COUNT,
        max_tokens=400,
        stream=True,
        temperature=0,
        extra_body=first_a,  # type: ignore[arg-type]
    )
    assert raw.headers["x-switchboard-backend"] == "edge/node-a"
    stream = raw.parse()
    first = await stream.__anext__()  # the stream has started on node-a
    assert first.choices
    queued = [
        asyncio.create_task(
            client.chat.completions.with_raw_response.create(
                model="smollm2",
                messages=HELLO,
                max_tokens=6,
                extra_body=first_a,  # type: ignore[arg-type]
            )
        )
        for _ in range(3)
    ]
    # node-a runs one request at a time: these wait in its engine and have produced nothing yet.
    await rig.wait(lambda: rig.nodes()["node-a"]["queue_depth"] >= 3, "three requests queued on node-a", 15)
    rig.procs["node-a"].signal(signal.SIGKILL)
    with pytest.raises(openai.APIError) as cut:
        async for _ in stream:
            pass
    assert "cut the stream" in cut.value.message
    row = rig.row(raw.headers["x-request-id"])
    assert (row["status"], row["backend"], row["stream"]) == ("error", "edge/node-a", True)
    assert row["error_type"] == "upstream_bad_response"
    for moved in await asyncio.gather(*queued):
        assert moved.headers["x-switchboard-backend"] in {"edge/node-b", "edge/node-c"}
        assert moved.parse().choices[0].message.content
        moved_row = rig.row(moved.headers["x-request-id"])
        assert moved_row["status"] == "ok" and moved_row["attempts"] == 2
    assert rig.nodes()["node-a"]["state"] == "disconnected"
    assert "edge/node-a" not in rig.routable()
    rig.start_node("node-a")  # restarted with the same id and token; its rejoin is checked below


async def test_a_revoked_token_is_refused_and_its_node_disconnected(rig: Rig) -> None:
    node = rig.procs["node-b"]
    _cli("edge", "token", "revoke", rig.token_ids["node-b"], "-c", str(rig.config))  # another process
    gone_after_s = await rig.wait(lambda: "node-b" not in _connected(rig), "node-b disconnected", 10)
    assert gone_after_s <= TOKEN_CHECK_S + CUT_OFF_S, gone_after_s
    assert "edge/node-b" not in rig.routable()
    code = await asyncio.to_thread(node.popen.wait, 60)
    assert code == 2, rig.logs()  # the node stops rather than retrying a refused token
    assert "refused the enrollment token" in node.log.read_text()
    ws_url = rig.base_url.replace("http://", "ws://") + wire.CONNECT_PATH
    denial = await denied(ws_url, rig.tokens["node-b"])  # refused before the upgrade
    assert denial.status == 401 and "revoked" in denial.error["message"]


async def test_the_restarted_node_rejoins_by_itself(rig: Rig) -> None:
    await rig.wait(lambda: "node-a" in _connected(rig), "node-a rejoined", LOAD_TIMEOUT_S)
    raw = await rig.client().chat.completions.with_raw_response.create(
        model="smollm2",
        messages=HELLO,
        max_tokens=6,
        extra_body={"switchboard": {"only": ["edge/node-a"]}},  # type: ignore[arg-type]
    )
    assert raw.headers["x-switchboard-backend"] == "edge/node-a" and raw.parse().choices[0].message.content


async def test_the_edge_floor_never_leaves_the_edge_even_with_every_node_down(rig: Rig) -> None:
    vault = rig.client("vault")
    raw = await vault.chat.completions.with_raw_response.create(model="mixed", messages=HELLO, max_tokens=4)  # type: ignore[arg-type]
    assert raw.headers["x-switchboard-backend"].startswith("edge/")
    for proc in rig.procs.values():
        proc.stop()
    await rig.wait(lambda: not _connected(rig), "every node down", 20)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as refused_:
            await vault.chat.completions.create(model="mixed", messages=HELLO, max_tokens=4, stream=stream)  # type: ignore[call-overload]
        err = refused_.value
        assert err.status_code == 503 and err.body["code"] == "no_live_edge_node"  # type: ignore[index]
        assert "switchboard edge serve" in err.message and "privacy floor `edge`" in err.message
    assert rig.fake.received("site-model") == []  # never another tier
    other = await rig.client().chat.completions.with_raw_response.create(
        model="mixed", messages=HELLO, max_tokens=4
    )  # type: ignore[arg-type]
    assert other.headers["x-switchboard-backend"] == "site"  # a team whose floor allows it does use it
