"""`switchboard serve --workers N`: two worker processes on one port, sharing Redis and one SQLite ledger.

Which worker served a request is read from the kernel, not from the response: each request's keep-alive
connection stays open, and its server-side socket inode (/proc/net/tcp) is found among the workers' fds.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
import redis
from typer.testing import CliRunner

from gateway.cli import app
from gateway.store import db, keys
from tests.support.replicas import FakeUpstream, free_port, merged, to_toml
from tests.support.services import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
TEAM = "workers"
REQUESTS = 24
WORKER_LINE = re.compile(r"worker (\d+) \(pid (\d+)\) serving on")


def config_dict(tmp: Path, upstream_url: str, port: int) -> dict[str, object]:
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "database": {
            "url": f"sqlite:///{tmp / 'ledger.db'}",
            "spill_path": str(tmp / "spill.jsonl"),
            "flush_interval_s": 0.02,
        },
        "backends": {"up": {"kind": "openai", "base_url": upstream_url + "/v1"}},
        "models": {"fast": {"backend": "up", "input_usd_per_mtok": "1.5", "output_usd_per_mtok": "6"}},
        "teams": {TEAM: {"models": ["*"]}},
    }


def test_more_than_one_worker_without_redis_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sb.toml"
    path.write_text(to_toml(config_dict(tmp_path, "http://127.0.0.1:9", free_port())))
    result = CliRunner().invoke(app, ["serve", "--config", str(path), "--workers", "2"])
    assert result.exit_code == 2
    assert "redis.url" in result.output and "--workers 2" in result.output
    assert not (tmp_path / "ledger.db").exists()  # refused before anything started


def _worker_pids(log: Path, proc: subprocess.Popen[bytes], n: int, timeout_s: float = 90.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {int(i): int(pid) for i, pid in WORKER_LINE.findall(log.read_text(errors="replace"))}
        if len(found) == n:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{n} workers did not start (status {proc.poll()}):\n{log.read_text()[-4000:]}")


def _children(pid: int) -> set[int]:
    return {
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    }


def _server_socket_inode(server_port: int, client_port: int) -> str:
    """The inode of the accepted socket whose local port is the gateway's and remote is this client's."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, remote_port = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if local_port == server_port and remote_port == client_port:
            return fields[9]
    raise AssertionError(f"no server socket for client port {client_port}")


def _owner(inode: str, pids: set[int]) -> int:
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue  # closed meanwhile
    raise AssertionError(f"socket {inode} belongs to none of {pids}")


@contextmanager
def socket_taken(port: int) -> Iterator[None]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def _stopped(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"


@pytest.mark.slow
@pytest.mark.redis
def test_two_workers_share_one_port_and_each_request_gets_one_row(tmp_path: Path) -> None:
    upstream = FakeUpstream(tmp_path).spawn()
    prefix = f"sbw{uuid.uuid4().hex[:8]}:"
    port = free_port()
    config = tmp_path / "sb.toml"
    cfg = merged(
        config_dict(tmp_path, upstream.base_url, port), {"redis": {"url": REDIS_URL, "prefix": prefix}}
    )
    config.write_text(to_toml(cfg))
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db.migrate(db_url)
    engine = db.make_engine(db_url)
    keys.upsert_teams(engine, {TEAM: ["*"]})
    key = keys.create_key(engine, TEAM, name="workers", models=None, expires_at=None).plaintext
    engine.dispose()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    conns: list[http.client.HTTPConnection] = []
    try:
        upstream.wait_ready()
        workers = _worker_pids(log, proc, 2)
        pids = set(workers.values())
        assert pids <= _children(proc.pid)
        body = orjson.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        served_by: dict[str, int] = {}
        for _ in range(REQUESTS):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conns.append(conn)  # kept open, so its server-side socket can be found in a worker's fds
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            assert conn.sock is not None
            inode = _server_socket_inode(port, conn.sock.getsockname()[1])
            served_by[resp.headers["x-request-id"]] = _owner(inode, pids)
        assert set(served_by.values()) == pids, f"one worker served everything: {served_by}"
    finally:
        for conn in conns:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            upstream.stop()
            client = redis.Redis.from_url(REDIS_URL)
            for name in client.scan_iter(prefix + "*"):
                client.delete(name)
    assert status == 0, log.read_text()[-4000:]
    deadline = time.monotonic() + 10
    while not all(_stopped(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_stopped(p) for p in pids), "a worker outlived SIGTERM"
    with sqlite3.connect(tmp_path / "ledger.db") as conn_db:
        rows = dict(conn_db.execute("SELECT request_id, count(*) FROM usage GROUP BY request_id").fetchall())
    assert rows == dict.fromkeys(served_by, 1)


@pytest.mark.slow
@pytest.mark.redis
def test_a_worker_that_cannot_start_stops_the_others_with_an_error(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "sb.toml"
    config.write_text(
        to_toml(merged(config_dict(tmp_path, "http://127.0.0.1:9", port), {"redis": {"url": REDIS_URL}}))
    )
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", "2"]
    with socket_taken(port):  # bound without SO_REUSEPORT: every worker's bind fails
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "during start-up" in done.stderr
