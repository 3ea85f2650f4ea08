"""Several real `switchboard serve` processes sharing one PostgreSQL schema and one Redis prefix.

`GatewayReplicas` writes one TOML config per replica into a work directory (they differ only in the spill file
and in per-replica overrides), starts every process at once and waits for all their /healthz; each replica's
output goes to its own log file, whose new lines `logs_since_mark` returns for failure messages. `RedisServer`
runs a private `redis-server` on a free port that a test may kill, freeze and start again on the same port.
`FakeUpstream` runs the loopback fake provider in its own process. Shared by tests/replicas and bench/.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- TOML ------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Decimal | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string for these contents
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def to_toml(data: Mapping[str, Any], _path: tuple[str, ...] = ()) -> str:
    """TOML for a config dict: scalars and lists inline, nested mappings as [tables]."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    out = "\n".join(lines)
    for key, value in data.items():
        if isinstance(value, Mapping):
            path = (*_path, key)
            out += f"\n\n[{'.'.join(_toml_key(p) for p in path)}]\n" + to_toml(value, path)
    return out.strip("\n") + "\n"


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in, mapping by mapping (a copy: neither argument changes)."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        out[key] = merged(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return out


# ---- processes -------------------------------------------------------------------------------------------


def _spawn(cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with log.open("ab") as out:
        return subprocess.Popen(list(cmd), cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def _stop(procs: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> None:
    """Signal every process first, then wait for each; one that ignores SIGTERM is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    for proc in procs:
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _wait_healthy(
    urls: Sequence[str], procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[Path], timeout_s: float
) -> None:
    """Poll each url's /healthz until every one answers 200; fail at once when a process exits."""
    pending = dict(enumerate(urls))
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1.0) as client:
        while pending:
            for i, url in list(pending.items()):
                if procs[i].poll() is not None:
                    raise RuntimeError(
                        f"{url}: process exited with {procs[i].returncode}; log:\n{_tail(logs[i])}"
                    )
                try:
                    if client.get(url + "/healthz").status_code == 200:
                        del pending[i]
                except httpx.TransportError:
                    pass  # not listening yet
            if not pending:
                return
            if time.monotonic() > deadline:
                i = next(iter(pending))
                raise TimeoutError(f"{urls[i]} not healthy after {timeout_s} s; log:\n{_tail(logs[i])}")
            time.sleep(0.05)


class FakeUpstream:
    """The fake provider (tests/support/fake_provider.py) in a process of its own; knobs over HTTP."""

    def __init__(self, workdir: Path, *, max_recorded: int = 16) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "fake-provider.log"
        self._max_recorded = max_recorded
        self._proc: subprocess.Popen[bytes] | None = None

    def spawn(self, pin: Sequence[str] = ()) -> FakeUpstream:
        cmd = [*pin, sys.executable, "-m", "tests.support.fake_provider", "--port", str(self.port)]
        self._proc = _spawn([*cmd, "--max-recorded", str(self._max_recorded)], self.log)
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        assert self._proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake provider exited with {self._proc.returncode}:\n{_tail(self.log)}")
            try:
                httpx.get(self.base_url + "/v1/models", timeout=1.0).raise_for_status()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"fake provider not up after {timeout_s} s:\n{_tail(self.log)}"
                    ) from None
                time.sleep(0.05)

    def configure(self, model: str, **knobs: Any) -> None:
        httpx.post(self.base_url + "/_control", json={"model": model, **knobs}, timeout=5).raise_for_status()

    def stop(self) -> None:
        if self._proc is not None:
            _stop([self._proc])
            self._proc = None


class RedisServer:
    """A private `redis-server` without persistence on a free port: `stop()` kills it (its data is gone),
    `start()` brings it back on the same port, `pause()`/`resume()` freeze it (connections hang)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = workdir / f"redis-{self.port}.log"
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.running:
            return self
        args = ["--port", str(self.port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
        self._proc = _spawn(["redis-server", *args, "--dir", str(self._workdir)], self.log)
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{_tail(self.log)}")
            time.sleep(0.02)
        return self

    def ping(self, timeout_s: float = 0.5) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def flushall(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
            s.sendall(b"FLUSHALL\r\n")
            reply = s.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL on port {self.port} answered {reply!r}")

    def stop(self) -> None:
        """SIGKILL: the server goes away at once, as in a crash; its data is lost."""
        if self._proc is not None:
            self.resume()
            _stop([self._proc], signal.SIGKILL)
            self._proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, so only client timeouts end a call."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ---- PostgreSQL ------------------------------------------------------------------------------------------


@contextmanager
def pg_schema(url: str, teams: Mapping[str, list[str]]) -> Iterator[tuple[str, Engine]]:
    """A fresh, migrated schema with `teams` in it, and an engine on it; the schema is dropped after.

    The teams are written here, before any replica starts, so the replicas' own start-up upsert finds them
    already in place and writes nothing (three concurrent inserts of one team would collide)."""
    from gateway.store import db, keys

    schema = "rep_" + uuid.uuid4().hex[:12]
    db.migrate(url, schema)
    engine = db.make_engine(url, schema)
    try:
        keys.upsert_teams(engine, teams)
        yield schema, engine
    finally:
        engine.dispose()
        admin = sa.create_engine(url)
        try:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            admin.dispose()


# ---- gateways --------------------------------------------------------------------------------------------


class GatewayReplicas:
    """`n` gateway processes from one config; `overrides[i]` is merged into replica i's copy.

    Each replica gets its own port and spill file (two processes must never append to one spill file).
    `start()` spawns all at once and waits until every /healthz answers; `stop()` sends SIGTERM to all and
    waits; `restart(i)` stops and starts one. `env` adds environment variables (secrets the config names)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        n: int = 3,
        name: str = "gw",
        overrides: Sequence[Mapping[str, Any]] = (),
        env: Mapping[str, str] | None = None,
        pins: Sequence[Sequence[str]] = (),
    ) -> None:
        if len(overrides) > n:
            raise ValueError(f"{len(overrides)} overrides for {n} replicas")
        self.workdir = workdir
        self.ports = [free_port() for _ in range(n)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.logs = [workdir / f"{name}-{i}.log" for i in range(n)]
        self._env = dict(env or {})
        self._pins = list(pins)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._marks = [0] * n
        self.configs: list[Path] = []
        for i in range(n):
            spill = {"database": {"spill_path": str(workdir / f"{name}-{i}.spill.jsonl")}}
            cfg = merged(merged(config, spill), overrides[i] if i < len(overrides) else {})
            path = workdir / f"{name}-{i}.toml"
            path.write_text(to_toml(cfg))
            self.configs.append(path)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _spawn_one(self, i: int) -> subprocess.Popen[bytes]:
        pin = list(self._pins[i]) if i < len(self._pins) else []
        cmd = [*pin, sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.configs[i])]
        return _spawn([*cmd, "--port", str(self.ports[i])], self.logs[i], self._env)

    def spawn(self) -> GatewayReplicas:
        self._procs += [self._spawn_one(i) for i in range(len(self.configs))]
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        try:
            _wait_healthy(self.urls, self._procs, self.logs, timeout_s)
        except BaseException:
            self.stop()
            raise

    def start(self, timeout_s: float = 60.0) -> GatewayReplicas:
        self.spawn().wait_ready(timeout_s)
        return self

    def check_alive(self) -> None:
        """Raise with the log of any replica that has exited."""
        for url, proc, log in zip(self.urls, self._procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise AssertionError(f"{url} exited with {proc.returncode}; log:\n{_tail(log)}")

    def mark(self) -> None:
        """Remember where each log ends now; `logs_since_mark` returns what was written after."""
        self._marks = [log.stat().st_size if log.exists() else 0 for log in self.logs]

    def logs_since_mark(self, chars: int = 4000) -> str:
        parts = []
        for url, log, start in zip(self.urls, self.logs, self._marks, strict=True):
            try:
                with log.open("rb") as f:
                    f.seek(start)
                    text = f.read().decode(errors="replace")
            except OSError:
                text = "(no log)"
            if text.strip():
                parts.append(f"--- {url} ({log.name}) ---\n{text[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        _stop(self._procs)
        self._procs = []

    def process(self, i: int) -> subprocess.Popen[bytes]:
        return self._procs[i]

    def kill(self, i: int) -> int:
        """SIGKILL replica i, as in a crash (no drain), and reap it. Returns its exit status."""
        proc = self._procs[i]
        proc.kill()
        return proc.wait(timeout=STOP_TIMEOUT_S)

    def respawn(self, i: int, timeout_s: float = 60.0) -> None:
        """Start replica i again (same port, config, spill file and journal) and wait until it is healthy."""
        if self._procs[i].poll() is None:
            raise RuntimeError(f"replica {i} is still running; kill() or restart() it instead")
        self._procs[i] = self._spawn_one(i)
        _wait_healthy([self.urls[i]], [self._procs[i]], [self.logs[i]], timeout_s)

    def restart(self, i: int, timeout_s: float = 60.0) -> int | None:
        """SIGTERM replica i, wait until it has exited (it drains first), start it again on the same port and
        wait until it is healthy. Returns the old process's exit status."""
        old = self._procs[i]
        old.send_signal(signal.SIGTERM)
        status = old.wait(timeout=timeout_s)
        self._procs[i] = self._spawn_one(i)
        _wait_healthy([self.urls[i]], [self._procs[i]], [self.logs[i]], timeout_s)
        return status

    def __enter__(self) -> GatewayReplicas:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
