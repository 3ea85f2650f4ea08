"""Seeded traces for the routing evaluation: who asks what, when, and how private it is.

A trace is a list of `Request`s sorted by arrival: diurnal or bursty arrivals (a non-homogeneous Poisson
process, drawn by thinning), lognormal and Pareto prompt and output lengths, teams with their privacy floors
and SLOs, 20% of prompts with planted sensitive data, and agent sessions whose turns share a long system
prompt and, turn after turn, the conversation so far (`history_tokens`; a turn whose history was not cut
short starts with its previous turn's whole prompt: `follows`). Each request's floor comes from the real
detectors (`routing.privacy.detect_request` on its generated text, then `privacy_floor`), never from the
planted label. Invariant: the same (workload, seed, rate, duration) gives the same trace, request for request.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from routing.privacy import PrivacyTier, SensitivePolicy, detect_request, privacy_floor

SENSITIVE_SHARE = 0.2

DEADLINE_PER_TARGET = 2.0  # a team's first-token deadline, in multiples of its p95 TTFT target


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    share: float  # of the requests (agent turns included)
    floor: PrivacyTier
    objective: str  # the team's routing objective: latency | cost | balanced
    slo_p95_ttft_ms: float | None
    slo_p95_e2e_ms: float | None
    agents: bool = False  # its requests are turns of shared-prefix agent sessions
    output_median: int = 60
    max_tokens: int = 256  # what its clients send; outputs are cut there

    @property
    def max_ttft_ms(self) -> float | None:
        """Its first token's hard deadline (`teams.X.max_ttft_ms`): twice its p95 TTFT target. Switchboard
        refuses (503) a request that may not leave when every box it may use is predicted past it."""
        return None if self.slo_p95_ttft_ms is None else DEADLINE_PER_TARGET * self.slo_p95_ttft_ms


TEAMS = (
    Team("support", 0.40, PrivacyTier.EXTERNAL, "latency", 2500, None),
    Team("analytics", 0.20, PrivacyTier.EXTERNAL, "cost", None, 60_000, output_median=120, max_tokens=512),
    Team("agents", 0.30, PrivacyTier.EXTERNAL, "balanced", 4000, None, agents=True, output_median=40),
    Team("hr", 0.06, PrivacyTier.INTERNAL, "balanced", 4000, None),
    Team("field", 0.04, PrivacyTier.EDGE, "latency", 8000, None),
)
TEAM_BY_NAME = {t.name: t for t in TEAMS}
AGENT_KINDS = ("triage", "coder", "researcher")  # each kind shares one long system prompt
AGENT_SYSTEM_TOKENS = 640
SYSTEM_TOKENS = 48  # every other team's short system prompt, shared within the team


@dataclass(frozen=True, slots=True)
class Request:
    rid: int
    arrival_s: float
    team: str
    prompt_tokens: int  # prefix_tokens included
    output_tokens: int
    prefix_key: str  # what leading tokens it shares with other requests (an agent kind, a team prompt)
    prefix_tokens: int
    session: int  # agent session id, -1 for none
    text: str  # the user message (a short stand-in for the whole prompt); what the detectors read
    planted: str  # kind of planted sensitive data, "" for none
    floor: PrivacyTier  # from the real detectors and the team's floor
    detected: tuple[str, ...]
    history_tokens: int = 0  # an agent turn's earlier turns (their messages and replies) in its prompt
    follows: int = -1  # rid of the session's previous turn whose whole prompt this one starts with; -1: none
    # Every earlier turn whose whole prompt this one starts with, latest first (`follows` is the first).
    ancestors: tuple[int, ...] = ()

    @property
    def earlier_turns(self) -> tuple[int, ...]:
        """The turns a box may hold a prefix of this prompt from: `ancestors`, else `follows` alone (a
        request made by hand with only that)."""
        return self.ancestors or ((self.follows,) if self.follows >= 0 else ())


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    arrivals: str  # diurnal | bursty
    agent_share: float  # replaces the agents team's share
    description: str


WORKLOADS = {
    "diurnal-chat": Workload(
        "diurnal-chat", "diurnal", 0.15,
        "one compressed day (trough, peak at mid-trace at 1.6x the mean, trough), agent turns 15%",
    ),
    "bursty-agents": Workload(
        "bursty-agents", "bursty", 0.40,
        "bursts of 3x the base rate (mean 45 s, every ~4 min), agent turns 40%",
    ),
}  # fmt: skip

_TASKS = (
    "Summarise the main risks in this plan for the platform team",
    "Draft a polite reply to the customer below and keep it short",
    "Explain what this error means and how to fix it",
    "List three follow-up questions for the meeting notes below",
    "Rewrite this paragraph so that a new engineer understands it",
)
_PROSE = (
    "the service migrates batches of records overnight while the dashboard shows stale totals and the team "
    "wants a clearer rollback plan before the next release because several customers reported slow pages"
)
_WORDS = tuple(_PROSE.split())
# Fake or documentation data in the shapes of the detectors' corpus (tests/support/privacy_corpus.py).
PLANTED = {
    "email": ("Contact me at john.doe@example.com for details.", "Reply to jane.oneil@sub.domain.example"),
    "credit_card": ("card 4111 1111 1111 1111 exp 12/27", "pay with 5500-0000-0000-0004 please"),
    "iban": ("IBAN: DE89 3704 0044 0532 0130 00", "pay GB82WEST12345698765432 today"),
    "phone": ("Call me on +44 20 7946 0958.", "US office: (212) 555-0147"),
}


def filler(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _rate_shape(workload: Workload, duration_s: float, rng: random.Random) -> Callable[[float], float]:
    """Rate multiplier over time, mean ~1 over the trace; its maximum is at most 3."""
    if workload.arrivals == "diurnal":
        return lambda t: 1.0 - 0.6 * math.cos(2 * math.pi * t / duration_s)
    bursts: list[tuple[float, float]] = []
    t = rng.expovariate(1 / 240)
    while t < duration_s:
        length = rng.expovariate(1 / 45)
        bursts.append((t, t + length))
        t += length + rng.expovariate(1 / 240)
    in_burst = sum(min(e, duration_s) - s for s, e in bursts) / duration_s
    base = 1.0 / (1 + 2.0 * in_burst)  # so that the mean multiplier is 1

    def shape(t: float) -> float:
        return base * (3.0 if any(s <= t < e for s, e in bursts) else 1.0)

    return shape


def arrival_times(
    workload: Workload, rate_per_s: float, duration_s: float, rng: random.Random
) -> list[float]:
    """A non-homogeneous Poisson process by thinning a homogeneous one at the peak rate."""
    shape = _rate_shape(workload, duration_s, rng)
    peak = 3.0 * rate_per_s
    times: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return times
        if rng.random() * peak < rate_per_s * shape(t):
            times.append(t)


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(median * math.exp(rng.gauss(0, sigma))))))


def _pareto(rng: random.Random, scale: float, alpha: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(scale * rng.paretovariate(alpha)))))


@dataclass(slots=True)
class _Session:
    sid: int
    kind: str
    history_tokens: int
    next_s: float
    turns_left: int
    last_rid: int = -1  # the previous turn, while the history still holds it whole
    whole: list[int] = field(default_factory=list)  # turns since the last cut, oldest first


def _text(rng: random.Random, planted: str) -> str:
    text = f"{rng.choice(_TASKS)}:\n{filler(rng, rng.randint(12, 60))}"
    return f"{text}\n{rng.choice(PLANTED[planted])}" if planted else text


def _shares(workload: Workload) -> tuple[list[str], list[float]]:
    others = sum(t.share for t in TEAMS if not t.agents)
    names, weights = [], []
    for t in TEAMS:
        names.append(t.name)
        weights.append(workload.agent_share if t.agents else t.share * (1 - workload.agent_share) / others)
    return names, weights


def generate(workload: Workload, *, rate_per_s: float, duration_s: float, seed: int) -> list[Request]:
    """The trace: one arrival process, each arrival a team's request or an agent session's next turn."""
    rng = random.Random(seed)
    names, weights = _shares(workload)
    sessions: list[_Session] = []
    drafts: list[tuple[float, str, int, int, str, int, int, int, int, tuple[int, ...]]] = []
    for t in arrival_times(workload, rate_per_s, duration_s, rng):
        team = TEAM_BY_NAME[rng.choices(names, weights)[0]]
        out = _lognormal(rng, team.output_median, 0.8, 1, team.max_tokens)
        if team.agents:
            due = [s for s in sessions if s.next_s <= t and s.turns_left > 0]
            if due and rng.random() < 0.8:  # mostly continue a session whose user is back
                s = due[0]
            else:
                s = _Session(len(sessions), rng.choice(AGENT_KINDS), 0, t, rng.randint(3, 10))
                sessions.append(s)
            new = _lognormal(rng, 60, 0.7, 8, 400)
            prompt = AGENT_SYSTEM_TOKENS + s.history_tokens + new
            history, follows = s.history_tokens, s.last_rid
            ancestors = tuple(reversed(s.whole)) if follows >= 0 else ()
            drafts.append(
                (t, team.name, prompt, out, f"agent:{s.kind}", AGENT_SYSTEM_TOKENS, s.sid, history, follows,
                 ancestors)
            )  # fmt: skip
            grown = s.history_tokens + new + out
            s.history_tokens = min(grown, 1200)  # past 1200 the oldest turns are cut: no whole prompt stays
            s.last_rid = len(drafts) - 1 if grown <= 1200 else -1
            s.whole = [*s.whole, len(drafts) - 1] if grown <= 1200 else []
            s.turns_left -= 1
            s.next_s = t + rng.expovariate(1 / 20)
            continue
        if team.name == "analytics":  # documents: Pareto-tailed prompts
            user = _pareto(rng, 150, 1.4, 16, 3000)
        else:
            user = _lognormal(rng, 100, 0.9, 8, 2000)
        drafts.append(
            (t, team.name, SYSTEM_TOKENS + user, out, f"team:{team.name}", SYSTEM_TOKENS, -1, 0, -1, ())
        )
    return [_finish(rid, d, rng) for rid, d in enumerate(drafts)]


def _finish(
    rid: int, draft: tuple[float, str, int, int, str, int, int, int, int, tuple[int, ...]], rng: random.Random
) -> Request:
    t, team_name, prompt, out, key, prefix, sid, history, follows, ancestors = draft
    planted = rng.choice(list(PLANTED)) if rng.random() < SENSITIVE_SHARE else ""
    text = _text(rng, planted)
    team = TEAM_BY_NAME[team_name]
    detected = detect_request([{"role": "user", "content": text}])
    verdict = privacy_floor(team.floor, None, detected, SensitivePolicy.RAISE_FLOOR)
    return Request(
        rid,
        t,
        team_name,
        prompt,
        out,
        key,
        prefix,
        sid,
        text,
        planted,
        verdict.floor,
        detected,
        history,
        follows,
        ancestors,
    )


def mean_work(trace: list[Request]) -> tuple[float, float]:
    """(mean prompt tokens, mean output tokens) per request."""
    n = max(1, len(trace))
    return sum(r.prompt_tokens for r in trace) / n, sum(r.output_tokens for r in trace) / n
