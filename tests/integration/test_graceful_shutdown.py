"""SIGTERM on a real `switchboard serve` process: refuse new connections, drain in-flight requests within
`server.drain_timeout_s`, cut off what outlives it with exactly one ledger row each, flush, exit.

The upstream is the fake provider in its own process: `slow` answers after a delay and streams slowly,
`hang` never answers. Each test has its own SQLite ledger. Nothing here times the gateway: waits are deadlines
for events (a request reaching the upstream, the listener refusing), and the drain bound is checked as "the
process outlived the drain window and ended within it plus a generous margin".
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.store import db, keys
from tests.support.replicas import ROOT, FakeUpstream, GatewayReplicas, free_port, merged, to_toml
from tests.support.services import REDIS_URL, delete_prefix

TEAM = "drain"
EXIT_MARGIN_S = 20.0  # the cut-off requests' cancel wait and the services' close come after the window


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    fake = FakeUpstream(tmp_path_factory.mktemp("drain-upstream")).spawn()
    try:
        fake.wait_ready()
        fake.configure("slow", ttft_ms=2500, n_tokens=8, tokens_per_s=4)  # about 4 s in all
        fake.configure("trickle", n_tokens=10_000, tokens_per_s=10)  # a stream that outlives any drain
        fake.configure("hang", hang=True)
        yield fake
    finally:
        fake.stop()


def gateway_setup(tmp: Path, upstream: FakeUpstream, drain_timeout_s: float) -> tuple[dict[str, Any], str]:
    """A config (SQLite ledger in `tmp`, already migrated) and a key of team `drain`."""
    url = f"sqlite:///{tmp / 'ledger.db'}"
    model = {"backend": "up", "input_usd_per_mtok": "1", "output_usd_per_mtok": "2"}
    config = {
        "server": {"drain_timeout_s": drain_timeout_s},
        "database": {"url": url, "spill_path": str(tmp / "spill.jsonl"), "flush_interval_s": 0.05},
        "backends": {"up": {"kind": "openai", "base_url": upstream.base_url + "/v1", "timeout_s": 600}},
        "models": {name: {**model, "upstream_model": name} for name in ("slow", "trickle", "hang")},
        "teams": {TEAM: {"models": ["*"]}},
    }
    db.migrate(url)
    engine = db.make_engine(url)
    keys.upsert_teams(engine, {TEAM: ["*"]})
    key = keys.create_key(engine, TEAM, name="drain", models=None, expires_at=None).plaintext
    engine.dispose()
    return config, key


def start_gateway(tmp: Path, upstream: FakeUpstream, drain_timeout_s: float) -> tuple[GatewayReplicas, str]:
    config, key = gateway_setup(tmp, upstream, drain_timeout_s)
    return GatewayReplicas(config, tmp, n=1, name="gw").start(), key


def ledger_rows(tmp: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(tmp / "ledger.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM usage WHERE team = ?", (TEAM,))]


def chat(url: str, key: str, model: str, *, stream: bool = False) -> dict[str, Any]:
    """One request on a fresh connection; what the client saw, connection errors included."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    seen: dict[str, Any] = {"status": None, "request_id": None, "body": b"", "error": None}
    try:
        with (
            httpx.Client(timeout=60) as client,
            client.stream(
                "POST", url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
            ) as resp,
        ):
            seen["status"], seen["request_id"] = resp.status_code, resp.headers.get("x-request-id")
            for piece in resp.iter_bytes():
                seen["body"] += piece
    except httpx.TransportError as exc:
        seen["error"] = exc
    return seen


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def upstream_saw(upstream: FakeUpstream, model: str, n: int) -> Callable[[], bool]:
    def check() -> bool:
        got = httpx.get(f"{upstream.base_url}/_requests", params={"model": model}, timeout=5).json()
        return len(got) >= n

    return check


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_connections(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    gw, key = start_gateway(tmp_path, upstream, drain_timeout_s=60)
    proc, url = gw.process(0), gw.urls[0]
    try:
        with ThreadPoolExecutor(2) as pool:
            whole: Future[dict[str, Any]] = pool.submit(chat, url, key, "slow")
            streamed: Future[dict[str, Any]] = pool.submit(chat, url, key, "slow", stream=True)
            wait_for("both requests at the upstream", upstream_saw(upstream, "slow", 2))
            proc.send_signal(signal.SIGTERM)
            wait_for("the listener to refuse", lambda: refuses(gw.ports[0]))
            assert proc.poll() is None and not whole.done() and not streamed.done()
            got_whole, got_stream = whole.result(timeout=60), streamed.result(timeout=60)
        status = proc.wait(timeout=EXIT_MARGIN_S)
    finally:
        gw.stop()
    assert got_whole["error"] is None and got_whole["status"] == 200
    answer = orjson.loads(got_whole["body"])
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert got_stream["error"] is None and got_stream["status"] == 200
    assert got_stream["body"].rstrip().endswith(b"data: [DONE]")
    assert status == -signal.SIGTERM  # uvicorn ends with the signal it handled, after the shutdown
    rows = {r["request_id"]: r for r in ledger_rows(tmp_path)}
    assert set(rows) == {got_whole["request_id"], got_stream["request_id"]}
    assert {r["status"] for r in rows.values()} == {"ok"}


def test_requests_outliving_the_drain_are_cut_off_with_one_row_each(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    drain_s = 1.0
    gw, key = start_gateway(tmp_path, upstream, drain_timeout_s=drain_s)
    proc, url = gw.process(0), gw.urls[0]
    try:
        with ThreadPoolExecutor(2) as pool:
            hung: Future[dict[str, Any]] = pool.submit(chat, url, key, "hang")
            trickle: Future[dict[str, Any]] = pool.submit(chat, url, key, "trickle", stream=True)
            wait_for("both requests at the upstream", upstream_saw(upstream, "hang", 1))
            wait_for("the stream under way", upstream_saw(upstream, "trickle", 1))
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=drain_s + EXIT_MARGIN_S)
            exited_after_s = time.monotonic() - signalled
            got_hung, got_trickle = hung.result(timeout=30), trickle.result(timeout=30)
    finally:
        gw.stop()
    assert exited_after_s >= drain_s, "the process did not wait for the drain window"
    assert status == -signal.SIGTERM
    # The unanswered request: the connection ends without an answer (no 500 written after the cancel).
    assert isinstance(got_hung["error"], httpx.RemoteProtocolError), got_hung
    # The stream: chunks arrived, then the connection ended before [DONE].
    assert got_trickle["status"] == 200 and got_trickle["request_id"]
    assert got_trickle["error"] is not None and b"data: {" in got_trickle["body"]
    assert b"[DONE]" not in got_trickle["body"]
    rows = ledger_rows(tmp_path)
    assert len(rows) == 2, rows
    by_model = {r["requested_model"]: r for r in rows}
    assert by_model["trickle"]["request_id"] == got_trickle["request_id"]
    for row in rows:
        assert (row["status"], row["http_status"]) == ("client_closed", 499)
    assert not (tmp_path / "gw-0.spill.jsonl").exists() or not (tmp_path / "gw-0.spill.jsonl").read_bytes()


def test_serve_workers_forwards_sigterm_and_waits_for_the_drain(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """`serve --workers 2`: SIGTERM to the supervisor reaches the workers, the request in flight is answered,
    and the supervisor exits 0 only after its workers have drained."""
    settings, key = gateway_setup(tmp_path, upstream, drain_timeout_s=60)
    prefix = f"sbdrain{uuid.uuid4().hex[:8]}:"
    config = tmp_path / "workers.toml"
    config.write_text(to_toml(merged(settings, {"redis": {"url": REDIS_URL, "prefix": prefix}})))
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", "2"]
    log = tmp_path / "workers.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("two workers", lambda: log.read_text().count("serving on") == 2, timeout_s=90)
        before = len(httpx.get(f"{upstream.base_url}/_requests", params={"model": "slow"}).json())
        with ThreadPoolExecutor(1) as pool:
            whole: Future[dict[str, Any]] = pool.submit(chat, url, key, "slow")
            wait_for("the request at the upstream", upstream_saw(upstream, "slow", before + 1))
            proc.send_signal(signal.SIGTERM)
            wait_for("both workers' listeners to close", lambda: refuses(port))
            assert proc.poll() is None and not whole.done()
            got = whole.result(timeout=60)
        status = proc.wait(timeout=EXIT_MARGIN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        delete_prefix(REDIS_URL, prefix)
    assert got["error"] is None and got["status"] == 200, got
    assert status == 0, log.read_text()[-3000:]
    rows = ledger_rows(tmp_path)
    assert [r["request_id"] for r in rows] == [got["request_id"]]
