"""What the console's pages read besides the Overview (gateway/console/overview.py): recent routing decisions
from the ledger's route columns, the routing state's live view of each deployment, and batches with their
item counts and files.

Invariant: every reader that can see the ledger takes a `team` (None only for the admin) and filters on it
in SQL, so a team session's figures are its own. Synchronous SQL: run on the report pool or a thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.live.state import RoutingState
from gateway.store.db import batch_items, batches, files, usage


def recent_decisions(engine: Engine, limit: int, team: str | None = None) -> list[dict[str, Any]]:
    """The newest ledger rows with their routing decision: reason, ranked candidates with score terms."""
    u = usage.c
    cols = (
        u.request_id, u.created_at, u.team, u.key_id, u.requested_model, u.backend, u.status, u.http_status,
        u.latency_ms, u.ttft_ms, u.privacy_class, u.route_reason, u.route_candidates, u.attempts,
        u.cost_micro_usd, u.endpoint,
    )  # fmt: skip
    stmt = sa.select(*cols).order_by(u.created_at.desc()).limit(limit)
    if team is not None:
        stmt = stmt.where(u.team == team)
    with engine.connect() as conn:
        rows = [_plain(r) for r in conn.execute(stmt).mappings()]
    for row in rows:
        row["candidates"] = _candidates(row.pop("route_candidates"))
    return rows


def _plain(row: Any) -> dict[str, Any]:
    """A row as a dict with plain `str` keys (SQLAlchemy's are a str subclass that orjson refuses)."""
    return {str(k): v for k, v in row.items()}


def _candidates(text: str | None) -> list[dict[str, Any]]:
    if not text:
        return []
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return []
    return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []


def deployments(routing: RoutingState, now_s: float) -> list[dict[str, Any]]:
    """Each deployment as routing sees it now: health, circuit breaker, live latency and load."""
    out = []
    for dep_id, (spec, stats) in sorted(routing.snapshot(now_s).deployments.items()):
        open_until = stats.circuit_open_until_s
        if open_until is None or open_until <= now_s:
            breaker = "closed"
        else:
            breaker = "open" if math.isinf(open_until) else f"open ({open_until - now_s:.0f} s left)"
        out.append(
            {
                "deployment": dep_id,
                "model": spec.public_model,
                "backend": spec.backend,
                "kind": str(spec.backend_kind),
                "privacy": str(spec.privacy_tier),
                "healthy": stats.healthy,
                "breaker": breaker,
                "p50_latency_ms": stats.p50_latency_ms or None,
                "p95_latency_ms": stats.p95_latency_ms or None,
                "ttft_ms": stats.ttft_ms,
                "tokens_per_s": round(stats.decode_tokens_per_s, 1),
                "error_rate": stats.error_rate,
                "in_flight": stats.in_flight,
                "queue_depth": stats.queue_depth,
                "kv_used_frac": stats.kv_cache_used_frac,
                "samples": stats.sample_count,
            }
        )
    return out


def recent_batches(engine: Engine, limit: int, team: str | None = None) -> list[dict[str, Any]]:
    """The newest batches with their items' counts by state and their files' names and sizes."""
    b = batches.c
    stmt = sa.select(
        b.id, b.team, b.endpoint, b.status, b.created_at, b.expires_at, b.completed_at,
        b.input_file_id, b.output_file_id, b.error_file_id,
    ).order_by(b.created_at.desc()).limit(limit)  # fmt: skip
    if team is not None:
        stmt = stmt.where(b.team == team)
    with engine.connect() as conn:
        rows = [_plain(r) for r in conn.execute(stmt).mappings()]
        ids = [r["id"] for r in rows]
        counts = _item_counts(conn, ids)
        file_ids = {r[k] for r in rows for k in ("input_file_id", "output_file_id", "error_file_id") if r[k]}
        named = _files(conn, sorted(file_ids))
    for row in rows:
        row["counts"] = counts.get(row["id"], {})
        total = sum(row["counts"].values())
        finished = sum(row["counts"].get(s, 0) for s in ("done", "failed", "cancelled"))
        row["total"], row["progress"] = total, (finished / total if total else 0.0)
        row["files"] = {k: named.get(row[k]) for k in ("input_file_id", "output_file_id", "error_file_id")}
    return rows


def _item_counts(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, int]]:
    if not ids:
        return {}
    i = batch_items.c
    stmt = sa.select(i.batch_id, i.state, sa.func.count()).where(i.batch_id.in_(ids))
    out: dict[str, dict[str, int]] = {}
    for batch_id, state, n in conn.execute(stmt.group_by(i.batch_id, i.state)):
        out.setdefault(batch_id, {})[state] = int(n)
    return out


def _files(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    if not ids:
        return {}
    f = files.c
    stmt = sa.select(f.id, f.filename, f.bytes, f.lines).where(f.id.in_(ids))
    return {
        r.id: {"id": r.id, "filename": r.filename, "bytes": r.bytes, "lines": r.lines}
        for r in conn.execute(stmt)
    }
