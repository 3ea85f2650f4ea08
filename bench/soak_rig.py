"""The soak's processes: the fake provider, one `switchboard serve`, its database and a proxy that cuts it.

PostgreSQL runs in a schema of its own (dropped at the end), reached through `OutageProxy`, which can abort
every connection and refuse new ones: to the gateway that is a database gone away. `--db sqlite` uses a file
instead (no outages). Models on the fake provider: `steady`, `cached` (the same upstream), `slow`, and
`flaky`, whose primary deployment fails one request in N with 503 and falls back to another backend.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("SWITCHBOARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEAM = "soak"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OutageProxy:
    """A TCP proxy to PostgreSQL that can cut the database off: `cut()` aborts every connection and refuses
    new ones until `restore()`; the gateway sees a server that went away, as in a real outage."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._links: set[asyncio.StreamWriter] = set()
        self.down = False
        self.port = 0

    async def start(self) -> None:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._links -= {writer, up_writer}

    def cut(self) -> None:
        self.down = True
        for w in list(self._links):
            w.transport.abort()

    def restore(self) -> None:
        self.down = False


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (OSError, ConnectionError):
        return  # the other side went away, or `cut` aborted it
    finally:
        dst.close()


@dataclass
class Rig:
    tmp: Path
    db: str  # "postgres" | "sqlite"
    schema: str | None
    proxy: OutageProxy | None
    fake_url: str = ""
    url: str = ""
    admin_key: str = field(default_factory=lambda: "soak-admin-" + secrets.token_hex(8))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def spill(self) -> Path:
        return self.tmp / "spill.jsonl"

    @property
    def gateway_pid(self) -> int:
        return self.procs[-1].pid

    def db_engine(self) -> sa.Engine:
        from gateway.store import db

        if self.db == "sqlite":
            return db.make_engine(f"sqlite:///{self.tmp / 'ledger.db'}")
        return db.make_engine(PG_URL, schema=self.schema)

    def spill_bytes(self) -> int:
        paths = (self.spill, Path(f"{self.spill}.replaying"))
        return sum(p.stat().st_size for p in paths if p.exists())


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with suppress(httpx.TransportError):
                if (await client.get(url)).status_code < 500:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _config(rig: Rig, port: int, fake_port: int, cache_entries: int, rollup_interval_s: float) -> Path:
    if rig.db == "sqlite":
        database = f'url = "sqlite:///{rig.tmp / "ledger.db"}"'
    else:
        assert rig.proxy is not None
        via_proxy = PG_URL.replace("127.0.0.1:5432", f"127.0.0.1:{rig.proxy.port}")
        database = f'url = "{via_proxy}"\nschema_name = "{rig.schema}"'
    price = 'input_usd_per_mtok = "1.5"\noutput_usd_per_mtok = "6"'
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
admin_key_env = "SWITCHBOARD_ADMIN_KEY"
request_timeout_s = 30.0
max_connections_per_client = 1024  # the driver is a fleet of clients behind one address

[database]
{database}
spill_path = "{rig.spill}"

[cache]
memory_max_entries = {cache_entries}

[reports]
rollup_interval_s = {rollup_interval_s}

[backends.fake]
kind = "openai"
base_url = "http://127.0.0.1:{fake_port}/v1"

[backends.fake2]
kind = "openai"
base_url = "http://127.0.0.1:{fake_port}/v1"

[models.steady]
backend = "fake"
{price}

[models.cached]
backend = "fake"
upstream_model = "steady"
{price}

[models.slow]
backend = "fake"
{price}

[[models.flaky.deployments]]
backend = "fake"
upstream_model = "flaky"
input_usd_per_mtok = "0.5"
output_usd_per_mtok = "2"

[[models.flaky.deployments]]
backend = "fake2"
upstream_model = "steady"
{price}

[teams.{TEAM}]
models = ["*"]
objective = "cost"
"""
    path = rig.tmp / "gateway.toml"
    path.write_text(text)
    return path


def _make_keys(rig: Rig, tight_requests: int) -> tuple[str, str]:
    from gateway.store import db, keys

    if rig.db == "sqlite":
        db.migrate(f"sqlite:///{rig.tmp / 'ledger.db'}")
    else:
        db.migrate(PG_URL, rig.schema)
    engine = rig.db_engine()
    try:
        keys.upsert_teams(engine, {TEAM: ["*"]})
        made = [
            keys.create_key(engine, TEAM, name=name, models=None, expires_at=None, limit_requests=limit)
            for name, limit in (("soak", None), ("tight", tight_requests))
        ]
        return made[0].plaintext, made[1].plaintext
    finally:
        engine.dispose()


async def start_rig(rig: Rig, args: argparse.Namespace) -> tuple[str, str]:
    fake_port, port = free_port(), free_port()
    fake_cmd = [sys.executable, "-m", "tests.support.fake_provider", "--port", str(fake_port)]
    fake_cmd += ["--ttft-ms", "20", "--n-tokens", "16", "--max-recorded", "4"]
    rig.procs.append(_spawn(fake_cmd, rig.tmp / "fake.log"))
    rig.fake_url = f"http://127.0.0.1:{fake_port}"
    await _wait_http(rig.fake_url + "/v1/models", rig.procs[0], rig.tmp / "fake.log")
    async with httpx.AsyncClient(base_url=rig.fake_url) as client:
        for knobs in (
            {"model": "slow", "ttft_ms": 1000, "tokens_per_s": 20, "n_tokens": 40},
            {"model": "flaky", "fail_status": 503, "fail_every": args.fail_every},
        ):
            (await client.post("/_control", json=knobs)).raise_for_status()
    if rig.proxy is not None:
        await rig.proxy.start()
    key, tight = _make_keys(rig, args.tight_requests)
    config = _config(rig, port, fake_port, args.cache_entries, args.rollup_interval_s)
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    if args.trace_dir is not None:  # the same gateway under tracemalloc (bench/soak_trace.py)
        cmd[2:3] = ["bench.soak_trace", str(args.trace_dir), "--"]
    rig.procs.append(_spawn(cmd, rig.tmp / "gateway.log", {"SWITCHBOARD_ADMIN_KEY": rig.admin_key}))
    rig.url = f"http://127.0.0.1:{port}"
    await _wait_http(rig.url + "/healthz", rig.procs[-1], rig.tmp / "gateway.log")
    return key, tight


def stop_rig(rig: Rig) -> None:
    for proc in reversed(rig.procs):
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if rig.schema is not None:
        engine = sa.create_engine(PG_URL)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{rig.schema}" CASCADE')
        engine.dispose()
