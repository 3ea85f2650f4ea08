"""Batch inference on the bundled engine: `/v1/batches` throughput, and what a running batch does to
interactive time to first token.

One `switchboard engine serve` (SmolLM2, defaults but `--threads` and, with `--batch-rows`,
`--batch-rows-beside-interactive`) behind one `switchboard serve` (SQLite, cache off, the engine's /metrics
polled for placement). Phases, all through the gateway:
1. `--items` chat requests (max_tokens 64, temperature 0) sent interactively at concurrency 32: the engine's
   full throughput C (completion tok/s).
2. The same requests as one batch (Files + Batches API, official `openai` SDK): batch tok/s, create to
   completed.
3. An interactive stream (`--rate` requests/s, Poisson arrivals, streamed, max_tokens 64) for `--duration-s`
   without a batch: TTFT p50/p95 and the engine's tok/s I spent on it.
4. The same stream (same arrival times) while a batch runs: TTFT p50/p95, and the batch's completion tok/s B
   over the window (the gateway's `switchboard_capacity_tokens_total{priority="batch"}`). The batch is then
   cancelled. Spare throughput = C - I; the batch used B / (C - I) of it.
Goal (issue 14): p95 TTFT with the batch within 1.2x of without, while B >= 0.7 (C - I).
Run: python -m bench.batch [--items 1000] [--duration-s 60] [--rate 2] [--threads 2] [--batch-rows N]
[--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.soak_rig import _spawn, _wait_http, free_port

MODEL = "smollm2"
TEAM = "bench"
TOPICS = (
    "a lighthouse keeper", "a lost umbrella", "the first snow", "a robot gardener", "an old map",
    "a night train", "a talking cat", "the deep sea", "a mountain village", "a broken clock",
)  # fmt: skip


def body(i: int, *, stream: bool = False) -> dict[str, Any]:
    topic = TOPICS[i % len(TOPICS)]
    text = f"Write a long, detailed story about {topic}. Story number {i}."
    out: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 64,
        "temperature": 0,
    }
    if stream:
        out |= {"stream": True, "stream_options": {"include_usage": True}}
    return out


@dataclass
class Rig:
    tmp: Path
    url: str = ""
    key: str = ""
    procs: list[Any] = field(default_factory=list)


def _gateway_config(rig: Rig, port: int, engine_url: str) -> Path:
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
metrics_public = true
request_timeout_s = 600.0
max_connections_per_client = 1024

[database]
url = "sqlite:///{rig.tmp / "ledger.db"}"
spill_path = "{rig.tmp / "spill.jsonl"}"

[files]
local_dir = "{rig.tmp / "files"}"

[cache]
enabled = false  # identical greedy requests would be answered from it

[batch]
concurrency = 32
claim_size = 32
poll_s = 0.2

[routing]
metrics_poll_s = 0.5

[backends.engine]
kind = "openai"
base_url = "{engine_url}/v1"
metrics_url = "{engine_url}/metrics"
timeout_s = 900.0

[models.{MODEL}]
backend = "engine"

[teams.{TEAM}]
models = ["*"]
"""
    path = rig.tmp / "gateway.toml"
    path.write_text(text)
    return path


async def start(rig: Rig, threads: int, batch_rows: int | None) -> None:
    from gateway.store import db, keys

    engine_port, port = free_port(), free_port()
    engine_cmd = [sys.executable, "-m", "gateway.cli", "engine", "serve", "--port", str(engine_port)]
    engine_cmd += ["--threads", str(threads)]
    if batch_rows is not None:
        engine_cmd += ["--batch-rows-beside-interactive", str(batch_rows)]
    rig.procs.append(_spawn(engine_cmd, rig.tmp / "engine.log"))
    engine_url = f"http://127.0.0.1:{engine_port}"
    await _wait_http(engine_url + "/health", rig.procs[-1], rig.tmp / "engine.log", timeout_s=600)
    url = f"sqlite:///{rig.tmp / 'ledger.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    try:
        keys.upsert_teams(engine, {TEAM: ["*"]})
        rig.key = keys.create_key(engine, TEAM, name="bench", models=None, expires_at=None).plaintext
    finally:
        engine.dispose()
    config = _gateway_config(rig, port, engine_url)
    serve = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    rig.procs.append(_spawn(serve, rig.tmp / "gw.log"))
    rig.url = f"http://127.0.0.1:{port}"
    await _wait_http(rig.url + "/healthz", rig.procs[-1], rig.tmp / "gw.log")


def stop(rig: Rig) -> None:
    for proc in reversed(rig.procs):
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a bench tears down whatever state its processes are in
            proc.kill()
            proc.wait()


# ---- phases ----------------------------------------------------------------------------------------------


async def interactive_throughput(client: httpx.AsyncClient, n: int, concurrency: int) -> tuple[int, float]:
    """Completion tokens and seconds for `n` requests sent `concurrency` at a time."""
    todo = iter(range(n))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for i in todo:
            reply = await client.post("/v1/chat/completions", json=body(i))
            reply.raise_for_status()
            tokens += reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens, time.perf_counter() - started


async def submit_batch(sdk: Any, n: int, first: int = 0) -> Any:
    lines = [
        {"custom_id": f"item-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i)}
        for i in range(first, first + n)
    ]
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    uploaded = await sdk.files.create(file=("batch.jsonl", data), purpose="batch")
    return await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


async def batch_throughput(sdk: Any, n: int) -> tuple[int, float, int]:
    """Completion tokens, seconds from create to completed, and failed items of one batch of `n`."""
    started = time.perf_counter()
    batch = await submit_batch(sdk, n)
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        await asyncio.sleep(0.5)
        batch = await sdk.batches.retrieve(batch.id)
    elapsed = time.perf_counter() - started
    if batch.status != "completed" or batch.output_file_id is None:
        raise RuntimeError(f"batch ended {batch.status}: {batch.errors}")
    content = (await sdk.files.content(batch.output_file_id)).content
    outputs = [orjson.loads(x) for x in content.splitlines() if x.strip()]
    tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs if o["response"])
    return tokens, elapsed, batch.request_counts.failed


def arrivals(rate: float, duration_s: float, seed: int = 11) -> list[float]:
    rng, at, out = random.Random(seed), 0.0, []
    while True:
        at += rng.expovariate(rate)
        if at >= duration_s:
            return out
        out.append(at)


async def one_stream(client: httpx.AsyncClient, i: int) -> tuple[float, int]:
    """(TTFT ms to the first content chunk, completion tokens) of one streamed request."""
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body(10_000 + i, stream=True)) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = orjson.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in event.get("choices", ())):
                ttft = (time.perf_counter() - started) * 1000
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    assert ttft is not None, "a stream without content"
    return ttft, tokens


async def stream_phase(client: httpx.AsyncClient, times: Sequence[float]) -> tuple[list[float], int, float]:
    """TTFTs, completion tokens and wall seconds of streams started at `times` (s from now)."""
    started = time.perf_counter()

    async def at(i: int, t: float) -> tuple[float, int]:
        await asyncio.sleep(max(0.0, started + t - time.perf_counter()))
        return await one_stream(client, i)

    done = await asyncio.gather(*(at(i, t) for i, t in enumerate(times)))
    return [d[0] for d in done], sum(d[1] for d in done), time.perf_counter() - started


async def batch_tokens(client: httpx.AsyncClient) -> float:
    """Completion tokens batch items have been served so far (the gateway's capacity counter)."""
    text = (await client.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        wanted = 'priority="batch"' in line and 'kind="completion"' in line
        if line.startswith("switchboard_capacity_tokens_total{") and wanted:
            total += float(line.rsplit(" ", 1)[1])
    return total


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- the run -----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    import openai

    await start(rig, args.threads, args.batch_rows)
    headers = {"authorization": f"Bearer {rig.key}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=rig.url, headers=headers, timeout=900, limits=limits) as client:
        sdk = openai.AsyncOpenAI(base_url=rig.url + "/v1", api_key=rig.key, max_retries=0, timeout=900)
        await interactive_throughput(client, 32, 32)  # warm-up: every batch size the engine will meet
        r: dict[str, Any] = {}
        log("interactive c32 ...")
        r["c32_tokens"], r["c32_s"] = await interactive_throughput(client, args.items, 32)
        log(f"  {r['c32_tokens'] / r['c32_s']:.1f} tok/s; batch ...")
        r["batch_tokens"], r["batch_s"], r["batch_failed"] = await batch_throughput(sdk, args.items)
        log(f"  {r['batch_tokens'] / r['batch_s']:.1f} tok/s; stream alone ...")
        times = arrivals(args.rate, args.duration_s)
        r["alone_ttft"], r["alone_tokens"], r["alone_s"] = await stream_phase(client, times)
        capacity = r["c32_tokens"] / r["c32_s"]
        n = max(args.items, int(capacity * (args.duration_s + 60) / 64))  # outlasts the window
        batch = await submit_batch(sdk, n, first=args.items)
        while (await batch_tokens(client)) <= r["batch_tokens"]:  # until the batch's first item is served
            await asyncio.sleep(0.2)
        log("  stream beside a batch ...")
        before, t0 = await batch_tokens(client), time.perf_counter()
        r["beside_ttft"], r["beside_tokens"], r["beside_s"] = await stream_phase(client, times)
        r["batch_window_tokens"] = await batch_tokens(client) - before
        r["batch_window_s"] = time.perf_counter() - t0
        state = await sdk.batches.retrieve(batch.id)
        r["batch_still_running"] = state.status == "in_progress"
        await sdk.batches.cancel(batch.id)
        await sdk.close()
    return r


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(r: dict[str, Any], args: argparse.Namespace, load: tuple[float, float]) -> str:
    from bench.overhead import machine_info

    info = machine_info()
    c = r["c32_tokens"] / r["c32_s"]
    inter = r["alone_tokens"] / r["alone_s"]
    b = r["batch_window_tokens"] / r["batch_window_s"]
    spare = c - inter
    p95_alone, p95_beside = pct(r["alone_ttft"], 0.95), pct(r["beside_ttft"], 0.95)
    ratio, used = p95_beside / p95_alone, b / spare if spare > 0 else float("nan")
    met = ratio <= 1.2 and used >= 0.7
    cmd = "python -m bench.batch" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None
    )
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}; 1-minute load average {load[0]:.2f} at the start, "
        f"{load[1]:.2f} at the end (other work shares this machine when it is above 0). Command: `{cmd}`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| interactive, {args.items} requests at concurrency 32 (engine capacity C) | {c:.1f} tok/s "
        f"({r['c32_tokens']} tokens in {r['c32_s']:.1f} s) |",
        f"| the same {args.items} requests as one batch, create to completed | "
        f"{r['batch_tokens'] / r['batch_s']:.1f} tok/s ({r['batch_tokens']} tokens in {r['batch_s']:.1f} s, "
        f"{r['batch_failed']} failed); {r['batch_tokens'] / r['batch_s'] / c:.2f}x C |",
        f"| interactive stream alone ({args.rate}/s, {len(r['alone_ttft'])} streams): TTFT p50 / p95 | "
        f"{pct(r['alone_ttft'], 0.5):.0f} / {p95_alone:.0f} ms; it used I = {inter:.1f} tok/s |",
        f"| the same stream beside a running batch: TTFT p50 / p95 | {pct(r['beside_ttft'], 0.5):.0f} / "
        f"{p95_beside:.0f} ms ({ratio:.2f}x the p95 alone) |",
        f"| batch throughput beside the stream (B) | {b:.1f} tok/s = {used:.0%} of spare C - I = "
        f"{spare:.1f} tok/s{'' if r['batch_still_running'] else ' (the batch ended inside the window)'} |",
        f"| goal: p95 within 1.2x and B >= 70% of spare | {'met' if met else 'missed'} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000, help="requests in the throughput phases")
    parser.add_argument("--duration-s", type=float, default=60.0, help="length of each TTFT phase")
    parser.add_argument("--rate", type=float, default=2.0, help="interactive streams per second")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="engine compute threads")
    parser.add_argument(
        "--batch-rows",
        type=int,
        help="the engine's --batch-rows-beside-interactive (batch rows per step beside interactive work)",
    )
    parser.add_argument("--out", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` then stops the engine and gateway
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        rig = Rig(Path(tmp))
        try:
            result = asyncio.run(run(args, rig))
        finally:
            stop(rig)
    text = report(result, args, (load_start, os.getloadavg()[0]))
    print(text)
    if args.out is not None:
        from bench.routing import update_section

        update_section(args.out, "bench/batch", "Batch inference (`bench/batch`)", text)


if __name__ == "__main__":
    main()
