"""The chaos run's load driver: a steady open-loop request rate, round-robin over the replicas.

Request i is sent at `t0 + i / rate` whatever happened to the ones before (open loop: a stalled request does
not slow the schedule). A connection that is refused (the replica is down) is retried on the next replica, as
a load balancer would; nothing else is retried. Every request becomes one `Outcome`, written as one JSON line
when the run ends. Runs in a process of its own (`run_load`), so the orchestrator's fault thread and TCP proxy
do not share its event loop or its GIL. Times are wall-clock seconds (`time.time()`) so both processes agree.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

CLIENT_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it. `cause` is "ok" or a short class of failure (see `_classify`)."""

    i: int
    start: float  # wall clock, when it was sent
    end: float
    replica: int  # the replica that finally took it (after refused connections)
    model: str
    stream: bool
    status: int  # HTTP status; 0 when no response came
    cause: str
    request_id: str
    refused: int  # connections refused before one was accepted

    @property
    def ok(self) -> bool:
        return self.cause == "ok"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    urls: tuple[str, ...]
    key: str
    t0: float  # wall clock of request 0
    duration_s: float
    rate: float  # requests per second
    local_share: float  # share of requests for the engine-first model
    stream_share: float
    seed: int = 7


def _body(i: int, model: str, stream: bool, rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"Chaos request {i}: say hello in five words."}],
        "max_tokens": 8,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["temperature"] = 0  # deterministic: a cache lookup and store (a miss: every prompt differs)
    return body


def _error_code(raw: bytes) -> str:
    try:
        error = orjson.loads(raw).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return "not_json"
    return str(error.get("code") or error.get("type") or "no_code")


def _stream_cause(raw: bytes) -> str:
    """ok when the stream ended with [DONE] and no error event; else the error event's code, or `cut`."""
    done = False
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
            continue
        event = orjson.loads(data)
        if isinstance(event, dict) and event.get("error"):
            return f"stream error {event['error'].get('code') or event['error'].get('type')}"
    return "ok" if done else "stream ended without [DONE]"


async def _one(
    client: httpx.AsyncClient, plan: LoadPlan, i: int, model: str, stream: bool, body: bytes
) -> Outcome:
    start = time.time()
    replica, refused = i % len(plan.urls), 0
    status, cause, request_id = 0, "", ""
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):  # httpx's timeouts are per read: a trickle evades them
            status, cause, request_id, replica, refused = await _attempts(client, plan, i, stream, body)
    except TimeoutError:
        cause = f"client timeout ({CLIENT_TIMEOUT_S:g} s in all)"
    return Outcome(i, start, time.time(), replica, model, stream, status, cause, request_id, refused)


async def _attempts(
    client: httpx.AsyncClient, plan: LoadPlan, i: int, stream: bool, body: bytes
) -> tuple[int, str, str, int, int]:
    """(status, cause, request id, replica, connections refused) of one request, refused ones retried."""
    replica, refused = i % len(plan.urls), 0
    headers = {"authorization": f"Bearer {plan.key}", "content-type": "application/json"}
    status, cause, request_id = 0, "", ""
    while True:
        url = plan.urls[replica] + "/v1/chat/completions"
        try:
            async with client.stream("POST", url, content=body, headers=headers) as resp:
                status, request_id = resp.status_code, resp.headers.get("x-request-id", "")
                try:
                    raw = await resp.aread()
                except httpx.TransportError as exc:
                    cause = f"{'stream' if stream else 'body'} cut ({type(exc).__name__})"
                    break
            if status != 200:
                cause = f"{status} {_error_code(raw)}"
            elif stream:
                cause = _stream_cause(raw)
            else:
                cause = "ok" if b'"choices"' in raw else "200 without choices"
            break
        except httpx.ConnectError:
            refused += 1
            if refused >= len(plan.urls):
                cause = "refused by every replica"
                break
            replica = (replica + 1) % len(plan.urls)
        except httpx.TimeoutException:
            cause = "client timeout"
            break
        except httpx.TransportError as exc:
            cause = f"no response ({type(exc).__name__})"
            break
    return status, cause, request_id, replica, refused


async def _drive(plan: LoadPlan) -> list[Outcome]:
    rng = random.Random(plan.seed)
    n = int(plan.duration_s * plan.rate)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    tasks: list[asyncio.Task[Outcome]] = []
    loop = asyncio.get_running_loop()
    offset = time.time() - loop.time()  # wall clock = loop clock + offset
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        for i in range(n):
            model = "local" if rng.random() < plan.local_share else "cloud"
            stream = rng.random() < plan.stream_share
            body = orjson.dumps(_body(i, model, stream, rng))
            delay = plan.t0 + i / plan.rate - offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, plan, i, model, stream, body)))
        return list(await asyncio.gather(*tasks))


def run_load(plan: LoadPlan, out: Path) -> None:
    """Process entry point: drive the load, then write one JSON line per request to `out`."""
    outcomes = asyncio.run(_drive(plan))
    out.write_bytes(b"".join(orjson.dumps(asdict(o)) + b"\n" for o in outcomes))


def read_outcomes(path: Path) -> list[Outcome]:
    return [Outcome(**orjson.loads(line)) for line in path.read_bytes().splitlines() if line]
