"""Soak: one `switchboard serve` process under a steady mixed load for a long time; does anything leak?

`bench.soak_rig` starts the loopback fake provider and one gateway (PostgreSQL in its own schema behind a
proxy that can cut it, or `--db sqlite`). This module sends `--rate` requests per second (open loop) for
`--duration-s`: the mix of `bench.soak_traffic` (four APIs, streams, cache hits, fallbacks, a rate-limited
key, clients that leave). Every `--db-outage-every-s` the database is cut for `--db-outage-s`, so the ledger
spills and replays. Every `--sample-s` it reads the gateway's RSS, fds and threads (/proc), its asyncio
tasks and ledger queue (/metrics) and the spill file's size. Then it settles the ledger, counts rows against
requests sent, judges (`bench.soak_report`) and draws the curves. Every figure written is measured here.
Run: `python -m bench.soak [--duration-s 1800] [--rate 60] [--out docs/BENCHMARKS.md] [--chart F.png]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import soak_report as report
from bench.overhead import machine_info
from bench.soak_rig import OutageProxy, Rig, start_rig, stop_rig
from bench.soak_traffic import Kind, Traffic

MARK_START, MARK_END = "<!-- bench/soak:start -->", "<!-- bench/soak:end -->"
SETTLE_TIMEOUT_S = 90.0
GOAL_DURATION_S = 1800.0


@dataclass
class Run:
    rig: Rig
    duration_s: float
    t0: float = 0.0
    outcomes: report.Outcomes = field(default_factory=report.Outcomes)
    samples: list[report.Sample] = field(default_factory=list)
    outages: list[report.Outage] = field(default_factory=list)
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)

    def now(self) -> float:
        return time.monotonic() - self.t0


def _proc_status(pid: int) -> tuple[float, int]:
    rss_kib, threads = 0, 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss_kib / 1024, threads


def _gauge(text: str, name: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return None


async def sample(run: Run, client: httpx.AsyncClient) -> report.Sample:
    pid = run.rig.gateway_pid
    rss_mib, threads = _proc_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    tasks = queued = None
    try:
        resp = await client.get("/metrics", headers={"authorization": f"Bearer {run.rig.admin_key}"})
        tasks = _gauge(resp.text, "switchboard_asyncio_tasks")
        queued = _gauge(resp.text, "switchboard_ledger_queued")
    except httpx.TransportError:
        pass  # a missed scrape is a gap in the curve, not a failed run
    down = run.rig.proxy is not None and run.rig.proxy.down
    return report.Sample(
        run.now(), rss_mib, fds, threads, tasks, run.rig.spill_bytes(), queued, len(run.in_flight), down
    )


async def sampler(run: Run, every_s: float, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=run.rig.url, timeout=5.0) as client:
        while not stop.is_set():
            s = await sample(run, client)
            run.samples.append(s)
            print(
                f"t={s.t_s:7.1f}s rss={s.rss_mib:6.1f}MiB fds={s.fds:4d} threads={s.threads:3d} "
                f"tasks={s.tasks} spill={s.spill_bytes}B queued={s.queued} in_flight={s.in_flight} "
                f"sent={run.outcomes.total()}{' DB DOWN' if s.db_down else ''}",
                file=sys.stderr,
            )
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                continue


async def outages(run: Run, proxy: OutageProxy, every_s: float, length_s: float) -> None:
    """Cut the database at every_s, 2 every_s, ... for length_s; note the spill file's size when it comes back
    and how long the replay takes to empty it."""
    start = every_s
    while start + length_s < run.duration_s:
        await asyncio.sleep(max(0.0, start - run.now()))
        proxy.cut()
        await asyncio.sleep(length_s)
        peak = run.rig.spill_bytes()
        proxy.restore()
        end, drained = run.now(), None
        while run.now() < min(start + every_s, run.duration_s):
            if run.rig.spill_bytes() == 0:
                drained = run.now() - end
                break
            await asyncio.sleep(0.2)
        run.outages.append(report.Outage(start, end, peak, drained))
        start += every_s


async def drive(run: Run, traffic: Traffic, rate: float, max_in_flight: int) -> None:
    """Open loop: request n is launched at t0 + n / rate, whatever happened to the earlier ones."""

    async def one(kind: Kind) -> None:
        try:
            outcome, rid = await traffic.one(kind)
        except Exception as exc:  # noqa: BLE001  the driver keeps going; the report shows the error's type
            outcome, rid = f"driver_{type(exc).__name__}", None
        run.outcomes.add(kind.name, outcome, rid)

    n = 0
    while (due := n / rate) < run.duration_s:
        await asyncio.sleep(max(0.0, due - run.now()))
        n += 1
        if len(run.in_flight) >= max_in_flight:
            run.outcomes.skipped += 1
            continue
        task = asyncio.create_task(one(traffic.pick()))
        run.in_flight.add(task)
        task.add_done_callback(run.in_flight.discard)


@dataclass
class LedgerRows:
    rows: list[tuple[str, str, int]]  # (request_id, status, http_status)
    cache_hits: int
    fallbacks: int  # `flaky` answered by its second deployment


def read_ledger(rig: Rig) -> LedgerRows:
    engine = rig.db_engine()
    try:
        with engine.connect() as conn:
            q = conn.exec_driver_sql
            rows = [(r[0], r[1], int(r[2])) for r in q("SELECT request_id, status, http_status FROM usage")]
            hits = q("SELECT count(*) FROM usage WHERE cache_hit").scalar()
            fallbacks = q(
                "SELECT count(*) FROM usage WHERE requested_model = 'flaky' AND status = 'ok' "
                "AND backend = 'fake2'"
            ).scalar()
            return LedgerRows(rows, int(hits or 0), int(fallbacks or 0))
    finally:
        engine.dispose()


async def settle(run: Run) -> LedgerRows:
    """Wait for the requests in flight, the spill replay and the writer queue; then count rows twice, 1 s
    apart, until they agree."""
    if run.in_flight:
        await asyncio.wait(run.in_flight, timeout=60)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last: LedgerRows | None = None
    async with httpx.AsyncClient(base_url=run.rig.url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            s = await sample(run, client)
            run.samples.append(s)
            if s.spill_bytes == 0 and s.queued == 0:
                counts = await asyncio.to_thread(read_ledger, run.rig)
                if last is not None and len(counts.rows) == len(last.rows):
                    return counts
                last = counts
            await asyncio.sleep(1.0)
    return last if last is not None else await asyncio.to_thread(read_ledger, run.rig)


async def soak(args: argparse.Namespace, tmp: Path) -> tuple[Run, LedgerRows]:
    postgres = args.db == "postgres"
    proxy = OutageProxy("127.0.0.1", 5432) if postgres else None
    schema = f"sb_soak_{secrets.token_hex(4)}" if postgres else None
    rig = Rig(tmp, args.db, schema, proxy)
    try:
        key, tight = await start_rig(rig, args)
        run = Run(rig, args.duration_s)
        traffic = Traffic(rig.url, key, tight)
        stop = asyncio.Event()
        run.t0 = time.monotonic()
        background = [asyncio.create_task(sampler(run, args.sample_s, stop))]
        if proxy is not None and args.db_outage_every_s > 0:
            background.append(
                asyncio.create_task(outages(run, proxy, args.db_outage_every_s, args.db_outage_s))
            )
        await drive(run, traffic, args.rate, args.max_in_flight)
        stop.set()  # the sampler stops; the outage task ends by itself (its last outage ends before this)
        await asyncio.gather(*background)
        counts = await settle(run)
        await traffic.aclose()
        return run, counts
    finally:
        await asyncio.to_thread(stop_rig, rig)


def _listed(counts: dict[str, int]) -> str:
    return "; ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def ledger_bullets(run: Run, ledger: LedgerRows) -> list[str]:
    check = report.check_ledger(run.outcomes, ledger.rows)
    return [
        f"- Ledger, one row per request: **{'met' if check.one_row_each else 'NOT met'}**; row status "
        f"agrees with the client's: **{'met' if not check.disagree else 'NOT met'}**. {check.rows} rows for "
        f"{run.outcomes.total()} "
        f"requests sent ({check.no_id} without an answer head: timed out on purpose or transport errors); "
        f"{check.duplicates} duplicate rows; rows for ids the client never saw, by status: "
        f"{_listed(check.unmatched)}. Cache hits: {ledger.cache_hits}; `flaky` answers served by its "
        f"fallback deployment: {ledger.fallbacks}.",
        f"  - Answered (2xx) or left by the client, but no row: {_listed(check.missing_answered)}.",
        f"  - Row status differs from what the client saw: {_listed(check.disagree)}.",
        f"  - Refused with no row (refused before the pipeline): {_listed(check.missing_refused)}.",
    ]


def render(args: argparse.Namespace, argv: list[str], run: Run, ledger: LedgerRows, log_note: str) -> str:
    info, o = machine_info(), run.outcomes
    sent = o.total()
    final_spill = run.samples[-1].spill_bytes if run.samples else -1
    verdicts = report.judge(run.samples, run.duration_s, run.outages, final_spill)
    outage_note = (
        f"the database cut for {args.db_outage_s:g} s every {args.db_outage_every_s:g} s "
        f"({len(run.outages)} outages)"
        if run.outages
        else "no database outage"
    )
    short = run.duration_s < GOAL_DURATION_S
    lines = [
        *(
            [
                f"**Preliminary**: a {run.duration_s / 60:g}-minute run; the goals are set for "
                f"{GOAL_DURATION_S / 60:g} minutes."
            ]
            if short
            else []
        ),
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}.",
        "",
        f"Command: `python -m bench.soak {' '.join(argv)}`. One gateway process, ledger on "
        f"{'PostgreSQL (own schema, through a cutting proxy)' if args.db == 'postgres' else 'SQLite'}, "
        f"in-process cache ({args.cache_entries} entries) and limits; {outage_note}. "
        f"{run.duration_s / 60:g} min at {args.rate:g} req/s target, {sent / run.duration_s:.1f} req/s sent "
        f"({sent} requests, {o.skipped} launches skipped at the in-flight cap); samples every "
        f"{args.sample_s:g} s. Warm-up: the first {report.warmup_s(run.duration_s):.0f} s. Chart: "
        f"`{args.chart}`. Gateway log: {log_note}.",
        "",
        *report.outcome_table(o),
        "",
        "Verdicts (windows and rules: `bench/soak_report.py`):",
        "",
        *(f"- {v.name}: **{'met' if v.met else 'NOT met'}** ({v.detail})." for v in verdicts),
        *ledger_bullets(run, ledger),
    ]
    return "\n".join(lines)


def log_note(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    tracebacks = sum("Traceback" in line for line in lines)
    errors = sum(" ERROR " in line or '"ERROR"' in line for line in lines)
    warnings = sum(" WARNING " in line or '"WARNING"' in line for line in lines)
    return f"{len(lines)} lines, {errors} ERROR, {warnings} WARNING, {tracebacks} tracebacks"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second, all kinds together")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--db-outage-every-s", type=float, default=300.0, help="0: no outages")
    parser.add_argument("--db-outage-s", type=float, default=15.0)
    parser.add_argument("--fail-every", type=int, default=4, help="the flaky primary fails 1 request in N")
    parser.add_argument("--tight-requests", type=int, default=20, help="the tight key's requests per minute")
    parser.add_argument("--cache-entries", type=int, default=500, help="cache.memory_max_entries")
    parser.add_argument("--max-in-flight", type=int, default=400)
    parser.add_argument(
        "--rollup-interval-s", type=float, default=60.0, help="reports.rollup_interval_s (the default)"
    )
    parser.add_argument("--out", type=Path, help="write/replace the section in this markdown file")
    parser.add_argument("--chart", type=Path, default=Path("docs/soak.png"))
    parser.add_argument("--keep-log", type=Path, help="copy the gateway's log here")
    parser.add_argument(
        "--trace-dir",
        type=Path,
        help="run the gateway under bench/soak_trace (tracemalloc, allocator figures); its files go here",
    )
    args = parser.parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="sb-soak-") as tmp:
        run, ledger = asyncio.run(soak(args, Path(tmp)))
        note = log_note(Path(tmp) / "gateway.log")
        if args.keep_log:
            args.keep_log.write_bytes((Path(tmp) / "gateway.log").read_bytes())
    report.draw(run.samples, run.duration_s, run.outages, args.chart)
    section = render(args, argv, run, ledger, note)
    print(section)
    if args.out:
        report.update_doc(args.out, section, MARK_START, MARK_END, "Soak (`bench/soak`)")
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
