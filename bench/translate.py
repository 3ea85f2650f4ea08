"""What each API's translation adds: the same question through chat completions, completions, Responses and
Anthropic Messages, on one gateway in front of the same fake upstream (0 ms answers, model `delay0`).

Sequential requests on one keep-alive connection, the endpoints interleaved request by request (so a drift of
the machine hits every endpoint alike): client-side latency to the last byte, JSON and streamed, and the
gateway's own `x-switchboard-overhead-ms` (time not spent awaiting the upstream) for JSON. Then each endpoint
under load (c=8), alternating endpoints per repeat, for req/s. Added = endpoint p50 - chat completions p50 in
the same run. Goal: translation adds under 0.2 ms p50. Every number printed is measured in this run.
Run: `python -m bench.translate [--requests 400] [--duration-s 5] [--repeats 3] [--out docs/BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from bench.overhead import ROOT, Rig, machine_info, rig

MARK_START = "<!-- bench/translate:start -->"
MARK_END = "<!-- bench/translate:end -->"
GOAL_ADDED_P50_MS = 0.2
MODEL = "delay0"
QUESTION = "Say hello."


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    path: str
    body: Callable[[bool], dict[str, object]]
    headers: dict[str, str] = field(default_factory=dict)


ENDPOINTS = (
    Endpoint(
        "chat completions",
        "/v1/chat/completions",
        lambda stream: {
            "model": MODEL,
            "messages": [{"role": "user", "content": QUESTION}],
            "stream": stream,
        },
    ),
    Endpoint(
        "completions",
        "/v1/completions",
        lambda stream: {"model": MODEL, "prompt": QUESTION, "max_tokens": 64, "stream": stream},
    ),
    Endpoint(
        "responses",
        "/v1/responses",
        lambda stream: {"model": MODEL, "input": QUESTION, "store": False, "stream": stream},
    ),
    Endpoint(
        "messages (Anthropic)",
        "/v1/messages",
        lambda stream: {
            "model": MODEL,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": QUESTION}],
            "stream": stream,
        },
        {"anthropic-version": "2023-06-01"},
    ),
)


@dataclass
class Samples:
    latency_ms: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def served(r: Rig) -> list[Endpoint]:
    """The endpoints this build answers (a 404 means the translator is not there)."""
    found = []
    with httpx.Client(base_url=r.this.url, timeout=10) as client:
        for ep in ENDPOINTS:
            reply = client.post(
                ep.path,
                content=orjson.dumps(ep.body(False)),
                headers={"authorization": f"Bearer {r.this.key}", **ep.headers},
            )
            if reply.status_code != 404:
                if reply.status_code != 200:
                    raise RuntimeError(f"{ep.path} answered {reply.status_code}: {reply.text[:300]}")
                found.append(ep)
    return found


def sequential(r: Rig, endpoints: list[Endpoint], n: int, *, stream: bool) -> dict[str, Samples]:
    out = {ep.name: Samples() for ep in endpoints}
    bodies = {ep.name: orjson.dumps(ep.body(stream)) for ep in endpoints}
    base = {"authorization": f"Bearer {r.this.key}", "content-type": "application/json"}
    with httpx.Client(base_url=r.this.url, timeout=10) as client:
        for i in range(n + 20):  # the first 20 rounds warm up
            order = endpoints[i % len(endpoints) :] + endpoints[: i % len(endpoints)]
            for ep in order:
                start = time.perf_counter()
                reply = client.post(ep.path, content=bodies[ep.name], headers={**base, **ep.headers})
                reply.read()
                took_ms = (time.perf_counter() - start) * 1000
                if reply.status_code != 200:
                    raise RuntimeError(f"{ep.path} answered {reply.status_code}")
                if i >= 20:
                    out[ep.name].latency_ms.append(took_ms)
                    out[ep.name].overhead_ms.append(float(reply.headers["x-switchboard-overhead-ms"]))
    return out


def under_load(r: Rig, endpoints: list[Endpoint], duration_s: float, repeats: int) -> dict[str, list[float]]:
    rps: dict[str, list[float]] = {ep.name: [] for ep in endpoints}
    for _ in range(repeats):
        for ep in endpoints:
            result = r.load(
                r.this.url + ep.path,
                orjson.dumps(ep.body(False)),
                {"authorization": f"Bearer {r.this.key}", "content-type": "application/json", **ep.headers},
                connections=8,
                duration_s=duration_s,
                script_dir=r.tmp,
                pin=r.pin_load,
            )
            if result.non2xx or result.errors:
                raise RuntimeError(f"{ep.path}: {result.non2xx} non-2xx, {result.errors} errors under load")
            rps[ep.name].append(result.rps)
    return rps


def render(
    endpoints: list[Endpoint],
    json_s: dict[str, Samples],
    stream_s: dict[str, Samples],
    rps: dict[str, list[float]],
    args: argparse.Namespace,
    generator: str,
) -> str:
    info = machine_info()
    chat = endpoints[0].name
    lines = [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {info['cpu']} ({info['nproc']} cores), "
        f"commit {info['commit']}: `python -m bench.translate --requests {args.requests} "
        f"--duration-s {args.duration_s:g} --repeats {args.repeats}`. One gateway, fake upstream "
        f"answering at once; {args.requests} sequential requests per endpoint and mode, interleaved; "
        f"load: {generator}, c=8, median of {args.repeats} repeats.",
        "",
        "| endpoint | JSON p50 / p99 ms | added p50 | gateway overhead p50 | added | streamed p50 / p99 ms "
        "| added p50 | req/s c=8 | vs chat |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_json = statistics.median(json_s[chat].latency_ms)
    base_over = statistics.median(json_s[chat].overhead_ms)
    base_stream = statistics.median(stream_s[chat].latency_ms)
    base_rps = statistics.median(rps[chat])
    worst: float | None = None
    for ep in endpoints:
        j, s = json_s[ep.name], stream_s[ep.name]
        jp50, sp50, op50 = (statistics.median(x) for x in (j.latency_ms, s.latency_ms, j.overhead_ms))
        med_rps = statistics.median(rps[ep.name])
        if ep.name != chat:
            worst = max(worst if worst is not None else -1e9, jp50 - base_json, sp50 - base_stream)
        lines.append(
            f"| {ep.name} | {jp50:.3f} / {_pct(j.latency_ms, 0.99):.3f} | {jp50 - base_json:+.3f} "
            f"| {op50:.3f} | {op50 - base_over:+.3f} | {sp50:.3f} / {_pct(s.latency_ms, 0.99):.3f} "
            f"| {sp50 - base_stream:+.3f} | {med_rps:,.0f} | {med_rps / base_rps:.2f}× |"
        )
    if worst is None:
        summary = "only chat completions answered: nothing to compare"
    else:
        verdict = "met" if worst < GOAL_ADDED_P50_MS else "not met"
        summary = f"largest added p50 (client-side, JSON or streamed): {worst:+.3f} ms: **{verdict}**"
    goal = f"- Goal: translation adds under {GOAL_ADDED_P50_MS} ms p50 against chat completions; "
    lines += ["", goal + summary + "."]
    return "\n".join(lines)


def update_doc(path: Path, section: str) -> None:
    block = f"{MARK_START}\n{section}\n{MARK_END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        title = "## What each API's translation adds (`bench/translate`)"
        text = text.rstrip("\n") + f"\n\n{title}\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="update this markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    with rig(pin=True, force_python=False, baseline_src=None, workers=1) as r:
        endpoints = served(r)
        json_s = sequential(r, endpoints, args.requests, stream=False)
        stream_s = sequential(r, endpoints, args.requests, stream=True)
        rps = under_load(r, endpoints, args.duration_s, args.repeats)
        section = render(endpoints, json_s, stream_s, rps, args, r.generator)
    print(section)
    if args.out is not None:
        update_doc(ROOT / args.out if not args.out.is_absolute() else args.out, section)


if __name__ == "__main__":
    main()
