"""Which requests the response cache may answer or keep, under which key and for how long.

Cached: deterministic requests (temperature 0 or a seed), every request of a team with `cache_all`, or a
request that sends `x-switchboard-cache: on` (`off` opts out). Keys are per team unless teams share a
`cache_share` group. `Cache-Control: no-cache` skips the lookup, `no-store` the write. A hit is served only
when the backend that produced it may serve this request now (privacy floor, only/ignore), so a cached
answer never reaches a client whose policy would have kept it from that backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backends.base import ChatRequest, EmbeddingRequest
from gateway.cache.keys import cache_key, cache_namespace, cacheable
from gateway.cache.store import CachedResponse, ResponseCache, directives
from gateway.config import Config


@dataclass(frozen=True, slots=True)
class CachePlan:
    key: str
    ttl_s: float
    read: bool
    write: bool


def ttl_s(config: Config, team: str, model: str) -> float:
    """teams.X.cache_ttl_s, else models.Y.cache_ttl_s, else cache.ttl_s."""
    team_cfg = config.teams.get(team)
    if team_cfg is not None and team_cfg.cache_ttl_s is not None:
        return team_cfg.cache_ttl_s
    model_cfg = config.models.get(model)
    if model_cfg is not None and model_cfg.cache_ttl_s is not None:
        return model_cfg.cache_ttl_s
    return config.cache.ttl_s


def plan_cache(
    config: Config,
    team: str,
    call: ChatRequest | EmbeddingRequest,
    cache_control: str | None,
    opt: str | None,
    preferences: Mapping[str, Any] | None = None,
) -> CachePlan | None:
    """None when this request neither reads nor writes the cache."""
    if not config.cache.enabled:
        return None
    opt = (opt or "").strip().lower()
    if opt == "off":
        return None
    ttl = ttl_s(config, team, call.model)
    team_cfg = config.teams.get(team)
    opt_in = opt == "on" or (team_cfg is not None and team_cfg.cache_all)
    if ttl <= 0 or not cacheable(call, opt_in=opt_in):
        return None
    wanted = directives(cache_control)
    if wanted.no_cache and wanted.no_store:
        return None
    namespace = cache_namespace(team, shared_as=team_cfg.cache_share if team_cfg is not None else None)
    return CachePlan(cache_key(namespace, call, preferences), ttl, not wanted.no_cache, not wanted.no_store)


class CacheStep:
    """The pipeline's cache step: which requests it may answer or keep, and the store behind it."""

    def __init__(self, config: Config, cache: ResponseCache) -> None:
        self.config, self.cache = config, cache

    def plan(
        self,
        team: str,
        call: ChatRequest | EmbeddingRequest,
        cache_control: str | None,
        opt: str | None,
        preferences: Mapping[str, Any] | None = None,
    ) -> CachePlan | None:
        return plan_cache(self.config, team, call, cache_control, opt, preferences)

    async def get(self, plan: CachePlan) -> CachedResponse | None:
        return await self.cache.get(plan.key)

    async def put(self, plan: CachePlan, entry: CachedResponse) -> None:
        await self.cache.put(plan.key, entry, plan.ttl_s)
