"""A short question behind a long prompt: its TTFT with the engine's short-prompts-first rule and without.

One `switchboard engine serve --threads 1` (the routing evaluation's engine flags) per setting of
`--short-prefill-tokens` (128, the default, and 0: oldest first). Each round sends a long prompt (`--long`
tokens of filler, several `--max-prefill-tokens` chunks), then, `--delay` s later while it is still
prefilling, a short question (~30 tokens), both streaming; it records both TTFTs. Rounds use fresh filler so
nothing is served from the prefix cache. Prints the medians per setting and their ratio. Run:
`python -m bench.short_prefill [--long 1500] [--delay 0.5] [--rounds 5] [--out docs/BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.overhead import _spawn, _wait_http, free_port, machine_info, stop_all
from bench.routing_eval.calibrate import engine_cmd, filler

SETTINGS = (128, 0)


async def _ttft(client: httpx.AsyncClient, url: str, text: str) -> float:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                return time.perf_counter() - started
    return time.perf_counter() - started


async def _round(url: str, long_words: int, delay_s: float, salt: int) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        long = asyncio.create_task(_ttft(client, url, f"Summarise this log. {filler(long_words, salt)}"))
        await asyncio.sleep(delay_s)
        question = f"In one word, what colour is the sky on a clear day? Case {salt}."
        short = await _ttft(client, url, question)
        return await long, short


def measure(
    setting: int, long_words: int, delay_s: float, rounds: int, tmp: Path
) -> list[tuple[float, float]]:
    port = free_port()
    log = tmp / f"engine-{setting}.log"
    proc = _spawn(engine_cmd(port, "--short-prefill-tokens", str(setting)), log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log, 300)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        asyncio.run(_round(url, 50, 0.0, 10_000 + setting))  # warm the HTTP path once
        return [asyncio.run(_round(url, long_words, delay_s, 100 * setting + i)) for i in range(rounds)]
    finally:
        stop_all([proc])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=1500, help="words of filler in the long prompt (~tokens)")
    parser.add_argument(
        "--delay", type=float, default=0.5, help="seconds between the long prompt and the short"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="sb-short-prefill-") as tmp:
        for setting in SETTINGS:
            results[setting] = measure(setting, args.long, args.delay, args.rounds, Path(tmp))
    info = machine_info()
    rows = []
    for setting, pairs in results.items():
        longs, shorts = [p[0] * 1000 for p in pairs], [p[1] * 1000 for p in pairs]
        rows.append(
            f"| {setting} | {statistics.median(shorts):.0f} ({min(shorts):.0f}-{max(shorts):.0f}) | "
            f"{statistics.median(longs):.0f} ({min(longs):.0f}-{max(longs):.0f}) |"
        )
    short_first = statistics.median(p[1] for p in results[SETTINGS[0]])
    fifo = statistics.median(p[1] for p in results[SETTINGS[1]])
    out = f" --out {args.out}" if args.out else ""
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']}, commit {info['commit']}.",
        "",
        f"Command: `python -m bench.short_prefill --long {args.long} --delay {args.delay:g} "
        f"--rounds {args.rounds}{out}`. One engine "
        f"(`{' '.join(engine_cmd(0)[3:])} --short-prefill-tokens N`) "
        f"per setting; each round a ~{args.long}-token prompt, then {args.delay:g} s later a ~30-token "
        "question; medians (range) over the rounds.",
        "",
        "| --short-prefill-tokens | question TTFT ms | long prompt TTFT ms |",
        "|---:|---:|---:|",
        *rows,
        "",
        f"- The question's TTFT with short prompts first: {fifo / short_first:.1f}x sooner than oldest "
        "first.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from bench.routing import update_section

        update_section(args.out, "bench/short_prefill", "Short prompts first (`bench/short_prefill`)", text)


if __name__ == "__main__":
    main()
