"""Public models that share one owned box: what one has running there, the others must wait behind.

Two public names may route to one backend (an alias such as `auto` beside the model's own name). Routing sees
each as its own deployment (`model@backend`) with its own counts, but the box's slots, its queue of prompts
and its prefix cache are one. `BoxPeers` sums this replica's in-flight requests, pending prompt tokens and KV
tokens written over the deployments on the same curve-described backend (`backends.X.capacity`), so the
prediction for one counts what the others have there between the engine's /metrics readings as well as at
them, and a holder's prefix is judged evicted by everything written on its box. A conversation's holder,
recorded under the name its last turn asked for, is the same box for a turn that asks for it under another
(`under`). Backends without a curve (the cloud, a box routing knows nothing about) keep their deployments'
counts apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from gateway.live.stats import Load, StatsBook
from routing.snapshot import DeploymentSpec, DeploymentStats

Entries = dict[str, tuple[DeploymentSpec, DeploymentStats]]


class BoxPeers:
    """For each curve deployment that shares its backend, the deployments (itself included) on it. A box
    under one name is left out, so its counts are read as they are (`_patched` asks on every load change)."""

    def __init__(self, specs: Mapping[str, DeploymentSpec]) -> None:
        by_backend: dict[str, list[str]] = {}
        for dep_id, spec in specs.items():
            if spec.capacity is not None:
                by_backend.setdefault(spec.backend, []).append(dep_id)
        shared = [tuple(ids) for ids in by_backend.values() if len(ids) > 1]
        self._peers = {dep_id: ids for ids in shared for dep_id in ids}
        self._model = {dep_id: spec.public_model for dep_id, spec in specs.items()}

    def load(self, stats: StatsBook, dep_id: str) -> Load:
        """`StatsBook.load_of` summed over the box."""
        peers = self._peers.get(dep_id)
        if peers is None:
            return stats.load_of(dep_id)
        return Load(*(sum(column) for column in zip(*(stats.load_of(peer) for peer in peers), strict=True)))

    def under(self, dep_id: str, public_model: str) -> str | None:
        """The deployment serving `public_model` on `dep_id`'s box (`dep_id` itself when it does), None when
        the box does not serve that name."""
        for peer in self._peers.get(dep_id, (dep_id,)):
            if self._model.get(peer) == public_model:
                return peer
        return None

    def written(self, stats: StatsBook, dep_id: str) -> int:
        """`StatsBook.kv_written_of` summed over the box: what its prefix cache has had to make room for."""
        return sum(stats.kv_written_of(peer) for peer in self._peers.get(dep_id, (dep_id,)))

    def pooled(self, entries: Entries) -> Entries:
        """`entries` with a shared box's load (the `Load` counts: in flight, prompts pending and their
        context), its deployments' sum, on each deployment it serves (counts merged from other gateway
        replicas included)."""
        if not self._peers:
            return entries
        out = dict(entries)
        for dep_id, peers in self._peers.items():
            if dep_id not in entries:
                continue
            rows = [entries[p][1] for p in peers if p in entries]
            spec, stats = entries[dep_id]
            summed = {f: sum(getattr(s, f) for s in rows) for f in Load._fields}
            out[dep_id] = (spec, dataclasses.replace(stats, **summed))
        return out
