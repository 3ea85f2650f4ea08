"""Response cache: key a deterministic request, store its answer (whole or streamed), replay it on a hit.

Keys: gateway/cache/keys.py. Entries are version-tagged orjson bytes; anything unreadable is a miss. A
cache never raises to its caller: Redis errors and timeouts are misses and skipped writes, logged once per
outage, and for `retry_after_s` after a failure Redis is not called at all. A hit replays the exact stored
deltas. Entries of embeddings calls hold the vectors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from backends.base import ChatResult, EmbeddingResult, StreamChunk, Usage
from gateway.outage import OutageGuard

log = logging.getLogger(__name__)

ENTRY_VERSION = 2  # bump when the stored shape changes: old entries decode as misses
DEFAULT_MAX_ENTRY_BYTES = 1 << 20
# ---- rules ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheDirectives:
    no_cache: bool = False  # do not answer from the cache (the answer may still be stored)
    no_store: bool = False  # do not store this answer (a stored one may still be served)


NO_DIRECTIVES = CacheDirectives()


def directives(cache_control: str | None) -> CacheDirectives:
    """Parse a request's `Cache-Control`. `max-age=0` means no-cache; unknown directives are ignored."""
    if not cache_control:
        return NO_DIRECTIVES
    names = set()
    for part in cache_control.lower().split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip()
        if name == "max-age" and value.strip().strip('"') == "0":
            name = "no-cache"
        names.add(name)
    return CacheDirectives(no_cache="no-cache" in names, no_store="no-store" in names)


# ---- entries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """One stored answer. `deltas` is set when it came from a stream: replay yields exactly those."""

    message: Mapping[str, Any]
    finish_reason: str
    usage: Usage
    served_model: str
    backend: str
    cost_micro_usd: int  # what the original call cost: a hit saves this much
    deltas: tuple[Mapping[str, Any], ...] | None = None
    route_reason: str = ""  # the original's x-switchboard-route, so a hit carries the same headers
    vectors: tuple[tuple[float, ...], ...] | None = None  # an embeddings answer (message is then empty)

    def to_result(self) -> ChatResult | EmbeddingResult:
        if self.vectors is not None:
            return EmbeddingResult(self.vectors, self.usage, self.served_model)
        return ChatResult(dict(self.message), self.finish_reason, self.usage, self.served_model)

    def replay(self) -> Iterator[StreamChunk]:
        """The answer as a stream: the stored deltas, then one chunk with finish_reason and usage.

        Lazy, so a long answer's first chunk goes out at once (building 500 chunks up front costs ~0.3 ms).
        """
        deltas = self.deltas if self.deltas is not None else _deltas_of(self.message)
        for delta in deltas:
            yield StreamChunk(delta, None, None, self.served_model)
        yield StreamChunk({}, self.finish_reason, self.usage, self.served_model)


def _deltas_of(message: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    first: dict[str, Any] = {"role": message.get("role", "assistant")}
    if message.get("content") is not None:
        first["content"] = message["content"]
    calls = message.get("tool_calls")
    if calls:
        first["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
    return (first,)


def entry_from_result(
    result: ChatResult | EmbeddingResult, *, backend: str, cost_micro_usd: int, route_reason: str = ""
) -> CachedResponse:
    if isinstance(result, EmbeddingResult):
        return CachedResponse(
            message={},
            finish_reason="",
            usage=result.usage,
            served_model=result.served_model,
            backend=backend,
            cost_micro_usd=cost_micro_usd,
            route_reason=route_reason,
            vectors=result.vectors,
        )
    return CachedResponse(
        message=dict(result.message),
        finish_reason=result.finish_reason,
        usage=result.usage,
        served_model=result.served_model,
        backend=backend,
        cost_micro_usd=cost_micro_usd,
        route_reason=route_reason,
    )


def entry_from_chunks(
    chunks: Iterable[StreamChunk],
    *,
    backend: str,
    cost_micro_usd: int,
    served_model: str = "",
    route_reason: str = "",
) -> CachedResponse | None:
    """A finished stream as an entry; None if it never got a finish_reason (a cut stream is not cached)."""
    deltas: list[Mapping[str, Any]] = []
    finish_reason, usage = None, Usage()
    for chunk in chunks:
        if chunk.delta:
            deltas.append(dict(chunk.delta))
        finish_reason = chunk.finish_reason or finish_reason
        usage = chunk.usage or usage
        served_model = chunk.served_model or served_model
    if finish_reason is None:
        return None
    return CachedResponse(
        message=merge_deltas(deltas),
        finish_reason=finish_reason,
        usage=usage,
        served_model=served_model,
        backend=backend,
        cost_micro_usd=cost_micro_usd,
        deltas=tuple(deltas),
        route_reason=route_reason,
    )


def merge_deltas(deltas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Fold OpenAI stream deltas into the assistant message a non-streamed call would have returned."""
    role, text, calls = "assistant", list[str](), dict[int, dict[str, Any]]()
    for delta in deltas:
        role = delta.get("role") or role
        if delta.get("content"):
            text.append(delta["content"])
        for part in delta.get("tool_calls") or ():
            call = calls.setdefault(part.get("index", 0), {"id": None, "type": "function", "function": {}})
            call["id"] = part.get("id") or call["id"]
            call["type"] = part.get("type") or call["type"]
            for field in ("name", "arguments"):
                piece = (part.get("function") or {}).get(field)
                if piece:
                    call["function"][field] = call["function"].get(field, "") + piece
    message: dict[str, Any] = {"role": role, "content": "".join(text) if text or not calls else None}
    for call in calls.values():
        # A call without arguments streams none (or only ""), but a whole message always has the string:
        # clients json.loads it, and the OpenAI SDK would read a missing one as None.
        call["function"].setdefault("arguments", "")
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


def encode_entry(entry: CachedResponse) -> bytes:
    return orjson.dumps(
        {
            "v": ENTRY_VERSION,
            "message": dict(entry.message),
            "finish_reason": entry.finish_reason,
            "usage": [entry.usage.prompt_tokens, entry.usage.completion_tokens],
            "served_model": entry.served_model,
            "backend": entry.backend,
            "cost_micro_usd": entry.cost_micro_usd,
            "deltas": None if entry.deltas is None else [dict(d) for d in entry.deltas],
            "route": entry.route_reason,
            **({} if entry.vectors is None else {"vectors": entry.vectors}),
        }
    )


def decode_entry(raw: bytes | str) -> CachedResponse | None:
    """The entry, or None for anything written by another version or otherwise unreadable."""
    try:
        data = orjson.loads(raw)
        if not isinstance(data, dict) or data.get("v") != ENTRY_VERSION:
            return None
        prompt_tokens, completion_tokens = data["usage"]
        deltas, vectors = data["deltas"], data.get("vectors")
        return CachedResponse(
            message=data["message"],
            finish_reason=data["finish_reason"],
            usage=Usage(int(prompt_tokens), int(completion_tokens)),
            served_model=data["served_model"],
            backend=data["backend"],
            cost_micro_usd=int(data["cost_micro_usd"]),
            deltas=None if deltas is None else tuple(deltas),
            route_reason=str(data["route"]),
            vectors=None if vectors is None else tuple(tuple(float(x) for x in v) for v in vectors),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


# ---- stores ----------------------------------------------------------------------------------------------


class ResponseCache(Protocol):
    """A store that never raises: a failure reads as a miss, and a write that cannot happen is skipped."""

    async def get(self, key: str) -> CachedResponse | None: ...

    async def put(self, key: str, value: CachedResponse, ttl_s: float) -> None: ...


class MemoryCache:
    """In-process LRU with per-entry TTL, bounded by entry count and total bytes. Event-loop use only."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 256 << 20,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries, self.max_bytes, self._clock = max_entries, max_bytes, clock
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires_at, raw)
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CachedResponse | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return decode_entry(found[1])  # stored as bytes: every hit gets its own copy, sizes are exact

    async def put(self, key: str, value: CachedResponse, ttl_s: float) -> None:
        raw = encode_entry(value)
        if ttl_s <= 0 or len(raw) > self.max_entry_bytes:
            return
        # orjson's bytes keep its whole output buffer (4 KiB for a 200-byte entry): an exact-size copy, so
        # that bytes_used (and max_bytes) is what the entries really hold.
        raw = memoryview(raw).tobytes()
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + ttl_s, raw)
        self.bytes_used += len(raw)
        while len(self._entries) > self.max_entries or self.bytes_used > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        self.bytes_used -= len(self._entries.pop(key)[1])


class RedisClient(Protocol):
    """The two calls we make on a `redis.asyncio.Redis` (a protocol, so `redis` stays an optional install)."""

    def get(self, name: str) -> Awaitable[bytes | str | None]: ...

    def set(self, name: str, value: bytes, *, px: int) -> Awaitable[Any]: ...


class RedisCache:
    """Entries under `<prefix><key>` with GET / SET PX. Each call is bounded by `timeout_s`."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "sb:cache:",
        timeout_s: float = 0.05,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client, self.prefix, self.timeout_s = client, prefix, timeout_s
        self.max_entry_bytes = max_entry_bytes
        self._outage = OutageGuard(
            log,
            "response cache",
            retry_after_s=retry_after_s,
            clock=clock,
            while_down="bypassing the cache",
            when_back="cache in use again",
        )
        from redis.exceptions import RedisError  # only a Redis-backed cache needs the package

        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

    async def get(self, key: str) -> CachedResponse | None:
        if self._outage.skipping:
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self._client.get(self.prefix + key)
        except self._errors as exc:
            self._outage.failed("GET", exc)
            return None
        self._outage.succeeded()
        return None if raw is None else decode_entry(raw)

    async def put(self, key: str, value: CachedResponse, ttl_s: float) -> None:
        raw = encode_entry(value)
        ttl_ms = int(ttl_s * 1000)
        if ttl_ms <= 0 or len(raw) > self.max_entry_bytes or self._outage.skipping:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.set(self.prefix + key, raw, px=ttl_ms)
        except self._errors as exc:
            self._outage.failed("SET", exc)
            return
        self._outage.succeeded()
