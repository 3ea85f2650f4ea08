"""The prefix key of a chat request, for prefix affinity across engine replicas (`routing.placement`).

A session is known by its opening: the messages up to and including the first one that is not a system or
developer message (system prompt + first user turn). Every later turn of the same conversation, and every
request that opens the same way, gets the same key, so rendezvous hashing sends them to the replica whose
prefix cache holds that opening. Openings shorter than `min_chars` get no key (little to reuse); only the
first `max_chars` characters are hashed. The key is a stable 64-bit hash: equal on every gateway replica.
`cached_messages` says how much of a later turn the key's replica should hold in its prefix cache.
`prefix_keys` also keys the system prompt alone: a conversation no replica holds yet (a first turn, or one
whose replica has written too much since) counts on the replica that last served its system prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from backends.base import content_text
from routing.decision import RouteDecision

_LEADING = frozenset(("system", "developer"))


def prefix_key(messages: Sequence[Mapping[str, Any]], *, min_chars: int, max_chars: int) -> int | None:
    """64-bit key of the conversation's opening, or None when it is shorter than `min_chars` (0: off)."""
    return prefix_keys(messages, min_chars=min_chars, max_chars=max_chars)[0]


def prefix_keys(
    messages: Sequence[Mapping[str, Any]], *, min_chars: int, max_chars: int
) -> tuple[int | None, int | None, int]:
    """(the opening's key, the system prompt's key, how many leading messages that system prompt is).

    The system prompt is the leading system and developer messages: what every conversation of one agent or
    app starts with, so the replica that served any of them holds it in its prefix cache. Its key is None
    when it is shorter than `min_chars`, when the opening is all system prompt (the opening's key then
    names the same text), or when the opening's key is None."""
    if min_chars <= 0 or not messages:
        return None, None, 0
    parts: list[str] = []
    size, system_size, system_count = 0, 0, 0
    for message in messages:
        text = f"{message.get('role', '')}\x00{content_text(message.get('content'))}\x1e"
        leading = message.get("role") in _LEADING
        if leading and system_count == len(parts):
            system_count += 1
            system_size = size + len(text)
        parts.append(text)
        size += len(text)
        if size >= max_chars or not leading:
            break
    if size < min_chars:
        return None, None, 0
    opening = "".join(parts)[:max_chars]
    key = _key(opening)
    if system_size < min_chars or system_count == len(parts) or system_size > max_chars:
        return key, None, 0
    return key, _key(opening[:system_size]), system_count


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def cached_messages(messages: Sequence[Mapping[str, Any]]) -> int:
    """Leading messages a later turn shares with what its conversation's replica already served: all but the
    last, once the conversation runs past its opening (the previous turn's prompt and reply); 0 for an
    opening (its replica holds at most what other sessions left there)."""
    opening = next((i + 1 for i, m in enumerate(messages) if m.get("role") not in _LEADING), len(messages))
    return len(messages) - 1 if len(messages) > opening else 0


def held_prefix(decision: RouteDecision, holder: str | None, tokens: int) -> tuple[str, int]:
    """(backend, `tokens`) of the ranked deployment `holder`, expected to hold that much of the prompt in
    its prefix cache; ("", 0) when it is not ranked (or there is none)."""
    ranked = (c for c in decision.ranked if c.deployment_id == holder)
    return next(((c.deployment.backend, tokens) for c in ranked), ("", 0))
