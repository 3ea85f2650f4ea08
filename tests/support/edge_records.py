"""A registry record of one connected edge node, for the registry and relay tests."""

from __future__ import annotations

from dataclasses import replace

from gateway.edge.registry import NodeRecord


def node_record(node_id: str = "n1", *, at: float, **changes: object) -> NodeRecord:
    """Node `node_id` connected and last seen at `at` (wall seconds); `changes` replace any other field."""
    base = NodeRecord(
        node_id=node_id,
        replica="r1",
        link_id="link-1",
        token_id="et_1",
        models=("smollm2",),
        labels={"site": "plant-7"},
        max_batch=4,
        kv_cache_mb=64.0,
        tokens_per_s=21.5,
        usd_per_hour=0.25,
        version="0.1.0",
        connected_at=at,
        last_seen=at,
    )
    return replace(base, **changes)  # type: ignore[arg-type]
