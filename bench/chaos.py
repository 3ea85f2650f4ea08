"""Chaos under load: three gateway replicas at a steady request rate while their dependencies fail in turn.

Processes: three `switchboard serve` replicas on one PostgreSQL schema (reached through a TCP proxy this
process controls) and a private `redis-server`; the fake cloud provider (two cloud backends on it, through
litellm) and the bundled engine behind them. Model `local` is served by the engine and falls back to the
cloud; model `cloud` has a second cloud deployment to fall back to. After a warm-up, each fault lasts
`--fault-s`, one after another with recovery gaps: SIGKILL the engine (restarted after the window), SIGSTOP
Redis, cut PostgreSQL at the proxy, SIGKILL one replica (restarted on its journal, which it replays), and the
primary cloud model answering 500 then hanging. The load (bench/chaos_load.py) records every request; the
report (bench/chaos_report.py) checks it against the ledger. Run:
`python -m bench.chaos [--duration-s 300] [--fault-s 10] [--rate 30] [--out docs/BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from bench.chaos_load import LoadPlan, Outcome, read_outcomes, run_load
from bench.chaos_report import Fault, LedgerRow, Report, render
from bench.overhead import machine_info
from bench.redis_paths import DEFAULT_PG_URL, write_section
from gateway.store import db, keys
from tests.support.replicas import FakeUpstream, GatewayReplicas, RedisServer, free_port, pg_schema
from tests.support.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_KEY_ENV = "SB_CHAOS_UPSTREAM_KEY"
ENGINE_FLAGS = ("--dtype", "float32", "--quant", "int8", "--threads", "1", "--kv-cache-mb", "64")
BIG = 1_000_000_000
KILLED_REPLICA = 1
ENGINE_TIMEOUT_S = 10.0  # to its first token (then between tokens): a queued engine is fallen back from
CLOUD_BACKEND_TIMEOUT_S = 5.0  # one attempt on the primary cloud, and the longest gap between its tokens


def chaos_config(engine_url: str, fake_url: str, pg_url: str, schema: str, redis_url: str) -> dict[str, Any]:
    def cloud(timeout_s: float) -> dict[str, Any]:
        return {
            "kind": "cloud",
            "provider": "openai",
            "api_base": fake_url + "/v1",
            "api_key_env": UPSTREAM_KEY_ENV,
            "timeout_s": timeout_s,
        }

    def deployment(backend: str, upstream: str, usd_in: str, usd_out: str) -> dict[str, Any]:
        return {
            "backend": backend,
            "upstream_model": upstream,
            "input_usd_per_mtok": usd_in,
            "output_usd_per_mtok": usd_out,
        }

    return {
        # The load driver plays the load balancer: one address for every client, so it is a trusted proxy
        # (exempt from server.max_connections_per_client), as a real balancer in front of replicas would be.
        "server": {"admin_key_env": "SB_CHAOS_ADMIN_KEY", "trusted_proxies": ["127.0.0.1/32"]},
        "database": {"url": pg_url, "schema_name": schema, "auto_migrate": False},
        "backends": {
            "engine": {
                "kind": "openai",
                "base_url": engine_url + "/v1",
                "metrics_url": engine_url + "/metrics",
                "timeout_s": ENGINE_TIMEOUT_S,
                "connect_timeout_s": 1.0,
            },
            "cloud_a": cloud(CLOUD_BACKEND_TIMEOUT_S),
            "cloud_b": cloud(10.0),
        },
        "models": {
            "local": {
                "deployments": [
                    deployment("engine", "smollm2", "0", "0"),
                    deployment("cloud_b", "fallback", "0.15", "0.6"),
                ]
            },
            "cloud": {
                "deployments": [
                    deployment("cloud_a", "primary", "0.15", "0.6"),
                    deployment("cloud_b", "secondary", "1.5", "6"),
                ]
            },
        },
        "teams": {
            "chaos": {
                "objective": "cost",  # the engine first for `local`, cloud_a first for `cloud`
                "limits": {"requests": BIG, "tokens": BIG, "key_requests": BIG, "key_tokens": BIG},
            }
        },
        "redis": {"url": redis_url, "prefix": f"chaos:{uuid.uuid4().hex[:8]}:"},
        "limits": {"window_s": 60.0, "fail_open": True, "budgets_fail_open": True},
        "cache": {"enabled": True, "ttl_s": 600.0},
    }


# ---- the processes ---------------------------------------------------------------------------------------


class EngineProcess:
    """`switchboard engine serve` on a fixed port: killed with SIGKILL, started again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "engine.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "gateway.cli",
            "engine",
            "serve",
            "--port",
            str(self.port),
            *ENGINE_FLAGS,
        ]
        with self.log.open("ab") as out:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            self._proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        """Wall-clock time at which /health first answered 200."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"engine exited ({self._proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return time.time()
            except httpx.TransportError:
                pass  # still loading
            time.sleep(0.2)
        raise TimeoutError(f"engine not ready after {timeout_s:g} s; see {self.log}")

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class ProxyThread:
    """A `TcpProxy` to PostgreSQL on an event loop in a thread of its own; cut() and restore() block."""

    def __init__(self, host: str, port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)
        self.proxy = TcpProxy(host, port)

    def _call(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> int:
        self._thread.start()
        self._call(self.proxy.start())
        return self.proxy.port

    def cut(self) -> None:
        self._call(self.proxy.cut())

    def restore(self) -> None:
        self._call(self.proxy.restore())

    def close(self) -> None:
        self._call(self.proxy.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@dataclass
class Stack:
    replicas: GatewayReplicas
    engine: EngineProcess
    upstream: FakeUpstream
    redis: RedisServer
    proxy: ProxyThread
    db: Engine  # direct, not through the proxy: the report's reads must not depend on the cut
    key: str


UPSTREAM_KNOBS = {"ttft_ms": 20.0, "tokens_per_s": 40.0, "n_tokens": 8}


@contextmanager
def stack(tmp: Path, pg_url: str) -> Iterator[Stack]:
    upstream = FakeUpstream(tmp).spawn()
    engine = EngineProcess(tmp)
    engine.spawn()
    redis_server = RedisServer(tmp).start()
    target = make_url(pg_url)
    proxy = ProxyThread(target.host or "127.0.0.1", target.port or 5432)
    try:
        proxied = target.set(host="127.0.0.1", port=proxy.start()).render_as_string(hide_password=False)
        upstream.wait_ready()
        for model in ("primary", "secondary", "fallback"):
            upstream.configure(model, **UPSTREAM_KNOBS)
        engine.wait_ready()
        with pg_schema(pg_url, {"chaos": ["*"]}) as (schema, ledger_db):
            key = keys.create_key(ledger_db, "chaos", name="chaos", models=None, expires_at=None).plaintext
            config = chaos_config(engine.url, upstream.base_url, proxied, schema, redis_server.url)
            env = {UPSTREAM_KEY_ENV: "sk-chaos-" + uuid.uuid4().hex, "SB_CHAOS_ADMIN_KEY": uuid.uuid4().hex}
            with GatewayReplicas(config, tmp, n=3, name="chaos", env=env) as replicas:
                yield Stack(replicas, engine, upstream, redis_server, proxy, ledger_db, key)
    finally:
        engine.stop()
        upstream.stop()
        redis_server.stop()
        proxy.close()


def warm(s: Stack) -> set[str]:
    """A few requests of each kind through each replica, so first-request work is out of the measurement.
    Returns their request ids (their ledger rows are not the run's)."""
    ids: set[str] = set()
    with httpx.Client(timeout=60.0, headers={"authorization": f"Bearer {s.key}"}) as client:
        for url in s.replicas.urls:
            for model in ("local", "cloud"):
                for stream in (False, True):
                    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi."}]}
                    body |= {"max_tokens": 8, "stream": stream}
                    resp = client.post(url + "/v1/chat/completions", json=body)
                    if resp.status_code != 200:
                        raise RuntimeError(
                            f"warm-up {url} {model}: HTTP {resp.status_code} {resp.text[:300]}"
                        )
                    ids.add(resp.headers["x-request-id"])
    return ids


# ---- the faults ------------------------------------------------------------------------------------------


def _in_thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, daemon=True).start()


def fault_steps(s: Stack, fault_s: float) -> list[tuple[Fault, list[tuple[float, Callable[[Fault], None]]]]]:
    """Each fault with its steps: (seconds after the fault starts, action). The last step ends the fault."""

    def kill_engine(f: Fault) -> None:
        s.engine.kill()

    def restart_engine(f: Fault) -> None:
        s.engine.spawn()
        _in_thread(lambda: setattr(f, "back_at", s.engine.wait_ready()))

    def kill_replica(f: Fault) -> None:
        s.replicas.kill(KILLED_REPLICA)

    def respawn_replica(f: Fault) -> None:
        def run() -> None:
            s.replicas.respawn(KILLED_REPLICA)
            f.back_at = time.time()

        _in_thread(run)

    def redis_stop(f: Fault) -> None:
        s.redis.pause()

    def redis_cont(f: Fault) -> None:
        s.redis.resume()
        f.back_at = time.time()

    def pg_cut(f: Fault) -> None:
        s.proxy.cut()

    def pg_restore(f: Fault) -> None:
        s.proxy.restore()
        f.back_at = time.time()

    def cloud_500(f: Fault) -> None:
        s.upstream.configure("primary", fail_status=500, hang=False)

    def cloud_hang(f: Fault) -> None:
        s.upstream.configure("primary", fail_status=None, hang=True)

    def cloud_heal(f: Fault) -> None:
        s.upstream.configure("primary", fail_status=None, hang=False)
        f.back_at = time.time()

    half = fault_s / 2
    return [
        (
            Fault("engine", "SIGKILL the engine (restarted after the window)"),
            [(0, kill_engine), (fault_s, restart_engine)],
        ),
        (Fault("redis", "freeze Redis (SIGSTOP, then SIGCONT)"), [(0, redis_stop), (fault_s, redis_cont)]),
        (Fault("postgres", "cut PostgreSQL at the TCP proxy"), [(0, pg_cut), (fault_s, pg_restore)]),
        (
            Fault("replica", f"SIGKILL replica {KILLED_REPLICA} (restarted on its journal after the window)"),
            [(0, kill_replica), (fault_s, respawn_replica)],
        ),
        (
            Fault("cloud", f"primary cloud answers 500 for {half:g} s, then hangs for {half:g} s"),
            [(0, cloud_500), (half, cloud_hang), (fault_s, cloud_heal)],
        ),
    ]


def run_faults(
    plan: list[tuple[Fault, list[tuple[float, Callable[[Fault], None]]]]], starts: list[float]
) -> None:
    """Each fault's steps at their times (wall clock); records when the fault really began and ended."""
    for (fault, steps), start in zip(plan, starts, strict=True):
        for offset, action in steps:
            delay = start + offset - time.time()
            if delay > 0:
                time.sleep(delay)
            stamp = time.time()
            action(fault)
            if offset == 0:
                fault.start, fault.done_at = stamp, time.time()
            fault.end = stamp
        print(f"fault {fault.key}: {fault.end - fault.start:.1f} s", file=sys.stderr)


# ---- the ledger ------------------------------------------------------------------------------------------


def settled_rows(engine: Engine, answered: set[str], timeout_s: float = 90.0) -> dict[str, LedgerRow]:
    """Every ledger row once the writers are done: all answered ids present and the count unchanged for
    3 s, or the timeout (the report then names the missing)."""
    deadline = time.monotonic() + timeout_s
    last, stable_since = -1, time.monotonic()
    query = sa.select(
        db.usage.c.request_id,
        db.usage.c.http_status,
        db.usage.c.error_type,
        db.usage.c.backend,
        db.usage.c.requested_model,
        db.usage.c.created_at,
    )
    while True:
        with engine.connect() as conn:
            rows = {
                r.request_id: LedgerRow(r.http_status, r.error_type, r.backend, r.created_at.timestamp())
                for r in conn.execute(query)
            }
        if len(rows) != last:
            last, stable_since = len(rows), time.monotonic()
        settled = time.monotonic() - stable_since >= 3.0 and answered <= rows.keys()
        if settled or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


# ---- main ------------------------------------------------------------------------------------------------


def schedule(duration_s: float, fault_s: float, n: int) -> tuple[float, list[float]]:
    """Warm-up length and each fault's start (seconds from t0): a tenth of the run warms up (at least 10 s),
    the rest is cut into n equal slots, each a fault then its recovery gap."""
    warmup = max(10.0, duration_s / 10)
    slot = (duration_s - warmup) / n
    if slot < 2 * fault_s:
        raise SystemExit(f"--duration-s {duration_s:g} leaves {slot:.0f} s per fault; need >= 2 x --fault-s")
    return warmup, [warmup + k * slot for k in range(n)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--fault-s", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=30.0, help="requests per second, all replicas together")
    parser.add_argument("--local-share", type=float, default=0.25, help="share of requests for model `local`")
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--recover-window-s", type=float, default=5.0, help="N: error-free seconds to count")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--out", type=Path, help="write/replace the section in this markdown file")
    parser.add_argument("--keep", type=Path, help="keep logs, configs and outcomes.jsonl in this directory")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sb-chaos-") as tmp_name:
        tmp = Path(tmp_name) if args.keep is None else args.keep
        tmp.mkdir(parents=True, exist_ok=True)
        with stack(tmp, args.pg_url) as s:
            warm_ids = warm(s)
            plan = fault_steps(s, args.fault_s)
            warmup, offsets = schedule(args.duration_s, args.fault_s, len(plan))
            t0 = time.time() + 2.0
            load = LoadPlan(
                tuple(s.replicas.urls),
                s.key,
                t0,
                args.duration_s,
                args.rate,
                args.local_share,
                args.stream_share,
            )
            out = tmp / "outcomes.jsonl"
            child = multiprocessing.get_context("spawn").Process(target=run_load, args=(load, out))
            child.start()
            run_faults(plan, [t0 + o for o in offsets])
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"the load driver failed with exit code {child.exitcode}")
            outcomes: list[Outcome] = read_outcomes(out)
            answered = {o.request_id for o in outcomes if o.ok}
            rows = settled_rows(s.db, answered)
            rows = {rid: row for rid, row in rows.items() if rid not in warm_ids}
            s.replicas.check_alive()
    report = Report(
        outcomes=outcomes,
        faults=[f for f, _ in plan],
        rows=rows,
        t0=t0,
        warmup_s=warmup,
        duration_s=args.duration_s,
        recover_window_s=args.recover_window_s,
        killed_replica=KILLED_REPLICA,
    )
    meta = {
        "command": " ".join(["python -m bench.chaos", *(argv if argv is not None else sys.argv[1:])]),
        "load_start": f"{load_start:.2f}",
        "load_end": f"{os.getloadavg()[0]:.2f}",
        "rate": f"{args.rate:g}",
        "fault_s": f"{args.fault_s:g}",
        "duration_s": f"{args.duration_s:g}",
        "local_share": f"{args.local_share:g}",
        "stream_share": f"{args.stream_share:g}",
        "engine_flags": " ".join(ENGINE_FLAGS),
        "cloud_timeout_s": f"{CLOUD_BACKEND_TIMEOUT_S:g}",
        "engine_timeout_s": f"{ENGINE_TIMEOUT_S:g}",
    }
    section = render(report, machine_info(), meta)
    print(section)
    if args.out:
        write_section(args.out, "chaos", "Chaos under load", section)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
