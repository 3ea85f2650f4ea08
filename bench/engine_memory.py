"""Memory phase of bench/engine: peak and idle RSS of `engine serve` loading the GGUF, and llama-server's.

The engine starts as a user starts it (`--model` the bundled GGUF, `auto`, the default 512 MB KV budget),
so its load reads the GGUF tensor by tensor. Peak is the process's VmHWM once it is ready and has answered
one short request; idle is VmRSS a second later. The engine's log gives its final weights and KV bytes and
the KV cache's token capacity; llama-server then starts on the same GGUF with that context (`-c`, one slot)
and is read the same way. Goals (issue 18): peak <= 2x (weights + KV budget); idle <= 1.5x llama-server's.
Invariant: a figure that could not be read is None, never a guess, and its goal reads "not measured".
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

_MEMORY_LINE = re.compile(r"memory: weights ([\d.]+) MB \+ KV cache ([\d.]+) MB")
_KV_LINE = re.compile(r"KV cache: \d+ blocks of \d+ tokens \((\d+) tokens")
PEAK_GOAL = 2.0  # peak load RSS <= this x (final weights + KV budget)
IDLE_GOAL = 1.5  # idle RSS <= this x llama-server's at the same context
START_TIMEOUT_S = 900.0


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


@dataclass(frozen=True, slots=True)
class Memory:
    peak_mb: float | None  # VmHWM after ready and one request
    idle_mb: float | None  # VmRSS a second later
    weights_mb: float | None = None  # engine only: final weights, from its log
    kv_mb: float | None = None
    kv_tokens: int | None = None


def proc_memory_mb(pid: int) -> tuple[float | None, float | None]:
    """(VmHWM, VmRSS) of `pid` in MiB from /proc; None where it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

    def mib(name: str) -> float | None:
        value = fields.get(name, "").split()
        return int(value[0]) / 1024 if value else None  # kB

    return mib("VmHWM"), mib("VmRSS")


def read_after_one_request(url: str, pid: int) -> tuple[float | None, float | None]:
    """Peak and idle RSS once `url` has answered one short chat (both servers warm their paths then)."""
    from bench.engine import stream_chat

    async def one() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await stream_chat(client, url, [{"role": "user", "content": "Say hello."}], 8)

    asyncio.run(one())
    time.sleep(1.0)
    return proc_memory_mb(pid)


def engine_memory(log: Path, url: str, pid: int) -> Memory:
    peak, idle = read_after_one_request(url, pid)
    text = log.read_text(errors="replace")
    sizes, kv = _MEMORY_LINE.search(text), _KV_LINE.search(text)
    return Memory(
        peak,
        idle,
        weights_mb=float(sizes.group(1)) if sizes else None,
        kv_mb=float(sizes.group(2)) if sizes else None,
        kv_tokens=int(kv.group(1)) if kv else None,
    )


def llama_memory_cmd(cmd: list[str], tokens: int) -> list[str] | None:
    """The bench's llama-server command with one slot and a context of `tokens`; None for llama_cpp.server."""
    if "-c" not in cmd or "-np" not in cmd:
        return None
    out = list(cmd)
    out[out.index("-c") + 1] = str(tokens)
    out[out.index("-np") + 1] = "1"
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def budget_mb(mem: Memory | None) -> float | None:
    if mem is None or mem.weights_mb is None or mem.kv_mb is None:
        return None
    return mem.weights_mb + mem.kv_mb


def rows(eng: Memory | None, llama: Memory | None) -> list[str]:
    """The two table rows (the bench's columns: engine, transformers, ratio, llama.cpp, ratio)."""
    tokens = eng.kv_tokens if eng and eng.kv_tokens else "?"
    e_peak, e_idle = (eng.peak_mb, eng.idle_mb) if eng else (None, None)
    l_peak, l_idle = (llama.peak_mb, llama.idle_mb) if llama else (None, None)
    return [
        f"| peak load RSS MB (VmHWM), engine from the GGUF, KV for {tokens} tokens | {_mb(e_peak)} "
        f"| n/a | | {_mb(l_peak)} | {_x(_ratio(e_peak, l_peak))} |",
        f"| idle RSS MB (VmRSS), engine from the GGUF, KV for {tokens} tokens | {_mb(e_idle)} "
        f"| n/a | | {_mb(l_idle)} | {_x(_ratio(e_idle, l_idle))} |",
    ]


def goal_lines(eng: Memory | None, llama: Memory | None) -> list[str]:
    budget = budget_mb(eng)
    peak = eng.peak_mb if eng else None
    peak_ratio = _ratio(peak, budget)
    idle_ratio = _ratio(eng.idle_mb if eng else None, llama.idle_mb if llama else None)

    def verdict(ratio: float | None, goal: float) -> str:
        if ratio is None:
            return "**not measured**"
        return "met" if ratio <= goal else "**not met**"

    weights = _mb(eng.weights_mb if eng else None)
    kv = _mb(eng.kv_mb if eng else None)
    return [
        f"- peak load RSS <= {PEAK_GOAL:g}x (final weights + KV budget): {verdict(peak_ratio, PEAK_GOAL)} "
        f"({_mb(peak)} MB against {weights} + {kv} MB: {_x(peak_ratio)}).",
        f"- idle RSS <= {IDLE_GOAL:g}x llama-server's at the same context size: "
        f"{verdict(idle_ratio, IDLE_GOAL)} ({_x(idle_ratio)}).",
    ]


def measure(
    serving: Any, engine_cmd: list[str], llama_cmd: list[str] | None, tmp: Path, notes: list[str]
) -> tuple[Memory | None, Memory | None]:
    """Run the engine on the GGUF, then llama-server at the engine's KV capacity; (engine, llama)."""
    eng = llama = None
    pids: list[int] = []
    log = tmp / "engine-memory.log"
    # A first start times autotune (minutes at 2 threads on a loaded machine): a longer wait than the others.
    with serving(engine_cmd, log, timeout_s=START_TIMEOUT_S, pids=pids) as url:
        if url is None:
            notes.append(f"memory: the engine on the GGUF did not start: {_last_line(log)}")
        else:
            eng = engine_memory(log, url, pids[-1])
            timed = "autotune (timed now" in log.read_text(errors="replace")
            how = "timed autotune" if timed else "used a cached autotune choice"
            notes.append(f"memory: the engine's start {how}")
    if eng is None or eng.kv_tokens is None or llama_cmd is None:
        if llama_cmd is None:
            notes.append("memory: no llama-server binary (--llama-server), so no llama.cpp memory figures")
        return eng, None
    cmd = llama_memory_cmd(llama_cmd, eng.kv_tokens)
    if cmd is None:
        notes.append("memory: llama-cpp-python's server is not measured (its process is Python's)")
        return eng, None
    log = tmp / "llama-memory.log"
    with serving(cmd, log, pids=pids) as url:
        if url is None:
            notes.append("memory: llama-server at the engine's context size did not start")
        else:
            peak, idle = read_after_one_request(url, pids[-1])
            llama = Memory(peak, idle)
    return eng, llama


def main(argv: list[str] | None = None) -> None:
    """The memory phase alone: `python -m bench.engine_memory [--threads N] [--llama-server PATH] [-- FLAGS]`
    (FLAGS go to `engine serve`, e.g. `--dtype bfloat16 --quant int4`; default: auto)."""
    import argparse
    import sys
    import tempfile

    from backends.local.loader import resolve_spec
    from bench.engine import MODEL_SPEC, engine_cmd, llama_cmd, serving

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="compute threads of both servers")
    parser.add_argument("--llama-server", type=Path, metavar="PATH", help="llama.cpp's llama-server binary")
    parser.add_argument("flags", nargs="*", help="extra `engine serve` flags (after --)")
    args = parser.parse_args(argv)
    source = resolve_spec(MODEL_SPEC)
    assert source.gguf_file is not None
    gguf = source.directory / source.gguf_file
    notes: list[str] = []
    llama = llama_cmd(gguf, args.threads, args.llama_server, 1) if args.llama_server else None
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        eng, ll = measure(serving, engine_cmd(gguf, args.threads, *args.flags), llama, Path(tmp), notes)
    print(f"engine {eng}\nllama-server {ll}", file=sys.stderr)
    print("\n".join([*rows(eng, ll), "", *goal_lines(eng, ll), *(f"- Note: {n}" for n in notes)]))


if __name__ == "__main__":
    main()
