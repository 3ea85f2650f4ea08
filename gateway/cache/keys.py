"""Cache keys: what makes two requests the same question for the response cache.

Invariants: the key covers everything that changes the output and nothing that does not (`user`, `stream`,
`stream_options`); the namespace (one team by default) is hashed into it, so a team never reads another's
entry. Keyed on the internal request, so every API that asks the same thing of a model shares the answer;
embeddings calls are keyed apart from chat (`kind`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from backends.base import ChatRequest, EmbeddingRequest

KEY_VERSION = 2  # bump when key normalisation changes: old entries then simply miss
# Routing preferences that restrict *which backend may answer*. A hit must not hand a client an answer from
# a backend it excluded, so these are in the key. The rest (sort, order, max_price, max_latency_ms,
# max_ttft_ms, allow_fallbacks, require_parameters) only rank or cap, and a hit (cost 0, sub-ms) satisfies
# any cap.
_ELIGIBILITY_PREFS = ("only", "ignore")


# ---- keys and rules ---------------------------------------------------------------------------------------


def cache_namespace(team: str, *, shared_as: str | None = None) -> str:
    """`team:<name>`, or `shared:<group>` where config lets teams share answers."""
    return f"shared:{shared_as}" if shared_as else f"team:{team}"


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _name_set(raw: Any) -> Any:
    if isinstance(raw, list) and all(isinstance(n, str) for n in raw):
        return sorted(set(raw))
    return raw  # malformed prefs are refused elsewhere; keep them distinct rather than guess


def cache_key(
    namespace: str, call: ChatRequest | EmbeddingRequest, preferences: Mapping[str, Any] | None = None
) -> str:
    """`<namespace>:<sha256 hex>` over the canonical form of everything that affects the output.

    Keyed on the internal request, so every API that asks the same thing of a model shares the answer."""
    prefs = preferences or {}
    route = {p: _name_set(prefs[p]) for p in _ELIGIBILITY_PREFS if prefs.get(p) is not None}
    canonical: dict[str, Any]
    if isinstance(call, EmbeddingRequest):  # `kind`: never equal to a chat request's form
        canonical = {"kind": "embedding", "inputs": list(call.inputs), "dimensions": call.dimensions}
        canonical.update(v=KEY_VERSION, ns=namespace, model=call.model, route=route)
    else:
        canonical = _chat_form(call, namespace, route)
    payload = orjson.dumps({k: v for k, v in canonical.items() if v is not None}, option=orjson.OPT_SORT_KEYS)
    return f"{namespace}:{hashlib.sha256(payload).hexdigest()}"


def _chat_form(call: ChatRequest, namespace: str, route: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": KEY_VERSION,
        "ns": namespace,
        "model": call.model,
        "messages": [_drop_none(dict(m)) for m in call.messages],
        "max_tokens": call.max_tokens,
        "temperature": call.temperature,
        "top_p": call.top_p,
        "stop": sorted(set(call.stop)),  # a set: order and duplicates do not change output
        "seed": call.seed,
        "tools": list(call.tools) if call.tools is not None else None,
        "tool_choice": call.tool_choice,
        "response_format": call.response_format,
        "prompt": call.prompt,  # a raw completion and its chat translation are different requests
        # anthropic-beta and the like may change the answer: requests that differ in them share nothing
        "headers": sorted(call.passthrough_headers) or None,
        "route": route,
    }


def cacheable(call: ChatRequest | EmbeddingRequest, *, opt_in: bool) -> bool:
    """Deterministic (temperature 0, a seed, embeddings) or opted in by team config or the request."""
    if isinstance(call, EmbeddingRequest):
        return True
    return opt_in or call.temperature == 0 or call.seed is not None
