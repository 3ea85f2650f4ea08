"""Micro-benchmark of the upstream HTTP client alone: httpx's default transport vs `FastTransport`.

Closed loop: `--concurrency` tasks each POST a chat completion (non-streaming) to a running fake provider
for `--duration-s`, on one event loop; prints req/s and CPU seconds per request for each client.
Invariant: every client is measured in this run against the same upstream, in the order given.
Run (client on core 0, upstream on core 1):
  taskset -c 1 python -m tests.support.fake_provider --port 9100 &
  taskset -c 0 python -m bench.transport --url http://127.0.0.1:9100 --duration-s 3
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import orjson

from backends.base import ChatRequest
from backends.http11 import FastTransport
from backends.openai_compat import OpenAICompatBackend

Send = Callable[[], Awaitable[None]]
CLIENTS = ("httpx", "fast-client", "fast-direct", "backend")


async def measure(send: Send, concurrency: int, duration_s: float) -> tuple[int, float, float]:
    """(requests done, wall seconds, CPU seconds) after a short warm-up."""
    for _ in range(concurrency):
        await send()
    done = 0
    stop_at = time.monotonic() + duration_s

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await send()
            done += 1

    started, cpu_started = time.monotonic(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.monotonic() - started, time.process_time() - cpu_started


async def run_client(name: str, base_url: str, concurrency: int, duration_s: float) -> str:
    url = base_url + "/v1/chat/completions"
    body = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say hello."}]})
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if name == "backend":
        backend = OpenAICompatBackend(
            "bench",
            base_url + "/v1",
            api_key="sk-bench",
            timeout_s=30.0,
            connect_timeout_s=5.0,
            max_connections=concurrency,
            supports_tools=True,
            supports_response_format=True,
        )
        message = {"role": "user", "content": "Say hello."}
        chat = ChatRequest(model="bench", messages=(message,), request_id="bench")

        async def send_backend() -> None:
            await backend.complete(chat)

        try:
            result = await measure(send_backend, concurrency, duration_s)
        finally:
            await backend.aclose()
        return render(name, *result)
    transport: httpx.AsyncBaseTransport | None = (
        None if name == "httpx" else FastTransport(max_connections=concurrency)
    )
    async with httpx.AsyncClient(transport=transport, limits=limits, headers=headers, timeout=30.0) as client:
        timeout_ext = httpx.Timeout(30.0).as_dict()

        async def send_client() -> None:
            response = await client.post(url, content=body)
            assert response.status_code == 200

        async def send_direct() -> None:
            assert isinstance(transport, FastTransport)
            request = httpx.Request(
                "POST", url, headers=headers, content=body, extensions={"timeout": timeout_ext}
            )
            response = await transport.handle_async_request(request)
            await response.aread()
            assert response.status_code == 200

        result = await measure(send_direct if name == "fast-direct" else send_client, concurrency, duration_s)
    return render(name, *result)


def render(name: str, done: int, wall_s: float, cpu_s: float) -> str:
    return f"| {name} | {done / wall_s:,.0f} | {cpu_s / done * 1e6:,.0f} |"


async def main_async(args: argparse.Namespace) -> None:
    print(f"{args.concurrency} concurrent, {args.duration_s:g} s each, upstream {args.url}\n")
    print("| client | req/s | CPU µs/request |\n|---|---:|---:|")
    for name in args.clients.split(","):
        print(await run_client(name, args.url, args.concurrency, args.duration_s), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:9100", help="fake provider root")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--clients", default=",".join(CLIENTS), help=f"comma-separated, from {CLIENTS}")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
