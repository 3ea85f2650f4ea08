"""The soak's request mix: every API, streamed and not, cache hits, fallbacks, 429s and clients that leave.

`Traffic.one(kind)` sends one request of a kind and returns its outcome and the gateway's `x-request-id`
(None when no answer head arrived): `ok` (a whole 2xx answer read), `http_<status>` for a refusal,
`disconnected` (a stream the client closed after its first events, on purpose), `timed_out` (a
non-streamed request the client gave up on, on purpose) or `transport_error`.
Every request carries a valid key, so each one should leave exactly one ledger row. Models (upstream names
in brackets, knobs set on the fake provider by `bench.soak`): `steady` [steady], `cached` [steady, asked at
temperature 0], `flaky` (primary [flaky] fails one request in N with 503, fallback [steady] on another
backend), `slow` [slow: 1 s to the first token, then 20 tokens/s].
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import httpx

CACHED_PROMPTS = 32  # temperature-0 prompts that repeat: after the first round they are cache hits
DISCONNECT_AFTER_EVENTS = 3  # a leaving client reads this many SSE chunks, then closes the connection
CLIENT_TIMEOUT_S = 0.4  # a leaving non-streamed client waits this long for the `slow` model (1 s to answer)


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    weight: float
    path: str
    stream: bool = False
    model: str = "steady"
    tight_key: bool = False  # the key whose request limit is far below its share of the load
    leave: bool = False  # a client that disconnects (stream) or times out (non-streamed)


KINDS: tuple[Kind, ...] = (
    Kind("chat", 14, "/v1/chat/completions"),
    Kind("chat stream", 12, "/v1/chat/completions", stream=True),
    Kind("chat cached", 12, "/v1/chat/completions", model="cached"),
    Kind("chat cached stream", 4, "/v1/chat/completions", stream=True, model="cached"),
    Kind("chat fallback", 8, "/v1/chat/completions", model="flaky"),
    Kind("chat fallback stream", 4, "/v1/chat/completions", stream=True, model="flaky"),
    Kind("chat rate-limited key", 6, "/v1/chat/completions", tight_key=True),
    Kind("completions", 5, "/v1/completions"),
    Kind("completions stream", 3, "/v1/completions", stream=True),
    Kind("responses store=false", 5, "/v1/responses"),
    Kind("responses store=true", 4, "/v1/responses"),
    Kind("responses follow-up", 2, "/v1/responses"),
    Kind("responses stream", 3, "/v1/responses", stream=True),
    Kind("messages", 6, "/v1/messages"),
    Kind("messages stream", 4, "/v1/messages", stream=True),
    Kind("chat stream, client leaves", 2, "/v1/chat/completions", stream=True, model="slow", leave=True),
    Kind("messages stream, client leaves", 1, "/v1/messages", stream=True, model="slow", leave=True),
    Kind("chat, client times out", 2, "/v1/chat/completions", model="slow", leave=True),
)


def body_for(kind: Kind, n: int, rng: random.Random, previous_id: str | None) -> dict[str, object]:
    """The body of request number `n` of `kind` (no prompt text repeats unless it should hit the cache)."""
    text = f"Soak request {n}: say something short."
    if kind.model == "cached":
        unique = rng.random() < 0.5  # half miss and fill the cache (bounded by cache.memory_max_entries)
        text = f"Cached question {n if unique else n % CACHED_PROMPTS}."
    body: dict[str, object] = {"model": kind.model}
    if kind.path == "/v1/responses":
        body |= {"input": text, "store": kind.name != "responses store=false", "max_output_tokens": 32}
        if kind.name == "responses follow-up" and previous_id is not None:
            body["previous_response_id"] = previous_id
    elif kind.path == "/v1/completions":
        body |= {"prompt": text, "max_tokens": 32}
    else:
        body |= {"messages": [{"role": "user", "content": text}], "max_tokens": 32}
    if kind.model == "cached":
        body["temperature"] = 0
    if kind.stream:
        body["stream"] = True
        if kind.path in ("/v1/chat/completions", "/v1/completions"):
            body["stream_options"] = {"include_usage": True}
    return body


class Traffic:
    """Sends the mix through one shared connection pool (like a fleet of clients behind one proxy)."""

    def __init__(self, base_url: str, key: str, tight_key: str, seed: int = 7) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )
        self._key, self._tight_key = key, tight_key
        self._rng = random.Random(seed)
        self._numbers = itertools.count()
        self._stored: list[str] = []  # ids of stored responses, for follow-ups

    def pick(self) -> Kind:
        return self._rng.choices(KINDS, weights=[k.weight for k in KINDS])[0]

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self, kind: Kind) -> dict[str, str]:
        key = self._tight_key if kind.tight_key else self._key
        if kind.path == "/v1/messages":
            return {"x-api-key": key, "anthropic-version": "2023-06-01"}
        return {"authorization": f"Bearer {key}"}

    async def one(self, kind: Kind) -> tuple[str, str | None]:
        previous = self._stored[-1] if self._stored else None
        body = body_for(kind, next(self._numbers), self._rng, previous)
        send = self._stream if kind.stream else self._json
        try:
            return await send(kind, body)
        except httpx.TimeoutException:
            return ("timed_out" if kind.leave else "transport_error"), None
        except httpx.TransportError:
            return "transport_error", None

    async def _json(self, kind: Kind, body: dict[str, object]) -> tuple[str, str | None]:
        timeout = CLIENT_TIMEOUT_S if kind.leave else 30.0
        resp = await self._client.post(kind.path, json=body, headers=self._headers(kind), timeout=timeout)
        rid = resp.headers.get("x-request-id")
        if resp.status_code != 200:
            return f"http_{resp.status_code}", rid
        if kind.name == "responses store=true":
            self._stored = [*self._stored[-15:], resp.json()["id"]]
        return "ok", rid

    async def _stream(self, kind: Kind, body: dict[str, object]) -> tuple[str, str | None]:
        request = self._client.build_request("POST", kind.path, json=body, headers=self._headers(kind))
        resp = await self._client.send(request, stream=True)
        rid = resp.headers.get("x-request-id")
        try:
            if resp.status_code != 200:
                await resp.aread()
                return f"http_{resp.status_code}", rid
            seen = 0
            async for _ in resp.aiter_raw():
                seen += 1
                if kind.leave and seen >= DISCONNECT_AFTER_EVENTS:
                    return "disconnected", rid  # closing an unread response closes its connection
            return "ok", rid  # the whole stream arrived (a leaving client had no time to leave)
        finally:
            await resp.aclose()
