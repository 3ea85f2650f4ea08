"""A short question behind a long prompt: its TTFT by the engine's prefill chunk size and short-prompts rule.

One `switchboard engine serve --threads 1` (the routing evaluation's engine flags) per setting: each
`--max-prefill-tokens` given (`default`: the engine's own) with each `--short-prefill-tokens` given (128,
the default: short prompts first; 0: oldest first). Each round sends a long prompt (`--long` tokens of
filler, several chunks), then, a delay later while it is still prefilling, a short question (~30 tokens),
both streaming; it records both TTFTs. The rounds cycle through the `--delay` list, so the question lands
at different points of a step. Rounds use fresh filler so nothing is served from the prefix cache. Prints
the medians per setting and their ratios. Run: `python -m bench.short_prefill [--long 1500]
[--delay 0.5] [--rounds 5] [--max-prefill-tokens default] [--short-prefill-tokens 128,0]
[--out docs/BENCHMARKS.md]`.
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

DEFAULT = "default"


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


async def _warm(url: str) -> None:
    """The HTTP path once, with a prompt no round's shares a block with."""
    async with httpx.AsyncClient(timeout=600) as client:
        await _ttft(client, url, "Say hello.")


def _flags(budget: str, short: int) -> list[str]:
    chunk = [] if budget == DEFAULT else ["--max-prefill-tokens", budget]
    return [*chunk, "--short-prefill-tokens", str(short)]


def measure(
    budget: str, short: int, long_words: int, delays: list[float], rounds: int, tmp: Path, salt: int
) -> list[tuple[float, float]]:
    port = free_port()
    log = tmp / f"engine-{budget}-{short}.log"
    proc = _spawn(engine_cmd(port, *_flags(budget, short)), log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log, 300)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        asyncio.run(_warm(url))
        pairs = []
        for i in range(rounds):
            pairs.append(asyncio.run(_round(url, long_words, delays[i % len(delays)], 100 * salt + i)))
        return pairs
    finally:
        stop_all([proc])


def _median_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=1500, help="words of filler in the long prompt (~tokens)")
    parser.add_argument(
        "--delay", default="0.5", help="seconds between the long prompt and the short (a comma list: cycled)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-prefill-tokens", default=DEFAULT, help="comma list; `default`: the engine's")
    parser.add_argument("--short-prefill-tokens", default="128,0", help="comma list")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 16:
        parser.error("--rounds must be 1-16: the filler has 16 distinct rotations, so more would repeat one")
    delays = [float(d) for d in args.delay.split(",")]
    budgets = args.max_prefill_tokens.split(",")
    shorts = [int(s) for s in args.short_prefill_tokens.split(",")]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="sb-short-prefill-") as tmp:
        for i, key in enumerate((b, s) for b in budgets for s in shorts):
            results[key] = measure(*key, args.long, delays, args.rounds, Path(tmp), i + 1)
    info = machine_info()
    rows = [
        f"| {b} | {s} | {_median_ms([p[1] for p in pairs])} | {_median_ms([p[0] for p in pairs])} |"
        for (b, s), pairs in results.items()
    ]
    question = {k: statistics.median(p[1] for p in pairs) for k, pairs in results.items()}
    long = {k: statistics.median(p[0] for p in pairs) for k, pairs in results.items()}
    notes = [
        f"- `--max-prefill-tokens {b}`: the question's TTFT with short prompts first "
        f"{question[(b, 0)] / question[(b, shorts[0])]:.1f}x sooner than oldest first."
        for b in budgets
        if shorts[0] and (b, 0) in question
    ]
    base = (budgets[0], shorts[0])
    notes += [
        f"- `--max-prefill-tokens {b}` against {base[0]} (short {shorts[0]}): question "
        f"{question[base] / question[(b, shorts[0])]:.1f}x sooner, long prompt "
        f"{100 * (long[(b, shorts[0])] / long[base] - 1):+.0f}%."
        for b in budgets[1:]
    ]
    out = f" --out {args.out}" if args.out else ""
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']}, commit {info['commit']}.",
        "",
        f"Command: `python -m bench.short_prefill --long {args.long} --delay {args.delay} "
        f"--rounds {args.rounds} --max-prefill-tokens {args.max_prefill_tokens} "
        f"--short-prefill-tokens {args.short_prefill_tokens}{out}`. One engine "
        f"(`{' '.join(engine_cmd(0)[3:])} [--max-prefill-tokens N] --short-prefill-tokens N`) per setting "
        f"(`default`: the engine's own, 256 on CPU); each round a ~{args.long}-token prompt, then "
        f"{args.delay} s later (rounds cycle through the list) a ~30-token question; medians (range) "
        "over the rounds.",
        "",
        "| --max-prefill-tokens | --short-prefill-tokens | question TTFT ms | long prompt TTFT ms |",
        "|---:|---:|---:|---:|",
        *rows,
        "",
        *notes,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from bench.routing import update_section

        update_section(args.out, "bench/short_prefill", "Short prompts first (`bench/short_prefill`)", text)


if __name__ == "__main__":
    main()
