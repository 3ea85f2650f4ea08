"""Where a batch item runs: self-hosted or edge capacity while it has room, cloud as the window closes.

`Placer.place` returns a `Placement` (a narrowing of the team's policy, never a widening) or None: wait,
self-hosted capacity is busy. Self-hosted means a deployment that is not a cloud API and not of the
`external` tier. It has room while its engine's queue is empty or its KV use is below batch.kv_room_frac
(the engine pollers feed both into routing stats). Once `spill` (the window's end is within
batch.spill_slack_s), cloud deployments go first. A placement under which routing finds no candidate (say a
self-hosted deployment lacks tools) is dropped for routing's own choice, checked with the side-effect-free
planner so the item still gets exactly one ledger row.
"""

from __future__ import annotations

from backends.base import BackendKind
from backends.errors import SwitchboardError
from gateway.config import BatchConfig
from gateway.live.state import RoutingState
from gateway.pipeline.plan import plan
from gateway.pipeline.request import GatewayRequest, Placement
from routing.privacy import PrivacyTier
from routing.snapshot import Entry

ANYWHERE = Placement()


def self_hosted(entry: Entry) -> bool:
    spec = entry.spec
    return spec.backend_kind is not BackendKind.CLOUD and spec.privacy_tier is not PrivacyTier.EXTERNAL


class Placer:
    def __init__(self, routing: RoutingState, config: BatchConfig) -> None:
        self._routing, self._config = routing, config

    def has_room(self, entry: Entry) -> bool:
        stats = entry.stats
        return entry.healthy and (
            stats.queue_depth == 0 or stats.kv_cache_used_frac < self._config.kv_room_frac
        )

    def place(self, request: GatewayRequest, *, spill: bool, now_s: float) -> Placement | None:
        entries = self._routing.snapshot(now_s).by_model.get(request.model, ())
        own = [e for e in entries if self_hosted(e)]
        cloud = tuple(sorted({e.spec.backend for e in entries if not self_hosted(e)}))
        if spill:
            return Placement(order=cloud) if cloud else ANYWHERE
        if not own:
            return ANYWHERE  # nothing self-hosted serves this model: the cloud at its batch price
        busy = {e.spec.backend for e in own if not self.has_room(e)}
        if len(busy) == len({e.spec.backend for e in own}):
            return None
        placement = Placement(ignore=frozenset(cloud) | busy)
        return placement if self._routable(request, placement, now_s) else ANYWHERE

    def _routable(self, request: GatewayRequest, placement: Placement, now_s: float) -> bool:
        try:
            routed = plan(
                self._routing,
                request.identity.team,
                request.call,
                request.hints,
                request.preferences,
                now_s=now_s,
                placement=placement,
            )
        except SwitchboardError:  # the request itself is refused: the pipeline will say why, in its row
            return True
        return bool(routed.decision.candidates)
