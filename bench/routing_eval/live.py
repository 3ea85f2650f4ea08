"""The simulator against the real thing: the same trace, scaled down, on live engine replicas, a cloud fake.

Three `switchboard engine serve --threads 1` replicas (SmolLM2) and the loopback cloud fake (`cloud-mini`,
its TTFT and tok/s knobs set to the simulator's cloud medians) serve a short `bursty-agents` trace, open
loop at its arrival times. A policy (the same `Switchboard` adapter the simulator uses, or round-robin over
the replicas) places each request from live counts; responses stream, and TTFT, latency and usage are
measured. An agent turn sends its conversation: the system prompt, then each earlier turn's message and
the answer the replay got for it (a stand-in of the trace's length while that turn still runs; a turn whose
history was cut short gets a stand-in of that size), then its own message, so a turn starts with its
previous turn's whole prompt and answer, as in the trace and as an agent loop sends it. The
simulator then replays the trace with each request's measured token counts on a fleet of the same shape.
Edge-floor requests are left out (no edge node here). Run:
`python -m bench.routing_eval.live [--minutes 2] [--load-boxes 4] [--curve PATH] [--shared-cores N]
[--contended-curve PATH] [--policies switchboard,replicas-only,round-robin] [--out docs/BENCHMARKS.md]`.
Without `--curve` it first measures this machine's two curves below (`calibrate`, about a minute and a
half) and replays on them with `--shared-cores` this machine's core count: a curve measured on another CPU
sets the trace's rate for an engine of another speed, and the simulator then describes another load.
The replicas share this machine's cores, so the closest simulation is the curve of one engine alone
(`python -m bench.routing_eval.calibrate --engines 1 --out PATH`) with `--shared-cores` the machine's core
count: a replica steps slower only while more are busy than there are cores. A curve measured with all three
busy at once (`calibrate --engines 3`) charges every step for contention the replay has only at its peaks
(docs/BENCHMARKS.md, "Reading the live check"); given as `--contended-curve`, it is what a replica steps at
while all three are busy (time slicing, caches and memory make that slower than busy / cores), blended in
linearly from the cores' count of busy replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import httpx

from backends.base import DEADLINE_HEADER
from bench.overhead import _spawn, _wait_http, free_port, machine_info, stop_all
from bench.routing_eval import calibrate
from bench.routing_eval.calibrate import engine_cmd
from bench.routing_eval.conversation import messages_of, shared_system_tokens
from bench.routing_eval.fleet import CLOUD as CLOUD_MODEL
from bench.routing_eval.fleet import StepModel, load_curve, make_fleet
from bench.routing_eval.metrics import percentile
from bench.routing_eval.report import make_trace
from bench.routing_eval.sim import CLOUD, Job, Simulation
from bench.routing_eval.switchboard import Switchboard
from bench.routing_eval.workload import Request
from routing.fleet import prompt_context

REPLICAS = 3
MAX_OUTPUT = 32  # short outputs keep the replay to a few minutes on two shared cores


@dataclasses.dataclass
class _BoxView:
    spec: object
    in_system: int = 0
    waiting: list[int] = dataclasses.field(default_factory=list)  # only its length is read
    pending_prompt_tokens: int = 0  # as the gateway counts them: until each request's first token
    pending_prompt_context: float = 0.0  # theirs (routing.fleet.prompt_context)
    in_flight_context: int = 0  # the whole prompts of the requests in flight here

    @property
    def running(self) -> int:
        return min(self.in_system, 8)


class LiveView:
    """What `Switchboard.route` reads from a `Simulation`, kept from the replay's own in-flight counts."""

    def __init__(self, fleet: object) -> None:
        self.fleet = fleet
        self.boxes = {b.name: _BoxView(b) for b in fleet.boxes}  # type: ignore[attr-defined]
        self.cloud_in_flight = 0

    def start(self, target: str, prompt_tokens: int, cached_tokens: int) -> None:
        if target == CLOUD:
            self.cloud_in_flight += 1
            return
        box = self.boxes[target]
        box.in_system += 1
        box.waiting = [0] * max(0, box.in_system - 8)
        box.pending_prompt_tokens += prompt_tokens
        box.pending_prompt_context += prompt_context(prompt_tokens, cached_tokens)
        box.in_flight_context += prompt_tokens + cached_tokens

    def first_token(self, target: str, prompt_tokens: int, cached_tokens: int) -> None:
        if target != CLOUD:
            box = self.boxes[target]
            box.pending_prompt_tokens = max(0, box.pending_prompt_tokens - prompt_tokens)
            context = box.pending_prompt_context - prompt_context(prompt_tokens, cached_tokens)
            box.pending_prompt_context = max(0.0, context) if box.pending_prompt_tokens else 0.0

    def end(self, target: str, prompt_tokens: int) -> None:
        if target == CLOUD:
            self.cloud_in_flight -= 1
            return
        box = self.boxes[target]
        box.in_system -= 1
        box.waiting = [0] * max(0, box.in_system - 8)
        box.in_flight_context = max(0, box.in_flight_context - prompt_tokens)


async def _send(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    messages: list[dict[str, str]],
    req: Request,
    on_first: Callable[[], None],
    deadline_ms: float | None = None,
) -> tuple[float, float, int, int, str]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": req.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, usage = 0.0, {"prompt_tokens": 0, "completion_tokens": 0}
    text: list[str] = []
    headers = {} if deadline_ms is None else {DEADLINE_HEADER: f"{deadline_ms:.0f}"}
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            content = chunk["choices"][0].get("delta", {}).get("content") if chunk.get("choices") else None
            if content:
                text.append(content)
                if not first:
                    first = time.perf_counter() - started
                    on_first()
    total = time.perf_counter() - started
    return first or total, total, usage["prompt_tokens"], usage["completion_tokens"], "".join(text)


async def replay(
    trace: list[Request],
    policy: object,
    view: LiveView,
    urls: dict[str, str],
    run: int = 0,
    answered: list[int] | None = None,
    refused: list[int] | None = None,
) -> list[Job]:
    """Each request at its arrival time, placed by `policy`; an agent turn sends back the answers its session
    got so far (`conversation.messages_of`). `answered`, if given, gets the rids of the turns that sent their
    previous turn's real answer (the rest sent a stand-in: it was still running); `refused`, the rids the
    policy refused (Switchboard's 503 past a first token's deadline)."""
    jobs: list[Job] = []
    answers: dict[int, str] = {}
    by_rid = {r.rid: r for r in trace}
    # Idle connections are dropped well before the servers' own keep-alive timeout (uvicorn's: 5 s, httpx's
    # default expiry too): at equal timeouts a request sent on a connection the server was closing failed
    # with a ReadError 13 minutes into a run.
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(req: Request) -> None:
            await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
            now = time.perf_counter() - t0
            target = policy.route(req, now, view)  # type: ignore[attr-defined]
            if target is None:
                if refused is not None:
                    refused.append(req.rid)
                return
            counted = getattr(policy, "counted_prompt", None)  # what its gateway counts as pending
            pending = counted(req) if counted is not None else req.prompt_tokens
            cached = req.prompt_tokens - pending  # what its gateway expects the box to hold
            view.start(target, pending, cached)
            model = CLOUD_MODEL.name if target == CLOUD else "smollm2"
            held = [(pending, cached)]
            deadline = getattr(policy, "deadline_ms", None)  # what its gateway tells the engine (EDF)

            def prefilled() -> None:  # once: at the first token, or at the end
                if held:
                    view.first_token(target, *held.pop())

            try:
                messages = messages_of(req, by_rid, run, answers)
                if answered is not None and req.follows in answers:
                    answered.append(req.rid)
                ttft, total, p_tok, o_tok, text = await _send(
                    client, urls[target], model, messages, req, prefilled, deadline(req) if deadline else None
                )
                answers[req.rid] = text
            finally:
                prefilled()
                view.end(target, req.prompt_tokens)
            measured = dataclasses.replace(req, prompt_tokens=p_tok or req.prompt_tokens, output_tokens=o_tok)
            job = Job(measured, target, now, ttft_s=ttft, e2e_s=total)
            job.cost_usd = CLOUD_MODEL.cost_usd(p_tok, o_tok) if target == CLOUD else Decimal(0)
            jobs.append(job)
            policy.observe(job)  # type: ignore[attr-defined]

        await asyncio.gather(*(one(r) for r in trace))
    return jobs


REPLICAS_ONLY = "switchboard, replicas only"


def _replicas_only() -> Switchboard:
    """Switchboard with the cloud out of reach: prefix affinity and SLO placement over the replicas alone."""
    return Switchboard(name=REPLICAS_ONLY, use_cloud=False)


class RoundRobinReplicas:
    """Round-robin over the engine replicas for everything (the affinity baseline)."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, req: Request, now: float, view: LiveView) -> str | None:
        names = list(view.boxes)
        self._next += 1
        return names[self._next % len(names)]

    def observe(self, job: Job) -> None:
        return None


POLICIES: dict[str, Callable[[], Switchboard | RoundRobinReplicas]] = {
    "switchboard": Switchboard,
    "replicas-only": _replicas_only,
    "round-robin": RoundRobinReplicas,
}


@contextmanager
def rig(tmp: Path) -> Iterator[dict[str, str]]:
    procs = []
    try:
        fake_port = free_port()
        procs.append(
            _spawn(
                [sys.executable, "-m", "tests.support.fake_provider", "--port", str(fake_port)],
                tmp / "fake.log",
            )
        )
        fake = f"http://127.0.0.1:{fake_port}"
        _wait_http(fake + "/v1/models", procs[-1], tmp / "fake.log")
        knobs = {
            "ttft_ms": CLOUD_MODEL.ttft_median_ms,
            "tokens_per_s": CLOUD_MODEL.decode_tok_s,
            "n_tokens": 512,
        }
        httpx.post(fake + "/_control", json={"model": CLOUD_MODEL.name, **knobs}).raise_for_status()
        urls = {CLOUD: fake + "/v1/chat/completions"}
        for i in range(REPLICAS):
            port = free_port()
            log = tmp / f"engine-{i}.log"
            procs.append(_spawn(engine_cmd(port), log))
            urls[f"engine-{i}"] = f"http://127.0.0.1:{port}/v1/chat/completions"
        for i, proc in enumerate(procs[1:]):
            _wait_http(
                urls[f"engine-{i}"].replace("/v1/chat/completions", "/health"),
                proc,
                tmp / f"engine-{i}.log",
                300,
            )
        yield urls
    finally:
        stop_all(procs)


def live_trace(minutes: float, load_boxes: float, seed: int, curve: StepModel) -> list[Request]:
    """`bursty-agents` at `load_boxes` boxes of mean load, short outputs, no edge-floor requests."""
    trace = make_trace("bursty-agents", curve, load_boxes=load_boxes, minutes=minutes, seed=seed)
    kept = [r for r in trace if r.floor.rank > 0]
    return [dataclasses.replace(r, output_tokens=min(r.output_tokens, MAX_OUTPUT)) for r in kept]


def prefix_counters(urls: Mapping[str, str]) -> tuple[float, float]:
    """(prompt tokens, of them served from the prefix cache) so far, summed over the engine replicas'
    /metrics (the engine's own count: `prefix_hit_tokens`)."""
    prompt = hit = 0.0
    for name, url in urls.items():
        if name == CLOUD:
            continue
        text = httpx.get(url.replace("/v1/chat/completions", "/metrics"), timeout=30).text
        for line in text.splitlines():
            if line.startswith("switchboard_engine_prompt_tokens_total "):
                prompt += float(line.split()[1])
            elif line.startswith("switchboard_engine_prefix_hit_tokens_total "):
                hit += float(line.split()[1])
    return prompt, hit


def simulate_measured(
    jobs: list[Job],
    policy: object,
    seed: int,
    curve: StepModel,
    system_tokens: Mapping[str, int],
    shared_cores: float | None = None,
    contended: StepModel | None = None,
) -> list[Job]:
    """The simulator on the replayed requests with their measured token counts (an agent turn's shared
    system prompt as the engine's tokenizer counts it), same fleet shape."""
    fleet = make_fleet(
        curve, REPLICAS, "live", dataclasses.replace(CLOUD_MODEL, ttft_sigma=0, decode_sigma=0)
    )
    fleet = dataclasses.replace(fleet, boxes=fleet.owned)
    measured = [
        dataclasses.replace(j.req, prefix_tokens=system_tokens.get(j.req.prefix_key, j.req.prefix_tokens))
        for j in jobs
    ]
    trace = sorted(measured, key=lambda r: r.arrival_s)
    sim = Simulation(fleet, seed, shared_cores=shared_cores, contended=contended)
    return sim.run(trace, policy).jobs  # type: ignore[arg-type]


def _stats(jobs: list[Job], prefix_hit: float | None = None) -> dict[str, float]:
    """`prefix_hit`: the share of prompt tokens on the replicas served from their prefix caches (live: the
    engines' counters; simulated, None: the jobs' cached tokens)."""
    agents = [j.ttft_s * 1000 for j in jobs if j.req.session >= 0]
    on_boxes = [j for j in jobs if j.target != CLOUD]
    if prefix_hit is None:
        prompt = sum(j.req.prompt_tokens for j in on_boxes)
        prefix_hit = sum(j.cached_tokens for j in on_boxes) / prompt if prompt else 0.0
    return {
        "prefix_hit": prefix_hit,
        "n": len(jobs),
        "ttft_p50": percentile([j.ttft_s * 1000 for j in jobs], 50),
        "ttft_p95": percentile([j.ttft_s * 1000 for j in jobs], 95),
        "e2e_p95": percentile([j.e2e_s * 1000 for j in jobs], 95),
        "agent_ttft_p50": percentile(agents, 50),
        "cloud_usd": float(sum((j.cost_usd for j in jobs), Decimal(0))),
        "cloud_n": sum(1 for j in jobs if j.target == CLOUD),
    }


def _row(label: str, live: dict[str, float], sim: dict[str, float], refused: int = 0) -> list[str]:
    def cell(key: str, fmt: str) -> str:
        a, b = live[key], sim[key]
        diff = f"{100 * (b - a) / a:+.0f}%" if a else "n/a"
        return f"{a:{fmt}} / {b:{fmt}} ({diff})"

    lost = f" (+{refused} refused)" if refused else ""
    return [
        f"| {label} | {live['n']:.0f}{lost} | {cell('ttft_p50', '.0f')} | {cell('ttft_p95', '.0f')} | "
        f"{cell('e2e_p95', '.0f')} | {cell('agent_ttft_p50', '.0f')} | {cell('cloud_usd', '.5f')} | "
        f"{live['cloud_n']:.0f} / {sim['cloud_n']:.0f} | {live['prefix_hit']:.0%} / {sim['prefix_hit']:.0%} |"
    ]


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def measured_here() -> tuple[StepModel, StepModel]:
    """This machine's curves, measured now: one engine alone and all the replicas busy at once."""
    with tempfile.TemporaryDirectory(prefix="sb-eval-curves-") as tmp:
        alone, busy = Path(tmp) / "alone.json", Path(tmp) / "busy.json"
        with contextlib.redirect_stdout(sys.stderr):  # calibrate prints each curve; the report stays clean
            calibrate.main(["--engines", "1", "--out", str(alone)])
            calibrate.main(["--engines", str(REPLICAS), "--out", str(busy)])
        return load_curve(alone), load_curve(busy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2)
    parser.add_argument("--load-boxes", type=float, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--curve", type=Path, default=None,
        help="the step-time curve of one engine alone (`calibrate.py --engines 1`); default: measure this "
        "machine's, and the contended one, before the replay",
    )  # fmt: skip
    parser.add_argument(
        "--shared-cores", type=float, default=None,
        help="simulate the replicas as one-thread processes sharing this many cores (give it a curve of one "
        "engine alone, `calibrate.py --engines 1`); default: each replica steps at the curve's rate",
    )  # fmt: skip
    parser.add_argument(
        "--contended-curve", type=Path, default=None,
        help="with --shared-cores: the curve of all replicas busy at once (`calibrate.py --engines 3`), "
        "which the simulated replicas step at while all are busy, instead of busy / cores slower",
    )  # fmt: skip
    parser.add_argument(
        "--policies", default=",".join(POLICIES),
        help=f"which to replay, comma-separated, of {', '.join(POLICIES)} (affinity needs the last two)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not chosen or any(p not in POLICIES for p in chosen):
        parser.error(f"--policies: expected some of {', '.join(POLICIES)}, got {args.policies!r}")
    if args.contended_curve and not args.shared_cores:
        parser.error("--contended-curve needs --shared-cores (the cores the replicas share)")
    contended: StepModel | None
    if args.curve is None:
        if args.contended_curve:
            parser.error("--contended-curve needs --curve (without both, both are measured here)")
        curve, contended = measured_here()
        args.shared_cores = args.shared_cores or os.cpu_count() or 1
    else:
        curve = load_curve(args.curve)
        contended = load_curve(args.contended_curve) if args.contended_curve else None
    trace = live_trace(args.minutes, args.load_boxes, args.seed, curve)
    load = [round(os.getloadavg()[0], 2)]
    system_tokens = shared_system_tokens()
    fleet = make_fleet(curve, REPLICAS, "live")
    rows: list[str] = []
    results = {}
    resent: dict[str, int] = {}
    refused: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="sb-eval-live-") as tmp, rig(Path(tmp)) as urls:
        for run, make in enumerate((POLICIES[p] for p in chosen), 1):
            policy = make()
            view = LiveView(dataclasses.replace(fleet, boxes=fleet.owned))
            before = prefix_counters(urls)
            answered: list[int] = []
            lost: list[int] = []
            jobs = asyncio.run(replay(trace, policy, view, urls, run, answered, lost))
            resent[policy.name], refused[policy.name] = len(answered), len(lost)
            load.append(round(os.getloadavg()[0], 2))
            after = prefix_counters(urls)
            hit = (after[1] - before[1]) / (after[0] - before[0]) if after[0] > before[0] else 0.0
            simulated = simulate_measured(
                jobs, make(), args.seed, curve, system_tokens, args.shared_cores, contended
            )
            results[policy.name] = (_stats(jobs, hit), _stats(simulated))
    for label, (live, sim) in results.items():
        rows += _row(label, live, sim, refused[label])
    followups = sum(1 for r in trace if r.follows >= 0)
    affinity = "- Prefix affinity: not measured (it compares `replicas-only` with `round-robin`)."
    if REPLICAS_ONLY in results and "round-robin" in results:
        sb, rr = results[REPLICAS_ONLY][0], results["round-robin"][0]
        speedup = rr["agent_ttft_p50"] / sb["agent_ttft_p50"] if sb["agent_ttft_p50"] else float("nan")
        affinity = (
            f"- Prefix affinity (live): agent-turn p50 TTFT round-robin {rr['agent_ttft_p50']:.0f} ms vs "
            f"`{REPLICAS_ONLY}` {sb['agent_ttft_p50']:.0f} ms: {speedup:.2f}x (goal >= 2x): "
            f"{'met' if speedup >= 2 else '**not met**'}. Both place every request on the 3 replicas (the "
            "cloud reads as unhealthy to that Switchboard run), so the difference is placement, not overflow."
        )
    picked = f" --policies {','.join(chosen)}" if chosen != list(POLICIES) else ""
    info = machine_info()
    out = f" --out {args.out}" if args.out else ""
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']}, commit {info['commit']}; 1-minute load "
        f"average {load} (start, after each replay; other helpers share this machine).",
        "",
        f"Command: `python -m bench.routing_eval.live --minutes {args.minutes:g} "
        f"--load-boxes {args.load_boxes:g} --seed {args.seed}"
        f"{f' --curve {_rel(args.curve)}' if args.curve else ''}"
        f"{f' --shared-cores {args.shared_cores:g}' if args.shared_cores else ''}"
        f"{f' --contended-curve {_rel(args.contended_curve)}' if args.contended_curve else ''}"
        f"{picked}{out}`. Curve{'' if args.curve else 's, measured here before the replay'}: "
        f"{curve.source}{f'; all {REPLICAS} busy: {contended.source}' if contended else ''}. "
        f"{len(trace)} requests of "
        f"`bursty-agents` (outputs capped at {MAX_OUTPUT} tokens, edge-floor requests left out), open loop; "
        f"{REPLICAS} engine replicas "
        f"(`{' '.join(engine_cmd(0)[3:])}`) and the cloud fake (TTFT {CLOUD_MODEL.ttft_median_ms:.0f} ms, "
        f"{CLOUD_MODEL.decode_tok_s:.0f} tok/s). Cells: live / simulated (simulated vs live).",
        "",
        "| policy | requests | TTFT p50 ms | TTFT p95 ms | e2e p95 ms | agent TTFT p50 ms | cloud USD "
        "| cloud requests live / sim | prefix hit live / sim |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        affinity,
        f"- Agent turns that follow an earlier turn: {followups}; of them, sent back the real answer of that "
        f"turn (the rest a stand-in: it was still running): "
        + ", ".join(f"{name} {n}" for name, n in resent.items())
        + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from bench.routing import update_section

        update_section(
            args.out,
            "bench/routing_eval_live",
            "Routing evaluation, live check (`bench/routing_eval.live`)",
            text,
        )


if __name__ == "__main__":
    main()
