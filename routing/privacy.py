"""Privacy tiers, sensitive-data detection and the privacy floor of a request.

`PrivacyTier` is ordered from most to least private: a request whose floor is P may only reach a backend whose
tier is P or more private. Detectors (in `routing.detectors`, re-exported here) report the kinds of what they
found and where, never the matched text. Invariant of `privacy_floor`: the floor it returns is never less
private than the team's floor; a request may only raise it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from routing.detectors import Detection, DetectorKind, detect
from routing.request_scan import detect_request

__all__ = [
    "Detection",
    "DetectorKind",
    "PrivacyTier",
    "PrivacyVerdict",
    "SensitiveDataBlocked",
    "SensitivePolicy",
    "detect",
    "detect_messages",
    "detect_request",
    "privacy_floor",
]


class PrivacyTier(StrEnum):
    EDGE = "edge"  # the data stays on the device or site
    INTERNAL = "internal"  # our own network
    EXTERNAL_ZDR = "external_zdr"  # a cloud under a zero-retention contract
    EXTERNAL = "external"  # any cloud

    @property
    def rank(self) -> int:
        """0 is the most private."""
        return _RANK[self]

    def allows(self, backend_tier: PrivacyTier) -> bool:
        """True when a request with this floor may be served by a backend of `backend_tier`."""
        return backend_tier.rank <= self.rank


_RANK = {PrivacyTier.EDGE: 0, PrivacyTier.INTERNAL: 1, PrivacyTier.EXTERNAL_ZDR: 2, PrivacyTier.EXTERNAL: 3}


class SensitivePolicy(StrEnum):
    """What a team wants done with a request in which a detector fired."""

    RAISE_FLOOR = "raise_floor"  # serve it, but no less private than `internal`
    BLOCK = "block"  # refuse it
    ALLOW = "allow"  # route it as if nothing had been found


SENSITIVE_FLOOR = PrivacyTier.INTERNAL


class SensitiveDataBlocked(Exception):
    """A detector fired and the team's policy is `block`; carries the kinds found, never the text."""

    def __init__(self, kinds: tuple[DetectorKind, ...]) -> None:
        self.kinds = kinds
        super().__init__(
            f"the request contains sensitive data ({', '.join(kinds)}) and this team blocks such requests; "
            "remove it, or ask an admin to set the team's on_sensitive to raise_floor or allow"
        )


@dataclass(frozen=True, slots=True)
class PrivacyVerdict:
    floor: PrivacyTier
    detections: tuple[DetectorKind, ...]  # distinct, sorted
    reason: str


def privacy_floor(
    team_floor: PrivacyTier,
    requested: PrivacyTier | None,
    detections: Iterable[DetectorKind],
    on_sensitive: SensitivePolicy = SensitivePolicy.RAISE_FLOOR,
) -> PrivacyVerdict:
    """The floor a request is routed under: the team's, raised by the request and by what was detected.

    Raises `SensitiveDataBlocked` when something was detected and `on_sensitive` is `block`.
    """
    kinds = tuple(sorted(set(detections)))
    floor, reasons = team_floor, [f"team floor {team_floor}"]
    if requested is not None:
        if requested.rank < floor.rank:
            floor = requested
            reasons.append(f"request raised it to {requested}")
        elif requested != floor:
            reasons.append(f"request asked for {requested}, ignored: a request cannot lower the team floor")
    if kinds:
        found = f"detected {', '.join(kinds)}"
        if on_sensitive is SensitivePolicy.BLOCK:
            raise SensitiveDataBlocked(kinds)
        if on_sensitive is SensitivePolicy.ALLOW:
            reasons.append(f"{found}; allowed by policy")
        elif SENSITIVE_FLOOR.rank < floor.rank:
            floor = SENSITIVE_FLOOR
            reasons.append(f"{found}; raised to {SENSITIVE_FLOOR}")
        else:
            reasons.append(f"{found}; already at {floor} or more private")
    return PrivacyVerdict(floor=floor, detections=kinds, reason="; ".join(reasons))


def detect_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[DetectorKind, ...]:
    """The distinct kinds of sensitive data in a chat request's messages (every field of each), sorted.
    `detect_request(messages, extras)` also scans the request-level fields that reach a backend."""
    return detect_request(messages)
