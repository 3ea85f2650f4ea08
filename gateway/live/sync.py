"""Share routing evidence between gateway replicas through Redis: live stats and circuit-breaker trips.

Each replica publishes only its own numbers and its own trips under one key (PX a few sync intervals, so a
dead replica drops out) and reads the other live replicas' keys: one script run per sync, off the request
path. The merged view reaches routing through `RoutingState.set_shared`; remote numbers never enter the local
`StatsBook`, so nothing is counted twice. A trip elsewhere forces the local breaker open until the same
moment. `sync_once` never raises for Redis: an outage costs one `timeout_s` per `retry_after_s`, is logged
once, and each replica routes on its own evidence meanwhile. Times cross replicas as wall-clock ms (clocks
kept in step, e.g. by NTP) and become this replica's monotonic seconds on arrival.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import orjson

from gateway.background import cancel_and_wait, raise_if_cancelling
from gateway.live.state import RoutingState
from gateway.live.stats import NO_EVIDENCE, Evidence, LiveStats, merge_stats
from gateway.outage import OutageGuard

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 2  # bump when the published shape changes: replicas on another version are ignored
TTL_INTERVALS = 3  # a replica that misses this many syncs drops out of the others' view
GRACE_INTERVALS = 4  # default time a tripping replica has to probe before the others may probe too

# KEYS[1]: set of replica ids, KEYS[2]: this replica's key. ARGV: replica id, payload, TTL ms, key prefix.
# Writes our summary, then returns [id, summary, ...] of every other replica whose key has not expired
# (ids whose key has expired are dropped from the set). One round trip; PX expiry is Redis's own clock.
_SCRIPT = """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if id ~= ARGV[1] then
    local value = redis.call('GET', ARGV[4] .. id)
    if value then out[#out + 1] = id; out[#out + 1] = value else redis.call('SREM', KEYS[1], id) end
  end
end
return out
"""


class RoutingRedis(Protocol):
    """The calls we make on a `redis.asyncio.Redis` (a protocol, so `redis` stays an optional install)."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: str) -> Awaitable[Any]: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: str) -> Awaitable[Any]: ...

    def delete(self, *names: str) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class Claim:
    """Another replica's own breaker trip: open until `open_until_s`, then that replica probes until
    `hold_until_s`. `open_until_ms` is the wall-clock value as published: it identifies the trip."""

    replica_id: str
    open_until_ms: float
    open_until_s: float
    hold_until_s: float


@dataclass(frozen=True, slots=True)
class RemoteStats:
    """One deployment as another replica last published it; times are on this replica's monotonic clock."""

    stats: LiveStats
    evidence: Evidence
    claim: Claim | None = None


# ---- merging (pure) ---------------------------------------------------------------------------------------


def leading_claims(replicas: Mapping[str, Mapping[str, RemoteStats]], now_s: float) -> dict[str, Claim]:
    """Deployment id -> the trip to follow: of the claims whose probe is still due, the one open longest
    (ties: the lowest replica id, so every replica picks the same)."""
    leading: dict[str, Claim] = {}
    for replica_id in sorted(replicas):
        for dep_id, remote in replicas[replica_id].items():
            claim, best = remote.claim, leading.get(dep_id)
            if claim is None or claim.hold_until_s <= now_s:
                continue
            if best is None or claim.open_until_s > best.open_until_s:
                leading[dep_id] = claim
    return leading


@dataclass(frozen=True, slots=True)
class SharedView:
    """What the other live replicas published at the last sync; ignored after `valid_until_s` (when Redis
    would have expired it too), so an outage leaves each replica on its own evidence."""

    remote: Mapping[str, tuple[RemoteStats, ...]]  # deployment id -> one per other replica
    valid_until_s: float
    engine_ttl_s: float

    def merge(
        self, local: Mapping[str, LiveStats], evidence: Mapping[str, Evidence], now_s: float
    ) -> Mapping[str, LiveStats]:
        if now_s > self.valid_until_s or not self.remote:
            return local
        merged = {}
        for dep_id, stats in local.items():
            rows = [(stats, evidence.get(dep_id, NO_EVIDENCE))]
            rows += [(r.stats, r.evidence) for r in self.remote.get(dep_id, ())]
            merged[dep_id] = merge_stats(rows, now_s=now_s, engine_ttl_s=self.engine_ttl_s)
        return MappingProxyType(merged)


# ---- wire format ------------------------------------------------------------------------------------------


# LiveStats fields by how they travel; times go as wall-clock ms. A test checks that these cover LiveStats.
_NUMBERS = ("ttft_ms", "decode_tokens_per_s", "error_rate", "latency_ms")
_MAYBE_NUMBERS = ("kv_cache_used_frac", "latency_p50_ms", "latency_p95_ms", "ttft_p95_ms")
_COUNTS = ("in_flight", "samples", "pending_prompt_tokens")
_MAYBE_COUNTS = ("queue_depth", "running")
_TIMES = ("last_update_s", "engine_at_s")
_NUMBERS_SINCE_V1 = ("ttft_tail_factor",)  # >= 1; absent from older replicas' summaries: 1
# Absent from older replicas' summaries: 0.
_NUMBERS_ZERO_WHEN_ABSENT = ("pending_prompt_context",)
_COUNTS_ZERO_WHEN_ABSENT = ("in_flight_context",)
_SENT_AS_IS = (
    *_NUMBERS, *_MAYBE_NUMBERS, *_COUNTS, *_MAYBE_COUNTS, *_NUMBERS_SINCE_V1, *_NUMBERS_ZERO_WHEN_ABSENT,
    *_COUNTS_ZERO_WHEN_ABSENT,
)  # fmt: skip


def encode_summary(
    stats: Mapping[str, LiveStats],
    evidence: Mapping[str, Evidence],
    trips: Mapping[str, tuple[float, float]],
    *,
    offset_s: float,
) -> str:
    """This replica's deployments as JSON. `trips`: deployment id -> (open_until wall ms, hold_until wall ms);
    `offset_s` = wall clock - monotonic clock, now. Deployments with nothing to tell are left out."""
    deps: dict[str, dict[str, Any]] = {}
    for dep_id, s in stats.items():
        trip = trips.get(dep_id)
        if s.samples == 0 and s.in_flight == 0 and s.engine_at_s is None and trip is None:
            continue
        row = {f: getattr(s, f) for f in _SENT_AS_IS}
        for f in _TIMES:
            t = getattr(s, f)
            row[f] = None if t is None else (t + offset_s) * 1000.0
        ev = evidence.get(dep_id, NO_EVIDENCE)
        row |= {"recent": ev.recent, "recent_ok": ev.recent_ok, "open_ms": None, "hold_ms": None}
        if trip is not None:
            row["open_ms"], row["hold_ms"] = trip
        deps[dep_id] = row
    return orjson.dumps({"v": PAYLOAD_VERSION, "deps": deps}).decode()


def _float(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"not a usable number: {value!r}")
    return number


def _maybe_float(value: Any) -> float | None:
    return None if value is None else _float(value)


def _maybe_int(value: Any) -> int | None:
    return None if value is None else int(_float(value))


def decode_summary(raw: bytes | str, *, replica_id: str, offset_s: float) -> dict[str, RemoteStats] | None:
    """Another replica's summary on this replica's clock; None if it is unreadable, of another version, or
    holds a number routing could not use (negative, NaN)."""

    def mono_s(ms: Any) -> float | None:
        return None if ms is None else _float(ms) / 1000.0 - offset_s

    try:
        data = orjson.loads(raw)
        if not isinstance(data, dict) or data.get("v") != PAYLOAD_VERSION:
            return None
        out: dict[str, RemoteStats] = {}
        for dep_id, d in data["deps"].items():
            fields: dict[str, Any] = {f: _float(d[f]) for f in _NUMBERS}
            fields |= {f: _maybe_float(d[f]) for f in _MAYBE_NUMBERS}
            fields |= {f: int(_float(d[f])) for f in _COUNTS} | {f: _maybe_int(d[f]) for f in _MAYBE_COUNTS}
            fields |= {f: mono_s(d[f]) for f in _TIMES}
            fields |= {f: max(1.0, _float(d.get(f, 1.0))) for f in _NUMBERS_SINCE_V1}
            fields |= {f: _float(d.get(f, 0.0)) for f in _NUMBERS_ZERO_WHEN_ABSENT}
            fields |= {f: int(_float(d.get(f, 0))) for f in _COUNTS_ZERO_WHEN_ABSENT}
            open_s, hold_s = mono_s(d["open_ms"]), mono_s(d["hold_ms"])
            claim = (
                None if open_s is None or hold_s is None else Claim(replica_id, d["open_ms"], open_s, hold_s)
            )
            evidence = Evidence(_float(d["recent"]), _float(d["recent_ok"]))
            out[str(dep_id)] = RemoteStats(LiveStats(**fields), evidence, claim)
        return out
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None


def by_deployment(replicas: Mapping[str, Mapping[str, RemoteStats]]) -> dict[str, tuple[RemoteStats, ...]]:
    grouped: dict[str, list[RemoteStats]] = {}
    for replica_id in sorted(replicas):
        for dep_id, remote in replicas[replica_id].items():
            grouped.setdefault(dep_id, []).append(remote)
    return {dep_id: tuple(rows) for dep_id, rows in grouped.items()}


# ---- the sync loop ----------------------------------------------------------------------------------------


class RoutingSync:
    """Every `interval_s`: publish this replica's stats and trips, read the others', apply them.

    Breakers: our own trip (open, or half-open until a probe closes it) is published as wall-clock
    open-until and hold-until = open-until + `probe_grace_s`. The others force their breaker open until the
    same moment and then hold (no probes) until hold-until, so one replica probes, not every replica; if
    the tripping one has no traffic or dies, each other one probes once the hold ends (at worst one probe
    per replica, as without sharing). When the tripping replica, still live, stops claiming the trip, its
    probe closed it: the others close too. Of two replicas that both trip, the later trip leads.
    """

    def __init__(
        self,
        client: RoutingRedis,
        state: RoutingState,
        *,
        replica_id: str,
        prefix: str = "sb:",
        interval_s: float = 0.5,
        timeout_s: float = 0.05,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        probe_grace_s: float | None = None,
    ) -> None:
        from redis.exceptions import NoScriptError, RedisError  # only a shared gateway needs the package

        if not replica_id or interval_s <= 0 or timeout_s <= 0:
            raise ValueError(
                f"need a replica_id, interval_s > 0 and timeout_s > 0; got {replica_id!r}, {interval_s}, "
                f"{timeout_s} (config: redis.routing_sync_s, redis.timeout_ms)"
            )
        self._client, self._state, self.replica_id = client, state, replica_id
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.ttl_s = TTL_INTERVALS * interval_s
        self.probe_grace_s = GRACE_INTERVALS * interval_s if probe_grace_s is None else probe_grace_s
        self._clock, self._wall_clock = clock, wall_clock
        self._index_key = f"{prefix}routing:replicas"
        self._key_prefix = f"{prefix}routing:replica:"
        self.key = self._key_prefix + replica_id
        self._sha = hashlib.sha1(_SCRIPT.encode()).hexdigest()
        self._noscript: type[BaseException] = NoScriptError
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._outage = OutageGuard(
            log,
            "routing sync",
            retry_after_s=retry_after_s,
            clock=clock,
            while_down="routing on this replica's own stats and breakers",
            when_back="sharing routing stats and breakers again",
        )
        self._trips: dict[str, tuple[float, float]] = {}  # own trips: dep -> (open_until_s, as wall ms)
        self._following: dict[str, tuple[str, float]] = {}  # dep -> (replica id, open_until_ms) applied
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"routing-sync {self.replica_id}")

    async def _run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:  # noqa: BLE001 - a background loop, like the engine loop: log, keep syncing
                log.exception("routing sync: a sync failed")
            raise_if_cancelling()  # a cancellation a Redis timeout reported as an error ends the loop too
            await asyncio.sleep(self.interval_s)

    async def sync_once(self) -> bool:
        """Publish, read and apply once; True when Redis answered. Never raises for Redis errors or
        timeouts (each round trip is bounded by `timeout_s`); skipped while a recent outage lasts."""
        if self._outage.skipping:
            return False
        now_s = self._clock()
        offset_s = self._wall_clock() - now_s
        argv = [self.replica_id, self._payload(now_s, offset_s), str(max(1, round(self.ttl_s * 1000)))]
        args = [self._index_key, self.key, *argv, self._key_prefix]
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    reply = await self._client.evalsha(self._sha, 2, *args)
                except self._noscript:  # first call on this server, or after SCRIPT FLUSH / a restart
                    reply = await self._client.eval(_SCRIPT, 2, *args)
        except self._errors as exc:
            self._outage.failed("sync", exc)
            return False
        self._outage.succeeded()
        replicas = self._decode(reply, offset_s)
        now_s = self._clock()
        self._follow(replicas, now_s)
        view = SharedView(by_deployment(replicas), now_s + self.ttl_s, self._state.stats.engine_ttl_s)
        self._state.set_shared(view)
        return True

    def _payload(self, now_s: float, offset_s: float) -> str:
        """Our summary. A trip keeps the wall-clock time it was first published with, so the others can
        tell a trip they already follow from a new one."""
        trips: dict[str, tuple[float, float]] = {}
        for dep_id, until_s in self._state.breakers.own_trips(now_s).items():
            known = self._trips.get(dep_id)
            trips[dep_id] = known if known and known[0] == until_s else (until_s, (until_s + offset_s) * 1000)
        self._trips = trips
        grace_ms = self.probe_grace_s * 1000
        wall = {dep_id: (ms, ms + grace_ms) for dep_id, (_, ms) in trips.items()}
        stats = self._state.stats
        return encode_summary(stats.snapshot(now_s), stats.evidence(now_s), wall, offset_s=offset_s)

    def _decode(self, reply: Any, offset_s: float) -> dict[str, dict[str, RemoteStats]]:
        replicas: dict[str, dict[str, RemoteStats]] = {}
        items = list(reply) if isinstance(reply, list | tuple) else []
        for raw_id, raw in zip(items[::2], items[1::2], strict=False):
            replica_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            summary = decode_summary(raw, replica_id=replica_id, offset_s=offset_s)
            if summary is None:
                log.debug("routing sync: ignoring unreadable summary of replica %s", replica_id)
                continue
            replicas[replica_id] = summary
        return replicas

    def _follow(self, replicas: Mapping[str, Mapping[str, RemoteStats]], now_s: float) -> None:
        breakers = self._state.breakers
        claims = leading_claims(replicas, now_s)
        for dep_id, claim in claims.items():
            if dep_id not in self._state.specs:
                continue  # a deployment only another replica's config has
            applied = (claim.replica_id, claim.open_until_ms)
            if self._following.get(dep_id) != applied:
                breakers.force_open(dep_id, claim.open_until_s, hold_until_s=claim.hold_until_s, now_s=now_s)
                self._following[dep_id] = applied
        for dep_id, (owner, _) in list(self._following.items()):
            if dep_id in claims:
                continue
            if owner not in replicas:
                del self._following[dep_id]  # it went away: our hold runs out and we probe ourselves
                continue
            remote = replicas[owner].get(dep_id)
            if remote is None or remote.claim is None:  # live, and no longer tripped: its probe succeeded
                breakers.release_forced(dep_id, now_s)
                del self._following[dep_id]

    async def aclose(self) -> None:
        """Stop syncing and remove our summary, so the others drop it now rather than at its expiry."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._state.set_shared(None)
        if self._outage.skipping:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.delete(self.key)
        except self._errors as exc:
            log.info(
                "routing sync: summary not removed (%s); it expires in %gs", type(exc).__name__, self.ttl_s
            )
