"""What the gateway adds: latency direct-to-upstream vs through Switchboard, max req/s, RSS, ledger rows.

One run starts the loopback fake provider (20 ms answers for model `delay20`, 0 ms for `delay0`) and a real
`switchboard serve` process (auth and SQLite ledger on), each in its own process. With two or more cores the
gateway is pinned to core 0 and the load generator plus the fake provider share core 1, so the gateway's core
does nothing else we started. Phases alternate direct/gateway within each repeat; tables quote medians over
repeats. Invariant: every number printed is measured in this run, none is hard-coded.
Run: `python -m bench.overhead [--duration-s 10] [--repeats 3] [--out docs/BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from bench.loadgen import LoadResult, run_python, run_wrk, wrk_path

ROOT = Path(__file__).resolve().parent.parent
MARK_START = "<!-- bench/overhead:start -->"
MARK_END = "<!-- bench/overhead:end -->"
GOAL_ADDED_P50_MS = 1.0
GOAL_RPS = 2000.0
TEAM = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def chat_body(model: str, *, stream: bool = False) -> bytes:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


@dataclass
class Rig:
    """The running processes and what the phases need to reach them."""

    tmp: Path
    fake_url: str
    gateway_url: str
    key: str
    db_path: Path
    gateway_pid: int
    pin_gateway: list[str]
    pin_load: list[str]
    load: Callable[..., LoadResult]
    generator: str


def _pins(enabled: bool) -> tuple[list[str], list[str], str]:
    if enabled and shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2:
        return (
            ["taskset", "-c", "0"],
            ["taskset", "-c", "1"],
            ("gateway pinned to core 0; load generator and fake provider share core 1 (taskset)"),
        )
    return [], [], "no pinning (fewer than 2 cores, no taskset, or --no-pin)"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s; log:\n{log.read_text()[-3000:]}")


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _write_config(tmp: Path, gw_port: int, fake_port: int) -> Path:
    db_path = tmp / "ledger.db"
    text = f"""
[server]
host = "127.0.0.1"
port = {gw_port}

[database]
url = "sqlite:///{db_path}"
spill_path = "{tmp / "spill.jsonl"}"

[backends.fake]
kind = "openai"
base_url = "http://127.0.0.1:{fake_port}/v1"

[models.delay20]
backend = "fake"
input_usd_per_mtok = "1.5"
output_usd_per_mtok = "6"

[models.delay0]
backend = "fake"
input_usd_per_mtok = "1.5"
output_usd_per_mtok = "6"

[teams.{TEAM}]
models = ["*"]
"""
    path = tmp / "gateway.toml"
    path.write_text(text)
    return path


def _make_key(db_url: str) -> str:
    from gateway.store import db, keys

    db.migrate(db_url)
    engine = db.make_engine(db_url)
    try:
        keys.upsert_teams(engine, {TEAM: ["*"]})
        return keys.create_key(engine, TEAM, name="bench", models=None, expires_at=None).plaintext
    finally:
        engine.dispose()


@contextmanager
def rig(*, pin: bool, force_python: bool) -> Iterator[tuple[Rig, str]]:
    pin_gateway, pin_load, pin_note = _pins(pin)
    wrk = None if force_python else wrk_path()
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp_name:
        tmp = Path(tmp_name)
        fake_port, gw_port = free_port(), free_port()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            fake = _spawn(
                [
                    *pin_load,
                    sys.executable,
                    "-m",
                    "tests.support.fake_provider",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(fake_port),
                    "--ttft-ms",
                    "20",
                    "--max-recorded",
                    "8",
                ],
                tmp / "fake.log",
            )
            procs.append(fake)
            fake_url = f"http://127.0.0.1:{fake_port}"
            _wait_http(fake_url + "/v1/models", fake, tmp / "fake.log")
            httpx.post(fake_url + "/_control", json={"model": "delay0", "ttft_ms": 0}).raise_for_status()
            config = _write_config(tmp, gw_port, fake_port)
            key = _make_key(f"sqlite:///{tmp / 'ledger.db'}")
            gateway = _spawn(
                [*pin_gateway, sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
                tmp / "gateway.log",
            )
            procs.append(gateway)
            gateway_url = f"http://127.0.0.1:{gw_port}"
            _wait_http(gateway_url + "/healthz", gateway, tmp / "gateway.log")
            if wrk:
                load, generator = _bind(run_wrk, wrk), f"wrk ({_wrk_version(wrk)}), Lua POST script, 1 thread"
            else:
                load, generator = run_python, "bench.loadgen Python asyncio client (wrk not installed)"
            yield (
                Rig(
                    tmp,
                    fake_url,
                    gateway_url,
                    key,
                    tmp / "ledger.db",
                    gateway.pid,
                    pin_gateway,
                    pin_load,
                    load,
                    generator,
                ),
                pin_note,
            )
        finally:
            stop_all(procs)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate in reverse start order, killing any process that ignores SIGTERM for 10 s."""
    for proc in reversed(procs):
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _bind(fn: Callable[..., LoadResult], wrk: str) -> Callable[..., LoadResult]:
    def load(*args: object, **kwargs: object) -> LoadResult:
        return fn(wrk, *args, **kwargs)

    return load


def _wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].split(" [")[0] if (out.stdout or out.stderr) else "wrk"


# ---- the ledger --------------------------------------------------------------------------------------------


def ledger_counts(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM usage GROUP BY status").fetchall())


def settled_counts(db_path: Path, timeout_s: float = 15.0) -> dict[str, int]:
    """Counts once the writer has flushed: unchanged over 0.6 s (flush interval is 0.2 s)."""
    deadline = time.monotonic() + timeout_s
    last = ledger_counts(db_path)
    while time.monotonic() < deadline:
        time.sleep(0.6)
        now = ledger_counts(db_path)
        if now == last:
            return now
        last = now
    return last


# ---- phases ------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    via_gateway: bool
    model: str
    connections: int
    stream: bool = False
    runs: list[LoadResult] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


@dataclass
class Ledger:
    counted_ok: int = 0  # 2xx answers the load generator completed through the gateway
    in_flight_bound: int = 0  # requests possibly sent but not counted when a phase stopped (= connections)
    rows: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    sample_sent: int = 0
    sample_rows_ok: int = 0

    @property
    def verified(self) -> bool:
        loose = self.counted_ok <= self.rows <= self.counted_ok + self.in_flight_bound
        return loose and self.sample_rows_ok == self.sample_sent


def run_phase(r: Rig, phase: Phase, duration_s: float, ledger: Ledger) -> None:
    base = r.gateway_url if phase.via_gateway else r.fake_url
    headers = {"Content-Type": "application/json"}
    if phase.via_gateway:
        headers["Authorization"] = f"Bearer {r.key}"
        before = settled_counts(r.db_path)
    result = r.load(
        base + "/v1/chat/completions",
        chat_body(phase.model, stream=phase.stream),
        headers,
        connections=phase.connections,
        duration_s=duration_s,
        script_dir=r.tmp,
        pin=r.pin_load,
    )
    phase.runs.append(result)
    if phase.via_gateway:
        after = settled_counts(r.db_path)
        ledger.counted_ok += result.ok
        ledger.in_flight_bound += phase.connections
        ledger.rows += sum(after.values()) - sum(before.values())


def sample_overhead(r: Rig, n: int, ledger: Ledger) -> list[float]:
    """`n` sequential requests: the gateway's overhead header, and exactly one ledger row per request id."""
    overhead_ms, ids = [], []
    headers = {"authorization": f"Bearer {r.key}", "content-type": "application/json"}
    body = chat_body("delay20")
    with httpx.Client(base_url=r.gateway_url, headers=headers, timeout=10) as client:
        for _ in range(n):
            resp = client.post("/v1/chat/completions", content=body)
            resp.raise_for_status()
            overhead_ms.append(float(resp.headers["x-switchboard-overhead-ms"]))
            ids.append(resp.headers["x-request-id"])
    settled_counts(r.db_path)
    with sqlite3.connect(f"file:{r.db_path}?mode=ro", uri=True) as conn:
        found = dict(
            conn.execute(
                f"SELECT request_id, count(*) FROM usage WHERE status = 'ok' AND request_id IN "
                f"({','.join('?' * len(ids))}) GROUP BY request_id",
                ids,
            ).fetchall()
        )
    ledger.sample_sent += n
    ledger.sample_rows_ok += sum(1 for i in ids if found.get(i) == 1)
    return overhead_ms


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- the report --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _ms(x: float) -> str:
    return f"{x:.2f}"


def _added(gw: Phase, direct: Phase, attr: str) -> float:
    """Median over repeats of the paired difference (gateway minus direct, same repeat)."""
    return statistics.median(
        getattr(g, attr) - getattr(d, attr) for g, d in zip(gw.runs, direct.runs, strict=True)
    )


def render(
    latency: list[tuple[Phase, Phase]],
    tput: Sequence[Phase],
    overhead_ms: list[float],
    rss_mib: float,
    ledger: Ledger,
    info: dict[str, str],
    meta: dict[str, str],
) -> str:
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}.",
        "",
        f"Command: `{meta['command']}`. Load: {meta['generator']}; {meta['pinning']}. "
        f"{meta['repeats']} repeat(s) of {meta['duration']} s per phase, direct and gateway phases "
        "alternating; each cell is the median over repeats, and *added* is the median of the paired "
        "per-repeat differences.",
        "",
        "Latency, fake upstream answering in 20 ms (non-streaming):",
        "",
        "| concurrency | direct p50 ms | gateway p50 ms | added p50 ms | direct p99 ms | gateway p99 ms "
        "| added p99 ms | gateway req/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for direct, gw in latency:
        lines.append(
            f"| {gw.connections} | {_ms(direct.median('p50_ms'))} | {_ms(gw.median('p50_ms'))} "
            f"| **{_ms(_added(gw, direct, 'p50_ms'))}** | {_ms(direct.median('p99_ms'))} "
            f"| {_ms(gw.median('p99_ms'))} | **{_ms(_added(gw, direct, 'p99_ms'))}** "
            f"| {gw.median('rps'):.0f} |"
        )
    lines += [
        "",
        "Throughput, fake upstream answering at once (0 ms), one gateway worker:",
        "",
        "| target | mode | concurrency | req/s | p50 ms | p99 ms | non-2xx + errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in tput:
        bad = sum(r.non2xx + r.errors for r in p.runs)
        lines.append(
            f"| {'gateway' if p.via_gateway else 'fake provider direct'} "
            f"| {'stream' if p.stream else 'json'} | {p.connections} | **{p.median('rps'):.0f}** "
            f"| {_ms(p.median('p50_ms'))} | {_ms(p.median('p99_ms'))} "
            f"| {bad} |"
        )
    added_p50_c1 = _added(latency[0][1], latency[0][0], "p50_ms")
    gw_json = next(p for p in tput if p.via_gateway and not p.stream)
    status = ", ".join(f"{k}: {v}" for k, v in sorted(ledger.by_status.items()))
    lines += [
        "",
        f"- Gateway's own `x-switchboard-overhead-ms` over {len(overhead_ms)} sequential requests: median "
        f"{statistics.median(overhead_ms):.3f} ms, p90 {statistics.quantiles(overhead_ms, n=10)[-1]:.3f} ms.",
        f"- Peak RSS of the gateway process (VmHWM): {rss_mib:.0f} MiB.",
        f"- Ledger: {ledger.rows} rows written during the load phases for {ledger.counted_ok} 2xx answers "
        f"the load generator counted (at most {ledger.in_flight_bound} more may have been in flight when a "
        f"phase stopped); {ledger.sample_rows_ok}/{ledger.sample_sent} sampled request ids have exactly one "
        "`ok` row. "
        f"Rows by status: {status}. Verdict: {'OK' if ledger.verified else 'MISMATCH'}.",
        f"- Goals: added p50 at concurrency 1 <= {GOAL_ADDED_P50_MS:g} ms: "
        f"{'met' if added_p50_c1 <= GOAL_ADDED_P50_MS else 'NOT met'} ({added_p50_c1:.2f} ms); "
        f">= {GOAL_RPS:,.0f} req/s non-streaming: "
        f"{'met' if gw_json.median('rps') >= GOAL_RPS else 'NOT met'} "
        f"({gw_json.median('rps'):,.0f} req/s).",
    ]
    return "\n".join(lines)


def update_doc(path: Path, section: str) -> None:
    block = f"{MARK_START}\n{section}\n{MARK_END}"
    if path.exists():
        text = path.read_text()
        if MARK_START in text and MARK_END in text:
            head, rest = text.split(MARK_START, 1)
            text = head + block + rest.split(MARK_END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n## Gateway overhead (`bench/overhead`)\n\n" + block + "\n"
    else:
        text = (
            "# Benchmarks\n\nNumbers here are written by the benchmark scripts; rerun them rather than "
            "editing by hand.\n\n## Gateway overhead (`bench/overhead`)\n\n" + block + "\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per phase and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32, help="the high-concurrency level")
    parser.add_argument("--samples", type=int, default=200, help="sequential requests sampled")
    parser.add_argument("--out", type=Path, help="write/replace the section in this markdown file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator, not wrk")
    args = parser.parse_args(argv)
    c = args.connections
    latency = [
        (Phase(f"direct c{n}", False, "delay20", n), Phase(f"gateway c{n}", True, "delay20", n))
        for n in (1, c)
    ]
    tput = [
        Phase("direct 0ms", False, "delay0", c),
        Phase("gateway 0ms json", True, "delay0", c),
        Phase("gateway 0ms stream", True, "delay0", c, stream=True),
    ]
    ledger = Ledger()
    with rig(pin=not args.no_pin, force_python=args.python_load) as (r, pin_note):
        # Warm both paths (connection pools, key cache, imports) before anything is timed.
        r.load(
            r.gateway_url + "/v1/chat/completions",
            chat_body("delay0"),
            {"Content-Type": "application/json", "Authorization": f"Bearer {r.key}"},
            connections=c,
            duration_s=1,
            script_dir=r.tmp,
            pin=r.pin_load,
        )
        for i in range(args.repeats):
            for phase in [p for pair in latency for p in pair] + tput:
                run_phase(r, phase, args.duration_s, ledger)
                last = phase.runs[-1]
                print(
                    f"[{i + 1}/{args.repeats}] {phase.name:<20} {last.rps:8.0f} req/s"
                    f"  p50 {last.p50_ms:7.2f} ms"
                    f"  p99 {last.p99_ms:7.2f} ms  non2xx {last.non2xx} errors {last.errors}",
                    file=sys.stderr,
                )
        overhead_ms = sample_overhead(r, args.samples, ledger)
        ledger.by_status = settled_counts(r.db_path)
        rss_mib = vm_hwm_mib(r.gateway_pid)
        meta = {
            "command": "python -m bench.overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
            "generator": r.generator,
            "pinning": pin_note,
            "repeats": str(args.repeats),
            "duration": f"{args.duration_s:g}",
        }
    section = render(latency, tput, overhead_ms, rss_mib, ledger, machine_info(), meta)
    print(section)
    if args.out:
        update_doc(args.out, section)
        print(f"\nwrote {args.out}", file=sys.stderr)
    if not ledger.verified:
        sys.exit(1)


if __name__ == "__main__":
    main()
