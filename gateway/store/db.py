"""SQL schema (teams, api_keys, usage, hourly rollups, edge tokens, stored responses, uploaded files'
metadata, batches, the audit log, console sessions); engine construction and migrations are in
gateway/store/engine.py (re-exported here).

Invariants: every datetime column holds timezone-aware UTC (`UTCDateTime` normalises on the way in and
out, also on SQLite, which has no zone type); money is integer micro-dollars; `usage.request_id` is the
primary key, so ledger inserts are idempotent. `migrations/versions/` must stay in step with these tables.
A PostgreSQL `schema` (tests isolate themselves that way) is applied through the connection's
`search_path`, so the tables themselves carry no schema name.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from gateway.live.histogram import LATENCY_PREFIX, TTFT_PREFIX, column_names
from gateway.records import LEGACY_ENDPOINT
from gateway.store.engine import (  # noqa: F401 (this module's public names before gateway/store/engine.py)
    PG_CONNECT_TIMEOUT_S,
    SQLITE_BUSY_TIMEOUT_MS,
    alembic_config,
    check_schema_name,
    make_engine,
    migrate,
    migrations_dir,
)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every dialect. Naive input is taken to be UTC already."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        # SQLite would store the offset as text and then compare strings; keep one fixed-width form.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


metadata = sa.MetaData()

teams = sa.Table(
    "teams",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("models", sa.JSON, nullable=True),  # list of public model names; NULL: every model
    sa.Column("created_at", UTCDateTime, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("team", sa.String(64), sa.ForeignKey("teams.name"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex; never the key
    sa.Column("display_prefix", sa.String(16), nullable=False),
    sa.Column("models", sa.JSON, nullable=True),  # NULL: whatever the team allows
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    # The key's own limits (NULL: none beyond the team's); checked in Redis, stored here.
    sa.Column("limit_requests", sa.Integer, nullable=True),  # per limits.window_s
    sa.Column("limit_tokens", sa.Integer, nullable=True),
    sa.Column("budget_period", sa.String(8), nullable=True),  # "day" | "month"; NULL: no budget
    sa.Column("budget_micro_usd", sa.BigInteger, nullable=True),
    sa.Column("soft_budget_micro_usd", sa.BigInteger, nullable=True),
    sa.Index("ix_api_keys_team", "team"),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("team", sa.String(64), nullable=False),  # no FK: the ledger must accept every record
    sa.Column("key_id", sa.String(32), nullable=True),
    sa.Column("requested_model", sa.Text, nullable=False),
    sa.Column("backend", sa.Text, nullable=True),
    sa.Column("served_model", sa.Text, nullable=True),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cost_micro_usd", sa.BigInteger, nullable=False),
    sa.Column("latency_ms", sa.Float(precision=53), nullable=False),
    sa.Column("ttft_ms", sa.Float(precision=53), nullable=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("http_status", sa.Integer, nullable=False),
    sa.Column("error_type", sa.String(64), nullable=True),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False),
    sa.Column("privacy_class", sa.String(256), nullable=True),
    sa.Column("route_reason", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("route_candidates", sa.Text, nullable=True),  # JSON: ranked candidates and score terms
    sa.Column("cost_saved_micro_usd", sa.BigInteger, nullable=False, server_default="0"),  # cache hits
    # When the writer inserted the row (batch time; also for replayed spill rows). NULL: written before
    # migration 0004, taken to be written at created_at. Rollups find late rows through it.
    sa.Column("written_at", UTCDateTime, nullable=True),
    # The API that was called ("chat.completions", "embeddings", ...; GatewayRequest.endpoint). Rows from
    # before migration 0006 were all chat completions: the server default fills them.
    sa.Column("endpoint", sa.String(32), nullable=False, server_default=LEGACY_ENDPOINT),
    sa.Column("batch_id", sa.String(64), nullable=True),  # an item of a `/v1/batches` batch (migration 0009)
    # Its share of owned capacity (self-hosted, edge) for chargeback; cost_micro_usd is cloud money (0010).
    sa.Column("owned_micro_usd", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("ix_usage_created_at", "created_at"),
    sa.Index("ix_usage_team_created_at", "team", "created_at"),  # team spend per period (store/spend.py)
    sa.Index("ix_usage_key_id_created_at", "key_id", "created_at"),  # key spend per period
    sa.Index("ix_usage_written_at", "written_at"),
    sa.Index("ix_usage_batch_id", "batch_id"),
)


# Cache hits' prompt and completion tokens, cost and owned share (usage_hourly's cache_* columns): what the
# savings report takes out of each backend's row.
CACHE_MEASURES = (
    "cache_prompt_tokens",
    "cache_completion_tokens",
    "cache_cost_micro_usd",
    "cache_owned_micro_usd",
)


def _measure(name: str, type_: Any) -> sa.Column[Any]:
    return sa.Column(name, type_, nullable=False, server_default="0")


# Hourly rollups of `usage` (gateway/store/rollups.py); reports read these instead of millions of raw rows.
# One row per UTC hour and group; '' stands for "none" in the key columns (a primary key cannot be NULL).
usage_hourly = sa.Table(
    "usage_hourly",
    metadata,
    sa.Column("hour", UTCDateTime, primary_key=True),  # start of the UTC hour the requests were created in
    sa.Column("team", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),  # usage.requested_model
    sa.Column("backend", sa.String(200), primary_key=True),
    sa.Column("privacy", sa.String(32), primary_key=True),  # the tier: privacy_class before ':'
    sa.Column("endpoint", sa.String(32), primary_key=True),  # usage.endpoint
    sa.Column("batch_id", sa.String(64), primary_key=True),  # usage.batch_id; '' interactive (migration 0010)
    _measure("requests", sa.Integer),
    _measure("errors", sa.Integer),  # status = 'error'
    _measure("client_closed", sa.Integer),
    _measure("prompt_tokens", sa.BigInteger),
    _measure("completion_tokens", sa.BigInteger),
    _measure("cost_micro_usd", sa.BigInteger),
    _measure("cache_hits", sa.Integer),
    _measure("cost_saved_micro_usd", sa.BigInteger),
    _measure("fallbacks", sa.Integer),  # attempts > 1
    _measure("latency_sum_ms", sa.Float(precision=53)),
    _measure("ttft_count", sa.Integer),  # rows with a ttft_ms
    _measure("ttft_sum_ms", sa.Float(precision=53)),
    *(_measure(name, sa.BigInteger) for name in column_names(LATENCY_PREFIX)),  # gateway/live/histogram.py
    *(_measure(name, sa.BigInteger) for name in column_names(TTFT_PREFIX)),
    _measure("owned_micro_usd", sa.BigInteger),  # migration 0010
    *(_measure(name, sa.BigInteger) for name in CACHE_MEASURES),  # the cache hits' sums (migration 0014)
)

# Daily sums of usage_hourly, the same columns with `hour` holding the start of the UTC day; rebuilt from
# usage_hourly by each rollup run for the days it touched (gateway/store/daily.py), so long reports read
# whole days here (~24x fewer rows). Migration 0013.
usage_daily = sa.Table("usage_daily", metadata, *(c._copy() for c in usage_hourly.columns))
# The same sums over key_id, privacy and batch_id (migration 0014): ~10x fewer rows, for reports that group
# and filter by team, model, backend, endpoint and time only (the console's overview, usage and savings).
COARSE_KEYS = ("hour", "team", "model", "backend", "endpoint")
usage_hourly_coarse, usage_daily_coarse = (
    sa.Table(
        name,
        metadata,
        *(c._copy() for c in usage_hourly.columns if not c.primary_key or c.name in COARSE_KEYS),
    )
    for name in ("usage_hourly_coarse", "usage_daily_coarse")
)

# Measured busy time per backend and hour: the union of [created_at, created_at + latency_ms] of the
# requests it served (cache hits excluded), clipped to the hour. Self-hosted cost is usd_per_hour * busy.
backend_busy_hourly = sa.Table(
    "backend_busy_hourly",
    metadata,
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("backend", sa.String(200), primary_key=True),
    _measure("busy_ms", sa.Float(precision=53)),
    _measure("requests", sa.Integer),  # requests created in the hour that the backend served
)

# One row per rollup job ("usage"): rows with written_at <= watermark - margin are in the rollups; raw rows
# created before pruned_before were deleted after being rolled up (any still there are late, not yet added).
rollup_state = sa.Table(
    "rollup_state",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("watermark", UTCDateTime, nullable=False),
    sa.Column("pruned_before", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)


# Edge enrollment tokens (gateway/edge/tokens.py): a node authenticates with one; only the sha256 is stored.
edge_tokens = sa.Table(
    "edge_tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # short public id, shown in listings and revokes
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex; never the token
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),  # {key: value}; override the labels a node reports
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
)


# Stored `/v1/responses` answers (gateway/store/responses.py): the only prompt text Switchboard keeps, per
# team, deleted after responses.retention_days. `history` is the conversation so far as chat messages
# (previous responses' included, instructions not), so a follow-up loads one row on any replica.
responses = sa.Table(
    "responses",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # resp_<request id>
    sa.Column("team", sa.String(64), nullable=False),  # no FK: like the ledger, teams may come and go
    sa.Column("key_id", sa.String(32), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("previous_response_id", sa.String(64), nullable=True),
    sa.Column("response", sa.JSON, nullable=False),  # the Response object as it was answered
    sa.Column("input_items", sa.JSON, nullable=False),  # this request's input items, with ids
    sa.Column("history", sa.JSON, nullable=False),  # chat messages: the conversation through this answer
    sa.Index("ix_responses_team_id", "team", "id"),
    sa.Index("ix_responses_created_at", "created_at"),  # the retention prune
)


# `/v1/files` metadata (gateway/store/files.py); the bytes live in file storage (gateway/files/) under
# `storage_key`. A row exists only once its bytes are stored whole.
files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # file-<32 hex>
    sa.Column("team", sa.String(64), nullable=False),  # no FK: like the ledger, teams may come and go
    sa.Column("key_id", sa.String(32), nullable=True),  # the key that uploaded it
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # OpenAI's: uploaded | processed | error
    sa.Column("storage_key", sa.String(600), nullable=False),
    sa.Column("lines", sa.Integer, nullable=True),  # JSONL: non-blank lines
    sa.Column("invalid_lines", sa.Integer, nullable=True),  # lines that are no valid batch request
    sa.Index("ix_files_team_created", "team", "created_at", "id"),  # listing, newest first
)


# `/v1/batches` (gateway/store/batches.py): a batch's state, and one item per input line with its lease and
# its result (the output- or error-file line), claimed by workers on every replica.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # batch_<32 hex>
    sa.Column("team", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=True),  # the key that created it: its items run as that key
    sa.Column("endpoint", sa.String(64), nullable=False),  # /v1/chat/completions, /v1/responses, ...
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # OpenAI's Batch.status
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("errors", sa.JSON, nullable=True),  # OpenAI's Batch.errors.data: why a batch failed
    sa.Column("output_file_id", sa.String(64), nullable=True),
    sa.Column("error_file_id", sa.String(64), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),  # the end of the completion window
    sa.Column("in_progress_at", UTCDateTime, nullable=True),
    sa.Column("finalizing_at", UTCDateTime, nullable=True),
    sa.Column("completed_at", UTCDateTime, nullable=True),
    sa.Column("failed_at", UTCDateTime, nullable=True),
    sa.Column("expired_at", UTCDateTime, nullable=True),
    sa.Column("cancelling_at", UTCDateTime, nullable=True),
    sa.Column("cancelled_at", UTCDateTime, nullable=True),
    # Who validates or finalizes it now, and until when (a dead replica's lease expires).
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_until", UTCDateTime, nullable=True),
    sa.Index("ix_batches_team_created", "team", "created_at", "id"),
    sa.Index("ix_batches_status", "status"),
)

batch_items = sa.Table(
    "batch_items",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),  # 1-based line of the input file
    sa.Column("custom_id", sa.String(512), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),  # queued | running | done | failed | cancelled
    sa.Column("body", sa.JSON, nullable=True),  # the request body; cleared once the item has its result
    sa.Column("result", sa.JSON, nullable=True),  # its output-file (done) or error-file (failed) line
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_until", UTCDateTime, nullable=True),
    sa.Column("backend", sa.String(200), nullable=True),  # what served it (capacity class in metrics)
    sa.Index("ix_batch_items_state", "state", "batch_id"),
)


# Every admin write (console, CLI, `/admin` API): who, what, when, from where (gateway/store/audit.py).
# `target` names what was changed (a team, a key id, an edge token id), never a secret.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),  # "admin", "key:<key id>", "cli:<os user>"
    sa.Column("source", sa.String(16), nullable=False),  # console | api | cli
    sa.Column("address", sa.String(64), nullable=False),  # the client's address, or "cli"
    sa.Column("action", sa.String(64), nullable=False),  # e.g. key.create, key.revoke, team.create
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("detail", sa.JSON, nullable=True),  # the write's settings (names, limits), never a secret
    sa.Index("ix_audit_log_at", "at"),
)

# Logins to /console (gateway/store/sessions.py), by the SHA-256 of the session cookie's value.
console_sessions = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(8), nullable=False),  # admin | team
    sa.Column("team", sa.String(64), nullable=True),  # a team session's team
    sa.Column("key_id", sa.String(32), nullable=True),  # a team session's key (revoking it ends the session)
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Index("ix_console_sessions_expires_at", "expires_at"),
)
