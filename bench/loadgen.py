"""Closed-loop HTTP load: `wrk` with a Lua script when installed, else a small asyncio raw-socket client.

Both run as a separate process (pinned with `taskset` by the caller) and return the same `LoadResult`:
completed requests, non-2xx answers, socket errors, p50/p99 latency and req/s. Latency is closed-loop
(time from writing a request to reading its last byte on a keep-alive connection), as wrk measures it.
Run the Python client alone with `python -m bench.loadgen URL --body-file F -c 32 -d 10 [-H 'k: v']`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

_MARK = "SBJSON "

# `done` prints one JSON line; wrk's latency values are microseconds.
_WRK_LUA = """\
wrk.method = "POST"
wrk.body = {body}
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{mark}{{"requests": %d, "non2xx": %d, "errors": %d, "duration_s": %.6f, ' ..
    '"p50_ms": %.4f, "p99_ms": %.4f}}\\n',
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int  # completed responses, any status
    non2xx: int
    errors: int  # connect/read/write/timeout
    duration_s: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx


def wrk_path(install: bool = True) -> str | None:
    """`wrk` on PATH; if absent and `install`, try `apt-get install -y wrk` (Debian package, needs root)."""
    found = shutil.which("wrk")
    if found or not install or not shutil.which("apt-get"):
        return found
    print(
        "wrk not found; trying `apt-get install -y wrk` (else the Python load generator is used)",
        file=sys.stderr,
    )
    try:
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"apt-get failed: {exc}", file=sys.stderr)
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for ASCII text


def run_wrk(
    wrk: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connections: int,
    duration_s: float,
    script_dir: Path,
    pin: Sequence[str] = (),
) -> LoadResult:
    header_lines = "\n".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
    script = script_dir / "post.lua"
    script.write_text(_WRK_LUA.format(body=_lua_string(body.decode()), headers=header_lines, mark=_MARK))
    cmd = [
        *pin,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return _parse_marked(out, cmd)


def run_python(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connections: int,
    duration_s: float,
    script_dir: Path,
    pin: Sequence[str] = (),
) -> LoadResult:
    body_file = script_dir / "body.json"
    body_file.write_bytes(body)
    cmd = [
        *pin,
        sys.executable,
        "-m",
        "bench.loadgen",
        url,
        "--body-file",
        str(body_file),
        "-c",
        str(connections),
        "-d",
        str(duration_s),
    ]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return _parse_marked(out, cmd)


def _parse_marked(out: str, cmd: list[str]) -> LoadResult:
    for line in out.splitlines():
        if line.startswith(_MARK):
            return LoadResult(**json.loads(line[len(_MARK) :]))
    raise RuntimeError(f"no result line from {' '.join(cmd[:3])}...; output:\n{out[-2000:]}")


# ---- the Python fallback: one asyncio task per connection, prebuilt request bytes --------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (content-length or chunked); return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF; size 0 leaves the final CRLF
            if size == 0:
                return status
    start = lower.find(b"content-length:")
    if start >= 0:
        end = lower.find(b"\r\n", start)
        await reader.readexactly(int(lower[start + 15 : end]))
    return status


async def _connection(
    host: str, port: int, request: bytes, stop_at: float, lat_s: list[float], counts: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            status = await _read_response(reader)
            lat_s.append(time.perf_counter() - t0)
            counts[0] += not 200 <= status < 300
    except (OSError, asyncio.IncompleteReadError, ValueError):
        counts[1] += 1
    finally:
        writer.close()


async def _load(
    url: str, body: bytes, headers: dict[str, str], connections: int, duration_s: float
) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = [f"POST {parts.path or '/'} HTTP/1.1", f"host: {parts.netloc}", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    lat_s: list[float] = []
    counts = [0, 0]  # non-2xx, errors
    t0 = time.perf_counter()
    stop_at = t0 + duration_s
    await asyncio.gather(
        *(_connection(host, port, request, stop_at, lat_s, counts) for _ in range(connections))
    )
    elapsed = time.perf_counter() - t0
    lat_s.sort()

    def pct(p: float) -> float:
        return lat_s[min(len(lat_s) - 1, int(p / 100 * len(lat_s)))] * 1000 if lat_s else 0.0

    return LoadResult(len(lat_s), counts[0], counts[1], elapsed, pct(50), pct(99))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("-d", "--duration-s", type=float, default=10.0)
    parser.add_argument("-H", "--header", action="append", default=[])
    args = parser.parse_args(argv)
    headers = dict(h.split(": ", 1) for h in args.header)
    run = asyncio.run  # plain asyncio is slower but measures the same thing
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        run = uvloop.run
    result = run(_load(args.url, args.body_file.read_bytes(), headers, args.connections, args.duration_s))
    print(_MARK + json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
