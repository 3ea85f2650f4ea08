"""The naive policies Switchboard is compared with, as their users would configure them.

None of them knows privacy floors: a sensitive request they send to the cloud is counted as a violation,
not prevented. They see what their real counterparts see: LiteLLM's router keeps in-flight counts and recent
latencies per deployment; a fallback list sees errors. "Error" for a self-hosted replica is a full queue
(`FULL_QUEUE` requests waiting): the replica answers 503 at once and the request falls back to the cloud,
which is kinder to that baseline than a timeout would be.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bench.routing_eval.sim import CLOUD, Job, Simulation
from bench.routing_eval.workload import Request

FULL_QUEUE = 8


class _Base:
    name = ""

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        raise NotImplementedError

    def observe(self, job: Job) -> None:
        return None


class AlwaysCloud(_Base):
    name = "always-cloud"

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        return CLOUD


@dataclass
class AlwaysSelfHosted(_Base):
    """Every request to the owned replicas in turn (edge nodes included), queueing when they are busy."""

    name: str = "always-self-hosted"
    _next: int = 0

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        names = [b.name for b in sim.fleet.owned]
        self._next += 1
        return names[self._next % len(names)]


@dataclass
class RoundRobin(_Base):
    """LiteLLM's simple rotation over every deployment of the model: owned replicas, edge nodes, cloud."""

    name: str = "round-robin"
    _next: int = 0

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        names = [*sim.boxes, CLOUD]
        self._next += 1
        return names[self._next % len(names)]


def _in_flight(sim: Simulation, name: str) -> int:
    return sim.cloud_in_flight if name == CLOUD else sim.boxes[name].in_system


@dataclass
class LeastBusy(_Base):
    """LiteLLM's `least-busy`: the deployment with the fewest requests in flight (ties: config order)."""

    name: str = "least-busy"

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        return min([*sim.boxes, CLOUD], key=lambda n: _in_flight(sim, n))


@dataclass
class SelfHostedFirst(_Base):
    """A fallback list: owned replicas (rotated), the cloud when the chosen replica errors (queue full)."""

    name: str = "self-hosted-first"
    _next: int = 0

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        names = [b.name for b in sim.fleet.owned]
        self._next += 1
        box = sim.boxes[names[self._next % len(names)]]
        return CLOUD if len(box.waiting) >= FULL_QUEUE else box.spec.name


@dataclass
class LatencyBased(_Base):
    """LiteLLM's `latency-based-routing`: lowest mean of the last 10 latencies per output token, untried
    deployments first; each deployment is timed only by the requests it finished."""

    name: str = "latency-based"
    window: int = 10
    _recent: dict[str, deque[float]] = field(default_factory=dict)

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        def score(name: str) -> float:
            seen = self._recent.get(name)
            return sum(seen) / len(seen) if seen else 0.0

        return min([*sim.boxes, CLOUD], key=score)

    def observe(self, job: Job) -> None:
        per_token = job.e2e_s / max(1, job.req.output_tokens)
        self._recent.setdefault(job.target, deque(maxlen=self.window)).append(per_token)


def baselines() -> list[_Base]:
    return [AlwaysCloud(), AlwaysSelfHosted(), RoundRobin(), LeastBusy(), SelfHostedFirst(), LatencyBased()]
