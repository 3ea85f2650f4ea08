"""Replay a mixed workload through a real gateway over three deployments of `auto`: cloud, self-hosted, edge.

One fake provider process serves three upstream model names, each with its own TTFT, decode rate and
`n_tokens` knobs; a `switchboard serve` process routes `auto` to them for teams with different objectives
and privacy floors. Requests (seeded: sensitive prompts, short and long outputs, privacy headers, streams)
run at a fixed concurrency. Cloud cost, owned-capacity share, tokens, backend and privacy class come from the
ledger; owned capacity (self-hosted, edge) is a fixed cost per hour, reported beside the cloud bill. The run
fails (exit 1) when any request was served below its privacy floor (by the ledger's floor, or by the floor
the client intended), when a request failed, or when a ledger row is missing.
Run: `python -m bench.routing_replay [--requests 300] [--concurrency 8] [--seed 7] [--out FILE.md]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import orjson

from bench.overhead import _spawn, _wait_http, free_port, machine_info, stop_all
from bench.routing import update_section
from routing.privacy import PrivacyTier

MODEL = "auto"


@dataclass(frozen=True, slots=True)
class Site:
    """One deployment: its backend, what the fake upstream does (routing's priors are set to the same),
    and its price: per token (USD per Mtok, in and out) for the cloud, per hour for our own machines."""

    backend: str
    upstream: str
    tier: PrivacyTier
    ttft_ms: float
    tokens_per_s: float
    usd_per_mtok: tuple[str, str] | None = None
    usd_per_hour: str | None = None
    extra_toml: str = ""  # more settings of the deployment

    @property
    def price_text(self) -> str:
        if self.usd_per_mtok:
            return f"{self.usd_per_mtok[0]} / {self.usd_per_mtok[1]} USD per Mtok in / out"
        return f"{self.usd_per_hour} USD/h"


SITES = (
    Site("cloud", "mini-cloud", PrivacyTier.EXTERNAL, 300, 80, ("0.15", "0.60"), None, "quality_tier = 2"),
    Site("selfhosted", "llama-8b", PrivacyTier.INTERNAL, 150, 40, None, "2.00", "quality_tier = 1"),
    Site("edge", "llama-1b", PrivacyTier.EDGE, 80, 20, None, "0", "context_tokens = 8192"),
)  # fmt: skip
TIER_OF = {s.backend: s.tier for s in SITES}
CLOUD_IN_USD_PER_MTOK, CLOUD_OUT_USD_PER_MTOK = (Decimal(x) for x in SITES[0].usd_per_mtok or ())
SELFHOSTED_USD_PER_HOUR = Decimal(SITES[1].usd_per_hour or 0)
# team -> (objective, privacy floor, share of requests)
TEAMS = {
    "support": ("latency", PrivacyTier.EXTERNAL, 0.35),
    "analytics": ("cost", PrivacyTier.EXTERNAL, 0.25),
    "product": ("balanced", PrivacyTier.EXTERNAL, 0.25),
    "hr": ("latency", PrivacyTier.INTERNAL, 0.15),
}


def gateway_config(gw_port: int, tmp: Path, fake_url: str) -> str:
    nl = "\n"
    parts = [
        f'[server]{nl}host = "127.0.0.1"{nl}port = {gw_port}',
        f'[database]{nl}url = "sqlite:///{tmp}/ledger.db"{nl}spill_path = "{tmp}/spill.jsonl"',
    ]
    deployments = []
    for s in SITES:
        hourly = f'{nl}usd_per_hour = "{s.usd_per_hour}"' if s.usd_per_hour else ""
        parts.append(
            f'[backends.{s.backend}]{nl}kind = "openai"{nl}base_url = "{fake_url}/v1"{nl}'
            f'privacy_tier = "{s.tier}"{nl}prior_ttft_ms = {s.ttft_ms}{nl}'
            f"prior_tokens_per_s = {s.tokens_per_s}{hourly}"
        )
        price = ""
        if s.usd_per_mtok:
            price = (
                f', input_usd_per_mtok = "{s.usd_per_mtok[0]}", output_usd_per_mtok = "{s.usd_per_mtok[1]}"'
            )
        deployments.append(
            f'  {{ backend = "{s.backend}", upstream_model = "{s.upstream}", {s.extra_toml}{price} }},'
        )
    parts.append(f"[models.{MODEL}]{nl}deployments = [{nl}{nl.join(deployments)}{nl}]")
    for name, (objective, floor, _) in TEAMS.items():
        parts.append(
            f'[teams.{name}]{nl}models = ["{MODEL}"]{nl}objective = "{objective}"{nl}'
            f'privacy_floor = "{floor}"{nl}on_sensitive = "raise_floor"'
        )
    return (nl * 2).join(parts) + nl


# ---- the workload ------------------------------------------------------------------------------------------

_TASKS = (
    "Summarise the main risks in this plan for the platform team",
    "Draft a polite reply to the customer below and keep it short",
    "Translate the following paragraph into French",
    "Explain what this error means and how to fix it",
    "List three follow-up questions for the meeting notes below",
    "Rewrite this paragraph so that a new engineer understands it",
)
_PROSE = (
    "the service migrates batches of records overnight while the dashboard shows stale totals and the team "
    "wants a clearer rollback plan before the next release because several customers reported slow pages "
    "during peak hours and the cache warms too late after each deploy"
)
_WORDS = tuple(_PROSE.split())
# Fake or documentation data in the shapes of the detectors' corpus (tests/support/privacy_corpus.py).
_SENSITIVE = {
    "email": ("Contact me at john.doe@example.com for details.", "Reply to jane.oneil@sub.domain.example"),
    "credit_card": ("card 4111 1111 1111 1111 exp 12/27", "pay with 5500-0000-0000-0004 please"),
    "iban": ("IBAN: DE89 3704 0044 0532 0130 00", "pay GB82WEST12345698765432 today"),
    "phone": ("Call me on +44 20 7946 0958.", "US office: (212) 555-0147"),
}


@dataclass(frozen=True, slots=True)
class Job:
    team: str
    body: bytes
    header: PrivacyTier | None  # x-switchboard-privacy
    sensitive: str | None  # the planted kind
    max_tokens: int
    stream: bool

    @property
    def intended_floor(self) -> PrivacyTier:
        """The floor the client expects: team's, raised by the header and by sensitive data (raise_floor)."""
        floors = [TEAMS[self.team][1], self.header or PrivacyTier.EXTERNAL]
        if self.sensitive:
            floors.append(PrivacyTier.INTERNAL)
        return min(floors, key=lambda t: t.rank)


def _filler(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def make_workload(n: int, seed: int, *, sensitive_share: float = 0.2, long_share: float = 0.3) -> list[Job]:
    rng = random.Random(seed)
    names, weights = list(TEAMS), [t[2] for t in TEAMS.values()]
    jobs = []
    for _ in range(n):
        team = rng.choices(names, weights)[0]
        kind = rng.choice(list(_SENSITIVE)) if rng.random() < sensitive_share else None
        prompt = f"{rng.choice(_TASKS)}:\n{_filler(rng, 4000 if rng.random() < 0.25 else 160)}"
        if kind:
            prompt += "\n" + rng.choice(_SENSITIVE[kind])
        roll = rng.random()
        header = PrivacyTier.EDGE if roll < 0.04 else PrivacyTier.INTERNAL if roll < 0.12 else None
        max_tokens = 256 if rng.random() < long_share else 16
        stream = rng.random() < 0.5
        body: dict[str, object] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        jobs.append(Job(team, orjson.dumps(body), header, kind, max_tokens, stream))
    return jobs


# ---- the rig -----------------------------------------------------------------------------------------------


@dataclass
class Rig:
    gateway_url: str
    db_path: Path
    keys: dict[str, str]


def _make_keys(db_url: str) -> dict[str, str]:
    from gateway.store import db, keys

    db.migrate(db_url)
    engine = db.make_engine(db_url)
    try:
        keys.upsert_teams(engine, {team: [MODEL] for team in TEAMS})
        return {
            team: keys.create_key(engine, team, name="replay", models=None, expires_at=None).plaintext
            for team in TEAMS
        }
    finally:
        engine.dispose()


@contextmanager
def rig() -> Iterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="sb-replay-") as tmp_name:
        tmp = Path(tmp_name)
        fake_port, gw_port = free_port(), free_port()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            fake_cmd = [sys.executable, "-m", "tests.support.fake_provider", "--port", str(fake_port)]
            procs.append(_spawn([*fake_cmd, "--max-recorded", "4"], tmp / "fake.log"))
            fake = f"http://127.0.0.1:{fake_port}"
            _wait_http(fake + "/v1/models", procs[-1], tmp / "fake.log")
            for site in SITES:  # n_tokens >= every max_tokens, so max_tokens sets the completion length
                knobs = {"ttft_ms": site.ttft_ms, "tokens_per_s": site.tokens_per_s, "n_tokens": 256}
                httpx.post(fake + "/_control", json={"model": site.upstream, **knobs}).raise_for_status()
            config = tmp / "gateway.toml"
            config.write_text(gateway_config(gw_port, tmp, fake))
            team_keys = _make_keys(f"sqlite:///{tmp / 'ledger.db'}")
            cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
            procs.append(_spawn(cmd, tmp / "gateway.log"))
            gateway_url = f"http://127.0.0.1:{gw_port}"
            _wait_http(gateway_url + "/healthz", procs[-1], tmp / "gateway.log")
            yield Rig(gateway_url, tmp / "ledger.db", team_keys)
        finally:
            stop_all(procs)


# ---- the replay --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    job: Job
    status: int
    latency_ms: float  # client side, until the last byte
    request_id: str
    backend: str | None  # x-switchboard-backend


async def _send(client: httpx.AsyncClient, r: Rig, job: Job) -> Outcome:
    headers = {"authorization": f"Bearer {r.keys[job.team]}", "content-type": "application/json"}
    if job.header:
        headers["x-switchboard-privacy"] = str(job.header)
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", content=job.body, headers=headers) as resp:
            async for _ in resp.aiter_raw():
                pass
    except httpx.TransportError:
        return Outcome(job, 0, (time.perf_counter() - started) * 1000, "", None)  # counted as failed
    latency_ms = (time.perf_counter() - started) * 1000
    h = resp.headers
    return Outcome(
        job, resp.status_code, latency_ms, h.get("x-request-id", ""), h.get("x-switchboard-backend")
    )


async def replay(r: Rig, jobs: list[Job], concurrency: int) -> list[Outcome]:
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=r.gateway_url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                outcomes.append(await _send(client, r, queue.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


@dataclass(frozen=True, slots=True)
class Row:
    backend: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    privacy_class: str | None
    status: str
    owned_micro_usd: int = 0


def ledger_rows(db_path: Path, ids: list[str], timeout_s: float = 15.0) -> dict[str, Row]:
    """The rows of `ids` once all are written (the writer flushes every 0.2 s) or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    query = (
        "SELECT request_id, backend, prompt_tokens, completion_tokens, cost_micro_usd, privacy_class, "
        "status, owned_micro_usd FROM usage"
    )
    while True:
        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as conn:
            rows = {rid: Row(*rest) for rid, *rest in conn.execute(query)}
        if all(i in rows for i in ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


# ---- the report --------------------------------------------------------------------------------------------


def _pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _latency_row(label: str, outcomes: list[Outcome]) -> str:
    ms = [o.latency_ms for o in outcomes]
    counts = Counter(o.backend for o in outcomes)
    shares = " | ".join(f"{100 * counts[s.backend] / max(1, len(ms)):.0f}%" for s in SITES)
    return f"| {label} | {len(ms)} | {_pct(ms, 50):.0f} | {_pct(ms, 95):.0f} | {shares} |"


def _class_of(job: Job) -> str:
    if job.header:
        return f"header `{job.header}`"
    return "planted sensitive data" if job.sensitive else "plain"


def _at_cloud_price(row: Row) -> int:
    exact = row.prompt_tokens * CLOUD_IN_USD_PER_MTOK + row.completion_tokens * CLOUD_OUT_USD_PER_MTOK
    return int(exact.to_integral_value(rounding="ROUND_HALF_UP"))


def _below(floor: PrivacyTier, backend: str | None) -> bool:
    return backend is not None and TIER_OF[backend].rank > floor.rank


def _detected(row: Row | None) -> bool:
    return row is not None and ":" in (row.privacy_class or "")  # `floor:kind,kind` when a detector fired


@dataclass
class Verdict:
    failed: int = 0
    missing_rows: int = 0
    ledger_violations: int = 0  # served by a backend below the floor the ledger recorded
    client_violations: int = 0  # served by a backend below the floor the client intended
    planted: int = 0
    planted_found: int = 0
    clean: int = 0
    clean_flagged: int = 0

    @property
    def ok(self) -> bool:
        return not (self.failed or self.missing_rows or self.ledger_violations or self.client_violations)


def check(outcomes: list[Outcome], rows: dict[str, Row]) -> Verdict:
    v = Verdict()
    for o in outcomes:
        row = rows.get(o.request_id)
        v.missing_rows += row is None
        if o.status != 200:
            v.failed += 1
            continue
        if row is not None and row.privacy_class:
            v.ledger_violations += _below(PrivacyTier(row.privacy_class.split(":")[0]), row.backend)
        v.client_violations += _below(o.job.intended_floor, o.backend)
        if o.job.sensitive:
            v.planted += 1
            v.planted_found += _detected(row)
        else:
            v.clean += 1
            v.clean_flagged += _detected(row)
    return v


def _setup_lines(args: argparse.Namespace, outcomes: list[Outcome], wall_s: float) -> list[str]:
    info = machine_info()
    jobs = [o.job for o in outcomes]
    out = f" --out {args.out}" if args.out else ""
    command = (
        f"python -m bench.routing_replay --requests {args.requests} --concurrency {args.concurrency} "
        f"--seed {args.seed}{out}"
    )
    return [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}; 1-minute load average "
        f"{os.getloadavg()[0]:.2f} at the start (other work shares this machine when it is above 0).",
        "",
        f"Command: `{command}`. {len(jobs)} requests to model `auto`, {args.concurrency} at a time, "
        f"{wall_s:.0f} s wall; one fake provider process (three upstream model names) and one "
        "`switchboard serve` process (SQLite ledger), both on this machine.",
        "",
        "| deployment | tier | price | fake TTFT ms | fake tok/s per stream |",
        "|---|---|---|---:|---:|",
        *(
            f"| {s.backend} | {s.tier} | {s.price_text} | {s.ttft_ms:.0f} | {s.tokens_per_s:.0f} |"
            for s in SITES
        ),
        "",
        f"Routing priors (`prior_ttft_ms`, `prior_tokens_per_s`) equal the fake's knobs. Workload (seed "
        f"{args.seed}): {sum(1 for j in jobs if j.sensitive)} prompts with a planted email, card, IBAN or "
        f"phone number; {sum(1 for j in jobs if j.max_tokens == 256)} with max_tokens 256, the rest 16; "
        f"{sum(1 for j in jobs if j.header)} with an `x-switchboard-privacy` header (internal or edge); "
        f"{sum(1 for j in jobs if j.stream)} streamed; prompts of about 200 characters or 4 KB.",
    ]


def _latency_lines(served: list[Outcome]) -> list[str]:
    heads = " | ".join(s.backend for s in SITES)
    table = [
        f"| {{}} | requests | p50 ms | p95 ms | {heads} |",
        "|---|---:|---:|---:|" + "---:|" * len(SITES),
    ]
    classes = ("plain", "planted sensitive data", "header `internal`", "header `edge`")
    return [
        "Latency (client side, to the last byte) and share of traffic per deployment:",
        "",
        table[0].format("team (objective, floor)"),
        table[1],
        *(
            _latency_row(f"{t} ({TEAMS[t][0]}, {TEAMS[t][1]})", [o for o in served if o.job.team == t])
            for t in TEAMS
        ),
        _latency_row("**all**", served),
        "",
        table[0].format("request class"),
        table[1],
        *(_latency_row(c, [o for o in served if _class_of(o.job) == c]) for c in classes),
        "",
        "| deployment | p50 ms, 16 tokens | fake alone (JSON / stream) | p50 ms, 256 tokens | fake alone |",
        "|---|---:|---:|---:|---:|",
        *(_site_row(s, served) for s in SITES),
    ]


def _site_row(site: Site, served: list[Outcome]) -> str:
    """Measured p50 next to what the fake alone takes: TTFT plus one inter-token gap per further token; a
    stream has three more gaps, since the fake also spaces its finish, usage and [DONE] events."""
    cells = []
    itl_ms = 1000 / site.tokens_per_s
    for tokens in (16, 256):
        ms = [o.latency_ms for o in served if o.backend == site.backend and o.job.max_tokens == tokens]
        whole, streamed = site.ttft_ms + (tokens - 1) * itl_ms, site.ttft_ms + (tokens + 2) * itl_ms
        cells.append(f"{_pct(ms, 50):.0f} (n={len(ms)}) | {whole:.0f} / {streamed:.0f}")
    return f"| {site.backend} | {' | '.join(cells)} |"


def _cost_lines(mine: list[Row], wall_s: float) -> list[str]:
    def row(label: str, rs: list[Row]) -> str:
        tokens = f"{sum(r.prompt_tokens for r in rs)} | {sum(r.completion_tokens for r in rs)}"
        costs = f"{sum(r.cost_micro_usd for r in rs)} | {sum(r.owned_micro_usd for r in rs)}"
        return f"| {label} | {len(rs)} | {tokens} | {costs} |"

    cost = sum(r.cost_micro_usd for r in mine)
    cloud = sum(_at_cloud_price(r) for r in mine)
    box = SELFHOSTED_USD_PER_HOUR * Decimal(wall_s) / 3600 * 1_000_000
    if not cloud:
        saved = "no cloud-priced tokens"
    else:
        change = 100 * (1 - cost / cloud)
        saved = f"{change:.0f}% less" if change >= 0 else f"{-change:.0f}% more"
    return [
        "Cost from the ledger (integer micro-USD):",
        "",
        "| deployment | requests | prompt tokens | completion tokens | cloud cost µUSD | owned share µUSD |",
        "|---|---:|---:|---:|---:|---:|",
        *(row(s.backend, [r for r in mine if r.backend == s.backend]) for s in SITES),
        row("**all**", mine),
        "",
        f"- Routed: **{cost} µUSD** of cloud spend in the ledger. The same tokens, all at the cloud price: "
        f"**{cloud} µUSD** ({saved}). Owned capacity is a fixed cost, paid whatever it serves: the "
        f"self-hosted box at 2.00 USD/h costs {box:.0f} µUSD for this run's {wall_s:.0f} s (the edge box 0); "
        f"the ledger's owned-share column charges {sum(r.owned_micro_usd for r in mine)} µUSD of it back to "
        "the requests that used it (serving time / requests sharing the box).",
    ]


def render(
    args: argparse.Namespace, outcomes: list[Outcome], rows: dict[str, Row], wall_s: float
) -> tuple[str, Verdict]:
    v = check(outcomes, rows)
    served = [o for o in outcomes if o.status == 200]
    mine = [rows[o.request_id] for o in outcomes if o.request_id in rows]
    lines = [
        *_setup_lines(args, outcomes, wall_s),
        "",
        *_latency_lines(served),
        "",
        *_cost_lines(mine, wall_s),
        f"- Privacy: {v.ledger_violations} requests served below the floor in their ledger `privacy_class`, "
        f"{v.client_violations} below the floor the client intended (team, header, planted data). Detectors "
        f"flagged {v.planted_found} of {v.planted} served prompts with planted data and {v.clean_flagged} of "
        f"{v.clean} without.",
        f"- Failed requests: {v.failed}; missing ledger rows: {v.missing_rows}. Verdict: "
        f"{'OK' if v.ok else 'FAILED'}.",
    ]
    return "\n".join(lines), v


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write the result into this markdown file's section")
    args = parser.parse_args(argv)
    jobs = make_workload(args.requests, args.seed)
    with rig() as r:
        started = time.perf_counter()
        outcomes = asyncio.run(replay(r, jobs, args.concurrency))
        wall_s = time.perf_counter() - started
        rows = ledger_rows(r.db_path, [o.request_id for o in outcomes])
    text, verdict = render(args, outcomes, rows, wall_s)
    print(text)
    if args.out:
        update_section(args.out, "bench/routing_replay", "Routing replay (`bench/routing_replay`)", text)
    sys.exit(0 if verdict.ok else 1)


if __name__ == "__main__":
    main()
