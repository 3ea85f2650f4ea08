"""What the gateway adds: latency direct-to-upstream vs through Switchboard, max req/s, streams, RSS, ledger.

One run starts the loopback fake provider (20 ms answers for model `delay20`, 0 ms for `delay0`) and real
`switchboard serve` processes, each in its own process: this build; with `--baseline-src DIR` also a build
from another checkout (spawned with cwd and PYTHONPATH there); with `--workers N` also this build with 1 and
with N workers, both on Redis. With two or more cores the single-worker gateways are pinned to core 0 and the
load generator plus the fake provider share core 1. Within each repeat the phases of one scenario run back to
back (direct, this build, baseline), so slow drifts of the machine hit every build alike; tables quote medians
over repeats. Invariant: every number printed is measured in this run, none is hard-coded.
Run: `python -m bench.overhead [--duration-s 10] [--repeats 3] [--baseline-src DIR] [--workers 2] [--out F]`.
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
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
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
GOAL_STREAM_RPS_RATIO = 0.8
GOAL_STREAM_ADDED_P50_MS = 5.0
GOAL_BASELINE_DIFF = 0.05
TEAM = "bench"
REDIS_URL = os.environ.get("SWITCHBOARD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# Set: every gateway runs with [telemetry] on, exporting spans to this OTLP/HTTP endpoint (off vs on).
OTLP_ENDPOINT = os.environ.get("SWITCHBOARD_BENCH_OTLP_ENDPOINT")


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


def _pins(enabled: bool) -> tuple[list[str], list[str], str]:
    if enabled and shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2:
        return (
            ["taskset", "-c", "0"],
            ["taskset", "-c", "1"],
            (
                "single-worker gateways pinned to core 0; load generator and fake provider share core 1 "
                "(taskset); multi-worker gateways unpinned"
            ),
        )
    return [], [], "no pinning (fewer than 2 cores, no taskset, or --no-pin)"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 90.0) -> None:
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


def _spawn(cmd: list[str], log: Path, src: Path = ROOT) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT)


def _write_config(workdir: Path, gw_port: int, fake_port: int, redis_prefix: str | None) -> Path:
    db_path = workdir / "ledger.db"
    text = f"""
[server]
host = "127.0.0.1"
port = {gw_port}

[database]
url = "sqlite:///{db_path}"
spill_path = "{workdir / "spill.jsonl"}"

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
    if redis_prefix is not None:
        text += f'\n[redis]\nurl = "{REDIS_URL}"\nprefix = "{redis_prefix}"\n'
    if OTLP_ENDPOINT:
        text += f'\n[telemetry]\nenabled = true\nendpoint = "{OTLP_ENDPOINT}"\n'
    path = workdir / "gateway.toml"
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


def _cli_key(src: Path, config: Path) -> str:
    """A key made by that build's own CLI, so its schema and key format are the ones it serves with."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    base = [sys.executable, "-m", "gateway.cli"]
    for group in ("teams", "keys"):
        out = subprocess.run(
            [*base, group, "create", TEAM, "--config", str(config)],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return out.stdout.strip().splitlines()[-1]


# ---- gateways ----------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # exited meanwhile
    return found


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (/proc/PID/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


@dataclass
class Gateway:
    """One running `switchboard serve` (a supervisor and its workers when workers > 1)."""

    label: str
    url: str
    key: str
    db_path: Path
    proc: subprocess.Popen[bytes]
    workers: int = 1
    ledger: Ledger = field(default_factory=Ledger)

    def cpu_s(self) -> float:
        return sum(_cpu_s(p) for p in _descendants(self.proc.pid))

    def rss_mib(self) -> float:
        return max(vm_hwm_mib(p) for p in _descendants(self.proc.pid))


def start_gateway(
    label: str,
    src: Path,
    tmp: Path,
    fake_port: int,
    pin: list[str],
    *,
    workers: int = 1,
    redis_prefix: str | None = None,
) -> Gateway:
    workdir = tmp / label.replace(" ", "-").replace(",", "")
    workdir.mkdir()
    port = free_port()
    config = _write_config(workdir, port, fake_port, redis_prefix)
    key = _cli_key(src, config)
    cmd = [*pin, sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    log = workdir / "gateway.log"
    proc = _spawn(cmd, log, src)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/healthz", proc, log)
        if workers > 1:  # /healthz answers once one worker is up; wait for them all
            deadline = time.monotonic() + 90
            while log.read_text().count(" serving on ") < workers and time.monotonic() < deadline:
                time.sleep(0.2)
    except BaseException:
        stop_all([proc])
        raise
    return Gateway(label, url, key, workdir / "ledger.db", proc, workers)


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


def _commit(src: Path) -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "unknown"


@dataclass
class Rig:
    """The running processes and what the phases need to reach them."""

    tmp: Path
    fake_url: str
    this: Gateway
    baseline: Gateway | None
    by_workers: dict[int, Gateway]  # this build on Redis, 1 and N workers
    pin_load: list[str]
    load: Callable[..., LoadResult]
    generator: str
    pin_note: str

    @property
    def gateways(self) -> list[Gateway]:
        found = [self.this, *([self.baseline] if self.baseline else []), *self.by_workers.values()]
        return found


@contextmanager
def rig(*, pin: bool, force_python: bool, baseline_src: Path | None, workers: int) -> Iterator[Rig]:
    pin_gateway, pin_load, pin_note = _pins(pin)
    wrk = None if force_python else wrk_path()
    prefix = f"sb-bench-{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        fake_port = free_port()
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs)
        fake_cmd = [*pin_load, sys.executable, "-m", "tests.support.fake_provider", "--host", "127.0.0.1"]
        fake_cmd += ["--port", str(fake_port), "--ttft-ms", "20", "--max-recorded", "8"]
        fake = _spawn(fake_cmd, tmp / "fake.log")
        procs.append(fake)
        fake_url = f"http://127.0.0.1:{fake_port}"
        _wait_http(fake_url + "/v1/models", fake, tmp / "fake.log")
        httpx.post(fake_url + "/_control", json={"model": "delay0", "ttft_ms": 0}).raise_for_status()

        def start(label: str, src: Path, pin_to: list[str], **kw: object) -> Gateway:
            gw = start_gateway(label, src, tmp, fake_port, pin_to, **kw)  # type: ignore[arg-type]
            procs.append(gw.proc)
            return gw

        this = start("this build", ROOT, pin_gateway)
        baseline = None
        if baseline_src is not None:
            baseline = start(f"baseline {_commit(baseline_src)}", baseline_src, pin_gateway)
        by_workers: dict[int, Gateway] = {}
        if workers > 1:
            stack.callback(_delete_redis_prefix, prefix)
            for n in (1, workers):
                by_workers[n] = start(f"this build, {n} worker(s)", ROOT, [], workers=n, redis_prefix=prefix)
        if wrk:
            load, generator = _bind(run_wrk, wrk), f"wrk ({_wrk_version(wrk)}), Lua POST script, 1 thread"
        else:
            load, generator = run_python, "bench.loadgen Python asyncio client (wrk not installed)"
        yield Rig(tmp, fake_url, this, baseline, by_workers, pin_load, load, generator, pin_note)


def _delete_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for name in client.scan_iter(prefix + "*"):
        client.delete(name)


# ---- the ledger --------------------------------------------------------------------------------------------


def ledger_counts(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM usage GROUP BY status").fetchall())


def settled_counts(db_path: Path, timeout_s: float = 30.0, quiet_polls: int = 4) -> dict[str, int]:
    """Counts once the writer has flushed: unchanged over `quiet_polls` polls 0.5 s apart (flush interval is
    0.2 s). One unchanged 0.6 s poll was not enough: a backlog's commit can take longer under load, and rows
    it lands after the phase's count are then counted in no phase (the likely cause of the MISMATCH
    in the 15:27 UTC run, whose sampled ids each had exactly one row)."""
    deadline = time.monotonic() + timeout_s
    last, quiet = ledger_counts(db_path), 0
    while time.monotonic() < deadline and quiet < quiet_polls:
        time.sleep(0.5)
        now = ledger_counts(db_path)
        quiet = quiet + 1 if now == last else 0
        last = now
    return last


# ---- phases ------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    scenario: str
    target: Gateway | None  # None: the fake provider directly
    model: str
    connections: int
    stream: bool = False
    runs: list[LoadResult] = field(default_factory=list)
    cpu_us_per_request: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.scenario} {self.target.label if self.target else 'direct'}"

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    def cpu_us(self) -> float:
        return statistics.median(self.cpu_us_per_request) if self.cpu_us_per_request else float("nan")


def run_phase(r: Rig, phase: Phase, duration_s: float) -> None:
    gw = phase.target
    headers = {"Content-Type": "application/json"}
    if gw is not None:
        headers["Authorization"] = f"Bearer {gw.key}"
        before = settled_counts(gw.db_path)
        cpu_before = gw.cpu_s()
    result = r.load(
        (gw.url if gw else r.fake_url) + "/v1/chat/completions",
        chat_body(phase.model, stream=phase.stream),
        headers,
        connections=phase.connections,
        duration_s=duration_s,
        script_dir=r.tmp,
        pin=r.pin_load,
    )
    phase.runs.append(result)
    if gw is not None:
        phase.cpu_us_per_request.append((gw.cpu_s() - cpu_before) * 1e6 / max(1, result.requests))
        after = settled_counts(gw.db_path)
        gw.ledger.counted_ok += result.ok
        gw.ledger.in_flight_bound += phase.connections
        gw.ledger.rows += sum(after.values()) - sum(before.values())


def sample_overhead(gw: Gateway, n: int) -> list[float]:
    """`n` sequential requests: the gateway's overhead header, and exactly one ledger row per request id."""
    overhead_ms, ids = [], []
    headers = {"authorization": f"Bearer {gw.key}", "content-type": "application/json"}
    body = chat_body("delay20")
    with httpx.Client(base_url=gw.url, headers=headers, timeout=10) as client:
        for _ in range(n):
            resp = client.post("/v1/chat/completions", content=body)
            resp.raise_for_status()
            overhead_ms.append(float(resp.headers["x-switchboard-overhead-ms"]))
            ids.append(resp.headers["x-request-id"])
    settled_counts(gw.db_path)
    with sqlite3.connect(f"file:{gw.db_path}?mode=ro", uri=True) as conn:
        found = dict(
            conn.execute(
                f"SELECT request_id, count(*) FROM usage WHERE status = 'ok' AND request_id IN "
                f"({','.join('?' * len(ids))}) GROUP BY request_id",
                ids,
            ).fetchall()
        )
    gw.ledger.sample_sent += n
    gw.ledger.sample_rows_ok += sum(1 for i in ids if found.get(i) == 1)
    return overhead_ms


def vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass  # exited
    return 0.0


@dataclass
class Plan:
    """Every phase of one repeat, in run order: each scenario's direct, this-build and baseline phases
    back to back, then the workers comparison."""

    scenarios: list[list[Phase]]
    workers: list[Phase]

    def in_order(self) -> list[Phase]:
        return [p for s in self.scenarios for p in s] + self.workers

    def find(self, scenario: str, target: Gateway | None) -> Phase:
        return next(p for s in self.scenarios for p in s if p.scenario == scenario and p.target is target)


def make_plan(r: Rig, c: int) -> Plan:
    builds = [r.this, *([r.baseline] if r.baseline else [])]

    def scenario(name: str, model: str, conns: int, stream: bool, direct: bool = True) -> list[Phase]:
        targets: list[Gateway | None] = [None, *builds] if direct else [*builds]
        return [Phase(name, t, model, conns, stream) for t in targets]

    scenarios = [
        scenario("json 20ms c1", "delay20", 1, False),
        scenario(f"json 20ms c{c}", "delay20", c, False),
        scenario(f"stream 20ms c{c}", "delay20", c, True),
        scenario(f"json 0ms c{c}", "delay0", c, False),
        scenario(f"stream 0ms c{c}", "delay0", c, True, direct=False),
    ]
    workers = [Phase(f"json 0ms c{c}", gw, "delay0", c) for gw in r.by_workers.values()]
    return Plan(scenarios, workers)


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


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(
    r: Rig,
    plan: Plan,
    c: int,
    overhead_ms: dict[str, list[float]],
    info: dict[str, str],
    meta: dict[str, str],
) -> str:
    builds = [r.this, *([r.baseline] if r.baseline else [])]
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), this build: commit {info['commit']}"
        + (f"; baseline: `{r.baseline.label}` from `{meta['baseline_src']}`." if r.baseline else "."),
        "",
        f"Command: `{meta['command']}`. Load: {r.generator}; {r.pin_note}. {meta['repeats']} repeat(s) of "
        f"{meta['duration']} s per phase; within a repeat each scenario's phases run back to back (direct, "
        "this build, baseline). Each cell is the median over repeats; *added* is the median of the paired "
        "per-repeat differences against the direct phase of the same scenario. CPU µs/req: user + system "
        "time of the gateway's processes (/proc/PID/stat) over the phase, per completed request.",
        "",
        "Latency, fake upstream answering in 20 ms (a stream's latency is to its last byte):",
        "",
        "| mode | concurrency | build | direct p50 ms | gateway p50 ms | added p50 ms | direct p99 ms "
        "| gateway p99 ms | added p99 ms | gateway req/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in ("json 20ms c1", f"json 20ms c{c}", f"stream 20ms c{c}"):
        direct = plan.find(scenario, None)
        for gw in builds:
            p = plan.find(scenario, gw)
            lines.append(
                f"| {'stream' if p.stream else 'json'} | {p.connections} | {gw.label} "
                f"| {_ms(direct.median('p50_ms'))} | {_ms(p.median('p50_ms'))} "
                f"| **{_ms(_added(p, direct, 'p50_ms'))}** | {_ms(direct.median('p99_ms'))} "
                f"| {_ms(p.median('p99_ms'))} | **{_ms(_added(p, direct, 'p99_ms'))}** "
                f"| {p.median('rps'):.0f} |"
            )
    lines += [
        "",
        f"Throughput, fake upstream answering at once (0 ms), {c} connections, one gateway worker:",
        "",
        "| target | mode | req/s | p50 ms | p99 ms | CPU µs/req | non-2xx + errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    direct = plan.find(f"json 0ms c{c}", None)
    rows = [(direct, "fake provider direct")]
    rows += [(plan.find(f"{m} 0ms c{c}", gw), gw.label) for gw in builds for m in ("json", "stream")]
    for p, label in rows:
        bad = sum(x.non2xx + x.errors for x in p.runs)
        cpu = "-" if p.target is None else f"{p.cpu_us():.0f}"
        lines.append(
            f"| {label} | {'stream' if p.stream else 'json'} | **{p.median('rps'):.0f}** "
            f"| {_ms(p.median('p50_ms'))} | {_ms(p.median('p99_ms'))} | {cpu} | {bad} |"
        )
    if plan.workers:
        lines += _render_workers(plan.workers, c)
    lines += ["", *_bullets(r, plan, c, overhead_ms)]
    return "\n".join(lines)


def _render_workers(phases: list[Phase], c: int) -> list[str]:
    one, many = phases[0], phases[-1]
    assert one.target is not None and many.target is not None
    return [
        "",
        f"Workers, this build with Redis configured (`[redis] url`), 0 ms upstream, JSON, {c} connections, "
        "gateways not pinned (they share both cores with the load generator and the fake provider, so this "
        "is not a scaling measurement):",
        "",
        "| workers | req/s | p50 ms | p99 ms | CPU µs/req (all processes) | non-2xx + errors |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {p.target.workers} | **{p.median('rps'):.0f}** | {_ms(p.median('p50_ms'))} "
            f"| {_ms(p.median('p99_ms'))} | {p.cpu_us():.0f} | {sum(x.non2xx + x.errors for x in p.runs)} |"
            for p in phases
            if p.target is not None
        ),
        "",
        f"{many.target.workers} workers / 1 worker: req/s {_ratio(many.median('rps'), one.median('rps'))}, "
        f"CPU per request {_ratio(many.cpu_us(), one.cpu_us())}.",
    ]


def _bullets(r: Rig, plan: Plan, c: int, overhead_ms: dict[str, list[float]]) -> list[str]:
    out = []
    for label, samples in overhead_ms.items():
        out.append(
            f"- `x-switchboard-overhead-ms` of {label} over {len(samples)} sequential requests: median "
            f"{statistics.median(samples):.3f} ms, p90 {statistics.quantiles(samples, n=10)[-1]:.3f} ms."
        )
    rss = ", ".join(f"{gw.label} {gw.rss_mib():.0f} MiB" for gw in r.gateways)
    out.append(f"- Peak RSS per gateway (VmHWM, largest process): {rss}.")
    for gw in r.gateways:
        led = gw.ledger
        status = ", ".join(f"{k}: {v}" for k, v in sorted(led.by_status.items()))
        out.append(
            f"- Ledger of {gw.label}: {led.rows} rows written during its load phases for "
            f"{led.counted_ok} 2xx answers counted (at most {led.in_flight_bound} more in flight when "
            "phases stopped); "
            f"{led.sample_rows_ok}/{led.sample_sent} sampled ids have exactly one `ok` row; rows by status: "
            f"{status}. Verdict: {'OK' if led.verified else 'MISMATCH'}."
        )
    this = r.this
    json_c1 = _added(plan.find("json 20ms c1", this), plan.find("json 20ms c1", None), "p50_ms")
    json_rps = plan.find(f"json 0ms c{c}", this).median("rps")
    stream_rps = plan.find(f"stream 0ms c{c}", this).median("rps")
    stream_added = _added(
        plan.find(f"stream 20ms c{c}", this), plan.find(f"stream 20ms c{c}", None), "p50_ms"
    )
    out.append(
        f"- Goals (this build): added p50 at concurrency 1 <= {GOAL_ADDED_P50_MS:g} ms: "
        f"{_met(json_c1 <= GOAL_ADDED_P50_MS)} ({json_c1:.2f} ms); >= {GOAL_RPS:,.0f} req/s JSON: "
        f"{_met(json_rps >= GOAL_RPS)} ({json_rps:,.0f}); streamed req/s >= {GOAL_STREAM_RPS_RATIO:g}x JSON: "
        f"{_met(stream_rps >= GOAL_STREAM_RPS_RATIO * json_rps)} ({_ratio(stream_rps, json_rps)}); "
        f"a stream's added p50 at concurrency {c} <= {GOAL_STREAM_ADDED_P50_MS:g} ms: "
        f"{_met(stream_added <= GOAL_STREAM_ADDED_P50_MS)} ({stream_added:.2f} ms)."
    )
    if r.baseline is not None:
        out.append(_baseline_bullet(r.baseline, this, plan, c))
    return out


def _baseline_bullet(base: Gateway, this: Gateway, plan: Plan, c: int) -> str:
    rps_this = plan.find(f"json 0ms c{c}", this).median("rps")
    rps_base = plan.find(f"json 0ms c{c}", base).median("rps")
    parts = [f"JSON req/s {rps_this:,.0f} vs {rps_base:,.0f} ({_ratio(rps_this, rps_base)})"]
    within = rps_this >= rps_base * (1 - GOAL_BASELINE_DIFF) if rps_base else False  # a regression only
    for scenario in ("json 20ms c1", f"json 20ms c{c}"):
        direct = plan.find(scenario, None)
        a = _added(plan.find(scenario, this), direct, "p50_ms")
        b = _added(plan.find(scenario, base), direct, "p50_ms")
        parts.append(f"added p50 {scenario.split()[-1]} {a:.2f} vs {b:.2f} ms ({_ratio(a, b)})")
        within = within and (a <= b * (1 + GOAL_BASELINE_DIFF) if b > 0 else a <= b)
    s_this = plan.find(f"stream 0ms c{c}", this).median("rps")
    s_base = plan.find(f"stream 0ms c{c}", base).median("rps")
    parts.append(f"stream req/s {s_this:,.0f} vs {s_base:,.0f} ({_ratio(s_this, s_base)})")
    return (
        f"- This build vs {base.label}: " + "; ".join(parts) + ". Goal (JSON req/s no more than "
        f"{GOAL_BASELINE_DIFF:.0%} lower, added p50 no more than {GOAL_BASELINE_DIFF:.0%} higher): "
        f"{_met(within)}."
    )


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
    parser.add_argument("--baseline-src", type=Path, help="also measure the build in this checkout")
    parser.add_argument("--workers", type=int, default=1, help="N > 1: also compare N workers with 1 (Redis)")
    parser.add_argument("--out", type=Path, help="write/replace the section in this markdown file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator, not wrk")
    args = parser.parse_args(argv)
    c = args.connections
    baseline_src = args.baseline_src.resolve() if args.baseline_src else None
    with rig(
        pin=not args.no_pin, force_python=args.python_load, baseline_src=baseline_src, workers=args.workers
    ) as r:
        plan = make_plan(r, c)
        for gw in r.gateways:  # warm every path (connection pools, key cache, imports) before timing
            for stream in (False, True):
                headers = {"Content-Type": "application/json", "Authorization": f"Bearer {gw.key}"}
                body = chat_body("delay0", stream=stream)
                r.load(gw.url + "/v1/chat/completions", body, headers, connections=c, duration_s=1,
                       script_dir=r.tmp, pin=r.pin_load)  # fmt: skip
        for i in range(args.repeats):
            for phase in plan.in_order():
                run_phase(r, phase, args.duration_s)
                last = phase.runs[-1]
                print(
                    f"[{i + 1}/{args.repeats}] {phase.name:<40} {last.rps:8.0f} req/s"
                    f"  p50 {last.p50_ms:7.2f} ms  p99 {last.p99_ms:7.2f} ms"
                    f"  cpu {phase.cpu_us_per_request[-1] if phase.cpu_us_per_request else 0:6.0f} us/req"
                    f"  non2xx {last.non2xx} errors {last.errors}",
                    file=sys.stderr,
                )
        builds = [r.this, *([r.baseline] if r.baseline else [])]
        overhead_ms = {gw.label: sample_overhead(gw, args.samples) for gw in builds}
        for gw in r.gateways:
            gw.ledger.by_status = settled_counts(gw.db_path)
        meta = {
            "command": "python -m bench.overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
            "repeats": str(args.repeats),
            "duration": f"{args.duration_s:g}",
            "baseline_src": str(args.baseline_src),
        }
        section = render(r, plan, c, overhead_ms, machine_info(), meta)
    print(section)
    if args.out:
        update_doc(args.out, section)
        print(f"\nwrote {args.out}", file=sys.stderr)
    if not all(gw.ledger.verified for gw in r.gateways):
        sys.exit(1)


if __name__ == "__main__":
    main()
