"""The prefix key of a chat request, for prefix affinity across engine replicas (`routing.placement`).

A session is known by its opening: the messages up to and including the first one that is not a system or
developer message (system prompt + first user turn). Every later turn of the same conversation, and every
request that opens the same way, gets the same key, so rendezvous hashing sends them to the replica whose
prefix cache holds that opening. Openings shorter than `min_chars` get no key (little to reuse); only the
first `max_chars` characters are hashed. The key is a stable 64-bit hash: equal on every gateway replica.
`cached_messages` says how much of a later turn the key's replica should hold in its prefix cache.
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
    if min_chars <= 0 or not messages:
        return None
    parts: list[str] = []
    size = 0
    for message in messages:
        text = f"{message.get('role', '')}\x00{content_text(message.get('content'))}\x1e"
        parts.append(text)
        size += len(text)
        if size >= max_chars or message.get("role") not in _LEADING:
            break
    if size < min_chars:
        return None
    opening = "".join(parts)[:max_chars]
    return int.from_bytes(hashlib.blake2b(opening.encode(), digest_size=8).digest(), "big")


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
