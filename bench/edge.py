"""Edge nodes: the latency the WebSocket tunnel adds, and one edge node's speed in the int4 profile.

One run starts `switchboard engine serve` and `switchboard edge serve` with the same engine flags (the edge
profile: `--quant int4 --kv-cache-mb 64 --max-batch 8 --threads T`), and one gateway (`switchboard serve`,
SQLite, cache off) where model `smollm2` routes to the edge node over its tunnel and `smollm2-http` to the
engine over HTTP (kind `openai`). Latency: short greedy completions (`max_tokens` 8, not streamed), one at
a time, rotating over engine direct / gateway + HTTP / gateway + tunnel; the tunnel's added latency is
gateway + tunnel minus gateway + HTTP (the gateway's own work cancels out). Speed: one stream through the
tunnel (client side), the node's start-up measurement, concurrent streams, and llama.cpp's server on the
same GGUF when installed. Every figure is measured in this run.
Run: `python -m bench.edge [--quick] [--threads 1] [--out docs/BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

from bench.engine import MODEL_SPEC, STORY, Stream, last_error, llama_cmd, median_stream, serving, stream_chat
from bench.overhead import TEAM, _make_key, free_port, machine_info, stop_all
from bench.redis_paths import write_section

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bench-edge-admin"
SHORT = [{"role": "user", "content": "Say hi."}]
PROFILE = ("--quant", "int4", "--kv-cache-mb", "64", "--max-batch", "8")
TARGETS = ("engine direct", "gateway + HTTP", "gateway + tunnel")


@dataclass(slots=True)
class Results:
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # target -> one figure per request
    edge_stream: Stream | None = None
    edge_burst_tok_s: float | None = None
    node_tok_s: float | None = None  # what the node measured at start and reported in hello
    engine_stream: Stream | None = None
    llama_stream: Stream | None = None
    notes: list[str] = field(default_factory=list)


# ---- processes ---------------------------------------------------------------------------------------------


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def _write_config(tmp: Path, port: int, engine_url: str) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
admin_key_env = "SWITCHBOARD_ADMIN_KEY"

[database]
url = "sqlite:///{tmp / "ledger.db"}"
spill_path = "{tmp / "spill.jsonl"}"

[cache]
enabled = false

[backends.engine]
kind = "openai"
base_url = "{engine_url}/v1"
supports_tools = false
supports_response_format = false

[backends.edge]
kind = "edge"

[models.smollm2]
backend = "edge"

[models.smollm2-http]
backend = "engine"
upstream_model = "smollm2"

[teams.{TEAM}]
models = ["*"]
""")
    return path


def _wait(what: str, ready: Any, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {last_error(log)}")
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:g} s: {last_error(log)}")


@dataclass(frozen=True, slots=True)
class Rig:
    engine_url: str
    gateway_url: str
    team_key: str
    node: dict[str, Any]  # the node as GET /admin/edge/nodes lists it


def _nodes(gateway_url: str) -> list[dict[str, Any]]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = httpx.get(gateway_url + "/admin/edge/nodes", headers=admin, timeout=5.0)
    response.raise_for_status()
    return [n for n in response.json()["data"] if n["state"] == "connected"]


@contextmanager
def rig(tmp: Path, threads: int) -> Iterator[Rig]:
    procs: list[subprocess.Popen[bytes]] = []
    flags = ("--model", MODEL_SPEC, *PROFILE, "--threads", str(threads))
    try:
        engine_port, gateway_port = free_port(), free_port()
        engine = _spawn(_cli("engine", "serve", "--port", str(engine_port), *flags), tmp / "engine.log")
        procs.append(engine)
        engine_url = f"http://127.0.0.1:{engine_port}"
        config = _write_config(tmp, gateway_port, engine_url)
        key = _make_key(f"sqlite:///{tmp / 'ledger.db'}")
        created = subprocess.run(
            _cli("edge", "token", "create", "--name", "bench", "--config", str(config)),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        )
        token = created.stdout.strip().splitlines()[-1]
        gateway = _spawn(
            _cli("serve", "--config", str(config)), tmp / "gateway.log", {"SWITCHBOARD_ADMIN_KEY": ADMIN_KEY}
        )
        procs.append(gateway)
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        _wait(
            "gateway",
            lambda: httpx.get(gateway_url + "/healthz").status_code == 200,
            gateway,
            tmp / "gateway.log",
        )
        node_cmd = _cli("edge", "serve", "--gateway", gateway_url, "--node-id", "bench-node", *flags)
        node = _spawn(node_cmd, tmp / "node.log", {"SWITCHBOARD_EDGE_TOKEN": token})
        procs.append(node)
        _wait(
            "engine",
            lambda: httpx.get(engine_url + "/v1/models").status_code == 200,
            engine,
            tmp / "engine.log",
        )
        _wait("edge node", lambda: bool(_nodes(gateway_url)), node, tmp / "node.log")
        yield Rig(engine_url, gateway_url, key, _nodes(gateway_url)[0])
    finally:
        stop_all(procs)


# ---- measurements ------------------------------------------------------------------------------------------


async def _complete(client: httpx.AsyncClient, url: str, model: str) -> float:
    body = {"model": model, "messages": SHORT, "max_tokens": 8, "temperature": 0}
    sent = time.perf_counter()
    response = await client.post(url + "/v1/chat/completions", json=body)
    elapsed_ms = (time.perf_counter() - sent) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{url} ({model}): HTTP {response.status_code}: {response.text[:300]}")
    return elapsed_ms


async def latency(r: Rig, requests: int, warmup: int) -> dict[str, list[float]]:
    """Requests one at a time, rotating over the three paths so drift in machine load hits each alike."""
    paths = {
        "engine direct": (r.engine_url, "smollm2"),
        "gateway + HTTP": (r.gateway_url, "smollm2-http"),
        "gateway + tunnel": (r.gateway_url, "smollm2"),
    }
    out: dict[str, list[float]] = {name: [] for name in paths}
    headers = {"Authorization": f"Bearer {r.team_key}"}
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        for i in range(warmup + requests):
            for name, (url, model) in paths.items():
                elapsed_ms = await _complete(client, url, model)
                if i >= warmup:
                    out[name].append(elapsed_ms)
    return out


async def streams(url: str, key: str | None, n: int, max_tokens: int, repeats: int) -> tuple[Stream, float]:
    """(median of `repeats` single streams, aggregate tok/s of `n` concurrent streams)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # No keep-alive: llama-server hangs up an idle kept-alive connection, and the next request on it failed
    # ("Server disconnected"); a loopback connect adds well under a millisecond to a TTFT.
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, headers=headers, limits=limits) as client:
        await stream_chat(client, url, SHORT, 8)  # warm-up
        story = [{"role": "user", "content": STORY}]
        single = median_stream([await stream_chat(client, url, story, max_tokens) for _ in range(repeats)])
        started = time.perf_counter()
        runs = await asyncio.gather(*(stream_chat(client, url, story, max_tokens) for _ in range(n)))
        wall_s = time.perf_counter() - started
    return single, sum(s.tokens for s in runs) / wall_s


def run(args: argparse.Namespace, tmp: Path) -> Results:
    out = Results()
    with rig(tmp, args.threads) as r:
        out.node_tok_s = float(r.node["tokens_per_s"])
        out.latency_ms = asyncio.run(latency(r, args.requests, args.warmup))
        print({k: f"p50 {percentile(v, 50):.1f} ms" for k, v in out.latency_ms.items()}, file=sys.stderr)
        out.edge_stream, out.edge_burst_tok_s = asyncio.run(
            streams(r.gateway_url, r.team_key, args.streams, args.max_tokens, args.repeats)
        )
        out.engine_stream = asyncio.run(streams(r.engine_url, None, 1, args.max_tokens, args.repeats))[0]
    from backends.local.loader import resolve_spec

    source = resolve_spec(MODEL_SPEC)
    assert source.gguf_file is not None
    cmd = llama_cmd(source.directory / source.gguf_file, args.threads, args.llama_server, 1)
    if cmd is None:
        out.notes.append("no llama-server (--llama-server) and no llama-cpp-python: no llama.cpp row")
        return out
    log = tmp / "llama.log"
    with serving(cmd, log) as url:
        if url is None:
            out.notes.append(f"llama-server did not start: {last_error(log)}")
        else:
            out.llama_stream = asyncio.run(streams(url, None, 1, args.max_tokens, args.repeats))[0]
    return out


# ---- the report --------------------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _tok_s(stream: Stream | None) -> str:
    return "n/a" if stream is None else f"{stream.decode_tok_s:.1f}"


def render(res: Results, meta: dict[str, str]) -> str:
    info = machine_info()
    p = {
        name: (percentile(res.latency_ms[name], 50), percentile(res.latency_ms[name], 99)) for name in TARGETS
    }
    http, tunnel, direct = p["gateway + HTTP"], p["gateway + tunnel"], p["engine direct"]
    speed = [
        ("one stream through gateway + tunnel, decode (client side)", _tok_s(res.edge_stream)),
        ("the node's own start-up measurement (`/admin/edge/nodes`)", f"{res.node_tok_s or 0:.1f}"),
        (
            f"{meta['streams']} concurrent streams through the tunnel, aggregate",
            f"{res.edge_burst_tok_s or 0:.1f}",
        ),
        ("one stream, `switchboard engine serve` direct, same flags", _tok_s(res.engine_stream)),
        ("one stream, llama.cpp server on the same GGUF", _tok_s(res.llama_stream)),
    ]
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}; 1-minute load average {meta['load']} at the start.",
        "",
        f"Command: `{meta['command']}` ({meta['wall']}). Model `{MODEL_SPEC}`; the engine, the edge node "
        f"and llama.cpp each compute on {meta['threads']} thread(s); engine and node both run "
        f"`{' '.join(PROFILE)}` (float32 activations, int4 weights in groups of 32). One gateway (SQLite "
        "ledger, cache off), one client, requests one at a time rotating over the three paths: "
        f"{meta['requests']} per path after {meta['warmup']} warm-up rounds, each `max_tokens` 8, greedy, "
        "not streamed, timed by the client from send to the whole answer.",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---:|---:|",
        *(f"| {name} | {p[name][0]:.2f} | {p[name][1]:.2f} |" for name in TARGETS),
        "",
        "- Added by the tunnel (gateway + tunnel minus gateway + HTTP): "
        f"**{tunnel[0] - http[0]:+.2f} ms p50**, {tunnel[1] - http[1]:+.2f} ms p99; gateway + tunnel minus "
        f"engine direct: {tunnel[0] - direct[0]:+.2f} ms p50, {tunnel[1] - direct[1]:+.2f} ms p99.",
        "",
        f"Edge node speed (int4 profile), {meta['max_tokens']} tokens max, median of {meta['repeats']}:",
        "",
        "| measurement | tok/s |",
        "|---|---:|",
        *(f"| {label} | {value} |" for label, value in speed),
    ]
    lines += ["", *(f"- Note: {n}" for n in res.notes)] if res.notes else []
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter streams")
    parser.add_argument("--threads", type=int, default=1, help="compute threads of the engine and the node")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp llama-server binary (default: PATH)")
    parser.add_argument("--out", type=Path, help="write/replace the bench/edge section in this file")
    args = parser.parse_args(argv)
    args.requests, args.warmup, args.max_tokens, args.repeats, args.streams = (
        (40, 3, 48, 1, 4) if args.quick else (200, 10, 128, 3, 8)
    )
    load, started = f"{os.getloadavg()[0]:.2f}", time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sb-bench-edge-") as tmp:
        res = run(args, Path(tmp))
    meta = {
        "command": " ".join(["python -m bench.edge", *(argv if argv is not None else sys.argv[1:])]),
        "load": load,
        "wall": f"{(time.perf_counter() - started) / 60:.1f} min",
        "threads": str(args.threads),
        "requests": str(args.requests),
        "warmup": str(args.warmup),
        "max_tokens": str(args.max_tokens),
        "repeats": str(args.repeats),
        "streams": str(args.streams),
    }
    section = render(res, meta)
    print(section)
    if args.out:
        write_section(args.out, "edge", "Edge nodes: tunnel latency and node speed", section)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
