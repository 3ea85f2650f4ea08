"""Measure the bundled engine's step-time model on this machine: the curve the simulator's boxes run on.

One `switchboard engine serve --threads 1` process (SmolLM2-135M, float32 compute over int4 weights: what
`--dtype auto --quant auto` picked on both CPUs measured for issue 18, AVX-512 and AVX2 forced) is driven over
its OpenAI API with streams: decode at 1, 2, 4 and 8 concurrent streams, and long prompts alone (prefill). The
fit is the engine scheduler's step: `step_ms = a + b * decoding + c * prefill tokens`, so one stream decodes
at 1000 / (a + b) tok/s and n streams at n * 1000 / (a + b n); each decoding stream adds d per token of its
context (one stream's step at ~20 and ~1,200 context tokens), and each prompt token e per token before it
(the time to the first token of prompts of ~50, ~400, ~800 and ~1,200 tokens: c x tokens + e x tokens^2 / 2,
least squares).
Writes `bench/data/routing_eval_curve.json`, and prints the curve as a gateway config's `capacity` line.
Run: `python -m bench.routing_eval.calibrate [--engines N] [--out PATH]` (about 1 min). `--engines N` measures
N engines at once, each under the others' load (the median of each figure): the conditions of a live replay on
N replicas. The engines run with `--no-prefix-cache`: the prompts share leading words, and the curve is the
cost of computing tokens (the simulator models what the prefix cache saves on top of it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.overhead import _spawn, _wait_http, free_port, machine_info, stop_all
from bench.routing_eval.fleet import StepModel, load_curve
from bench.routing_eval.switchboard import capacity_of

CURVE_PATH = Path(__file__).resolve().parents[1] / "data" / "routing_eval_curve.json"
ENGINE_FLAGS = ("--threads", "1", "--dtype", "float32", "--quant", "int4", "--max-batch", "8")
KV_BLOCK_TOKENS = 16  # the engine's default --block-size
LONG_CONTEXT_WORDS = 1200  # about as many tokens (the filler is ~1 a word): an agent turn's conversation
# prompts timed alone for c and e: four, so one noisy short prompt (three engines time-slicing two cores)
# does not bend the curvature to nothing, as three points through it did (docs/BENCHMARKS.md, 2026-12-07)
PREFILL_WORDS = (50, 400, 800, 1200)
_PROSE = "the quick review of each service shows what the team changed and why it matters now"
_WORDS = tuple(_PROSE.split())


def engine_cmd(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gateway.cli",
        "engine",
        "serve",
        "--port",
        str(port),
        *ENGINE_FLAGS,
        *extra,
    ]


def filler(words: int, salt: int = 0) -> str:
    return " ".join(_WORDS[(i * 7 + salt) % len(_WORDS)] for i in range(words))


async def stream_once(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, total s, completion tokens) of one streamed chat request."""
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif not first and chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter() - started
    return first, time.perf_counter() - started, tokens


async def measure(url: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await stream_once(client, filler(20), 8)  # warm-up
        decode: dict[int, float] = {}
        for n in (1, 2, 4, 8):
            results = await asyncio.gather(*(stream_once(client, filler(20, i), 64) for i in range(n)))
            # decode rate per stream after its first token, aggregated over the streams
            rates = [(tok - 1) / (total - ttft) for ttft, total, tok in results if tok > 1]
            decode[n] = statistics.median(rates) * n
        # One stream at a short and a long context: what each context token adds to a decode step.
        context: dict[int, float] = {}
        for words in (20, LONG_CONTEXT_WORDS):
            steps = []
            for s in range(3):
                ttft, total, tok = await stream_once(client, filler(words, s), 64)
                steps.append((total - ttft) * 1000 / (tok - 1))
            context[words] = statistics.median(steps)
        prefill: dict[int, float] = {}
        for words in PREFILL_WORDS:
            ttfts = [(await stream_once(client, filler(words, s), 1))[1] for s in range(3)]
            prefill[words] = statistics.median(ttfts)
        counted = (await client.post("/tokenize", json={"prompt": filler(800)})).json()["count"]
        metrics = (await client.get("/metrics")).text
        kv_tokens = KV_BLOCK_TOKENS * _gauge(metrics, "kv_blocks_total")
    return {
        "max_prefill_tokens": _gauge(metrics, "prefill_tokens_per_step"),
        "short_prefill_tokens": _gauge(metrics, "short_prefill_tokens"),
        "decode_tok_s": decode,
        "decode_step_ms_by_context_words": context,
        "prefill_ttft_s_by_words": prefill,
        "tokens_per_word": counted / 800,
        "kv_tokens": kv_tokens,
    }


def _gauge(text: str, name: str) -> int:
    """One `switchboard_engine_<name>` gauge from the engine's /metrics."""
    for line in text.splitlines():
        if line.startswith(f"switchboard_engine_{name} "):
            return int(float(line.split()[1]))
    raise ValueError(f"the engine's /metrics has no switchboard_engine_{name}")


def fit(
    decode: dict[int, float],
    prefill: dict[int, float],
    tokens_per_word: float,
    context: dict[int, float] | None = None,
) -> dict[str, float]:
    """Least squares of step ms = a + b n over the decode points; c from the prefill slope, or with three
    or more prefill points c and e (ms per token before a prompt token) from TTFT = k + c T + e T^2 / 2,
    least squares through them (where noise bends it down, e = 0 and c the least-squares slope); d (ms per
    context token of a decoding stream) from one stream's step at a short and a long context."""
    ns = list(decode)
    step_ms = [1000 * n / decode[n] for n in ns]
    b = _slope(ns, step_ms)
    a = statistics.fmean(step_ms) - b * statistics.fmean(ns)
    words = sorted(prefill)
    c = (prefill[words[-1]] - prefill[words[0]]) * 1000 / ((words[-1] - words[0]) * tokens_per_word)
    e = None
    if len(words) >= 3:
        ts, ys = [w * tokens_per_word for w in words], [1000 * prefill[w] for w in words]
        c, e = _quadratic(ts, ys)
        if e < 0:
            c, e = _slope(ts, ys), 0.0
    out = {
        "step_base_ms": round(a, 3),
        "step_ms_per_stream": round(b, 3),
        "prefill_ms_per_token": round(c, 4),
    }
    if e is not None:
        out["prefill_ms_per_context_token"] = round(e, 7)
    if context:
        short, long = sorted(context)
        d = (context[long] - context[short]) / ((long - short) * tokens_per_word)
        out["decode_ms_per_context_token"] = round(max(0.0, d), 6)
    return out


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ys on xs."""
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - x_mean) ** 2 for x in xs
    )


def _quadratic(ts: list[float], ys: list[float]) -> tuple[float, float]:
    """(c, e) of the least-squares y = k + c t + e t^2 / 2: the normal equations, by Cramer's rule."""
    cols = [[1.0] * len(ts), ts, [t * t / 2 for t in ts]]
    gram = [[sum(u * v for u, v in zip(a, b, strict=True)) for b in cols] for a in cols]
    rhs = [sum(u * y for u, y in zip(a, ys, strict=True)) for a in cols]

    def det(m: list[list[float]]) -> float:
        return (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )

    whole = det(gram)
    for_c, for_e = ([row[:j] + [rhs[i]] + row[j + 1 :] for i, row in enumerate(gram)] for j in (1, 2))
    return det(for_c) / whole, det(for_e) / whole


async def measure_all(urls: list[str]) -> dict[str, object]:
    """`measure` on every engine at once (each busy as the others are), the median of each figure."""
    raws = await asyncio.gather(*(measure(url) for url in urls))

    def median_of(key: str) -> dict[int, float]:
        tables: list[dict[int, float]] = [raw[key] for raw in raws]  # type: ignore[misc]
        return {k: statistics.median(t[k] for t in tables) for k in tables[0]}

    per_word = statistics.median(float(raw["tokens_per_word"]) for raw in raws)  # type: ignore[arg-type]
    return {
        "decode_tok_s": median_of("decode_tok_s"),
        "decode_step_ms_by_context_words": median_of("decode_step_ms_by_context_words"),
        "prefill_ttft_s_by_words": median_of("prefill_ttft_s_by_words"),
        "tokens_per_word": per_word,
        "kv_tokens": raws[0]["kv_tokens"],
        "max_prefill_tokens": raws[0]["max_prefill_tokens"],
        "short_prefill_tokens": raws[0]["short_prefill_tokens"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CURVE_PATH)
    parser.add_argument(
        "--engines", type=int, default=1,
        help="engines measured at once, each with the same load (the live replay runs 3)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sb-calib-") as tmp:
        procs, urls = [], []
        try:
            for i in range(args.engines):
                port = free_port()
                log = Path(tmp) / f"engine-{i}.log"
                procs.append(_spawn(engine_cmd(port, "--no-prefix-cache"), log))
                urls.append(f"http://127.0.0.1:{port}")
                _wait_http(f"{urls[-1]}/health", procs[-1], log, timeout_s=240)
            raw = asyncio.run(measure_all(urls))
        finally:
            stop_all(procs)
    per_word = float(raw["tokens_per_word"])  # type: ignore[arg-type]
    decode = raw["decode_tok_s"]
    prefill = raw["prefill_ttft_s_by_words"]
    context = raw["decode_step_ms_by_context_words"]
    assert isinstance(decode, dict) and isinstance(prefill, dict) and isinstance(context, dict)
    info = machine_info()
    result = {
        "source": "python -m bench.routing_eval.calibrate",
        "engine": "switchboard engine serve "
        + " ".join((*ENGINE_FLAGS, "--no-prefix-cache"))
        + (f", {args.engines} measured at once" if args.engines > 1 else ""),
        "measured": info["date"],
        "commit": info["commit"],
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "decode_tok_s": {str(k): round(v, 1) for k, v in decode.items()},
        "decode_step_ms_by_context_tokens": {
            str(round(w * per_word)): round(s, 2) for w, s in context.items()
        },
        "prefill_ttft_s_by_tokens": {str(round(w * per_word)): round(s, 3) for w, s in prefill.items()},
        "kv_tokens": raw["kv_tokens"],
        "max_prefill_tokens": raw["max_prefill_tokens"],
        "short_prefill_tokens": raw["short_prefill_tokens"],
        **fit(decode, prefill, per_word, context),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(
        f"\n# the gateway's [backends.X] for an engine run as measured:\n{config_line(load_curve(args.out))}"
    )


def config_line(model: StepModel) -> str:
    """The `capacity` line of a gateway config (`[backends.X]`) for an engine with this curve: what the
    simulator's `switchboard` policy gives routing (`capacity_of`), less the reserve for must-stay traffic,
    which is a fleet's choice."""
    cap = capacity_of(model)
    points = ", ".join(f"[{x:g}, {y:.1f}]" for x, y in cap.tokens_per_s)
    return (
        f"capacity = {{ tokens_per_s = [{points}], max_concurrency = {cap.max_concurrency}, "
        f"prefill_tokens_per_s = {cap.prefill_tokens_per_s:.1f}, "
        f"prefill_us_per_context_token = {cap.prefill_us_per_context_token:.3f}, "
        f"decode_us_per_context_token = {cap.decode_us_per_context_token:.3f}, "
        f"kv_cache_tokens = {cap.kv_cache_tokens}, prefill_chunk_tokens = {cap.prefill_chunk_tokens}, "
        f"short_prefill_tokens = {cap.short_prefill_tokens} }}"
    )


if __name__ == "__main__":
    main()
