"""Admin configuration: one TOML file parsed into strict pydantic models.

Every mistake is reported as `path: what is wrong (what to change)`. Secrets never appear in the file, only
the names of environment variables that hold them (`api_key_env`). `Config()` with no file is the embedded
default: SQLite, the bundled engine on 127.0.0.1:8081, models `smollm2` (chat) and `minilm` (embeddings),
one team `demo`.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from routing.fleet import Capacity
from routing.privacy import PrivacyTier, SensitivePolicy


class ConfigError(Exception):
    """A config file could not be used. `problems` holds one line per mistake."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    admin_key_env: str = "SWITCHBOARD_ADMIN_KEY"
    key_cache_ttl_s: float = Field(default=5.0, ge=0, le=300)
    request_timeout_s: float = Field(default=600.0, gt=0)
    # SIGTERM: new connections are refused and in-flight requests (streams, reports) get this long to finish;
    # then they are cut off (their rows say client_closed), the ledger is flushed and the process exits.
    drain_timeout_s: float = Field(default=30.0, ge=0, le=3600)
    # A streamed answer whose client stops reading (its socket buffers full) for this long is cut off and
    # recorded client_closed, charged for what was produced; its upstream connection is freed.
    write_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # /docs and /openapi.json list the whole admin API: off unless asked for (assets are served locally).
    docs: bool = False
    # /metrics carries team names and spend: it needs the admin key, or the token in this variable ...
    metrics_token_env: str | None = None
    metrics_public: bool = False  # ... unless the operator makes it public (e.g. behind a private network)
    # What one connection may cost before its request runs (gateway/http/server.py); over: answer and close.
    max_header_bytes: int = Field(default=32_768, ge=1024, le=1 << 20)  # request line + headers: 431
    max_headers: int = Field(default=100, ge=8, le=1000)  # header fields per request: 431
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=300
    )  # open, or first byte of a later request -> end of headers: 408
    # An idle keep-alive connection is closed after this. Keep it above your clients' and load balancers' idle
    # timeouts (httpx 5 s, nginx upstream 60 s, AWS ALB 60 s): else both ends close at once and a request sent
    # on the closing connection is reset unanswered.
    keep_alive_s: float = Field(default=75.0, gt=0, le=3600)
    max_connections_per_client: int = Field(default=64, ge=1)  # per peer address; trusted proxies exempt: 503
    max_connections: int = Field(default=2048, ge=1)  # all peers together, edge WebSockets included: 503
    trusted_proxies: list[str] = Field(default_factory=list)  # IPs/CIDRs whose X-Forwarded-For/-Proto count
    tls_cert_file: str | None = None  # PEM certificate (chain); set it to serve https and wss
    tls_key_file: str | None = None  # PEM private key; None: it is in tls_cert_file
    tls_min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _check_proxies_and_tls(self) -> ServerConfig:
        problems = []
        for i, entry in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                problems.append(
                    f'server.trusted_proxies.{i}: "{entry}" is not an IP address or CIDR network '
                    '(e.g. "10.0.0.5" or "10.0.0.0/24"; "*" is not accepted)'
                )
        if self.tls_key_file is not None and self.tls_cert_file is None:
            problems.append(
                "server.tls_key_file: set server.tls_cert_file too (the certificate it belongs to)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


class DatabaseConfig(_Strict):
    url: str = "sqlite:///./switchboard.db"
    schema_name: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")  # PostgreSQL only
    spill_path: str = "./switchboard.spill.jsonl"
    queue_max: int = Field(default=10_000, ge=1)
    batch_max: int = Field(default=500, ge=1)
    flush_interval_s: float = Field(default=0.2, gt=0)
    replay_interval_s: float = Field(default=2.0, gt=0)
    auto_migrate: bool | None = None  # None: migrate at start on SQLite only
    # Each row is appended to a local journal before its response is sent (gateway/store/journal.py).
    journal: bool = True
    journal_dir: str = ""  # "": "<spill_path>.journal"; processes sharing one take a slot each
    journal_fsync_interval_s: float = Field(default=0.2, ge=0)  # 0: no fdatasync (a process crash only)
    journal_segment_bytes: int = Field(default=8 << 20, ge=4096)

    @model_validator(mode="before")
    @classmethod
    def _journal_beside_spill(cls, data: object) -> object:
        # Filled in at parse time, not derived later: `serve --workers N` gives each worker its own spill file
        # but one journal directory, where each worker takes a slot and adopts a dead worker's.
        if isinstance(data, dict) and not data.get("journal_dir"):
            spill = data.get("spill_path", "./switchboard.spill.jsonl")
            return {**data, "journal_dir": f"{spill}.journal"}
        return data


class CapacityConfig(_Strict):
    """An owned box's throughput curve (`routing.fleet.Capacity`): measure it once with bench/engine, e.g.
    tokens_per_s = [[1, 40], [4, 120], [8, 160]] (concurrency, aggregate decode tokens/s) and
    ttft_ms = [[0, 150], [4, 2000]] (requests waiting for a slot, TTFT ms). The engine's /metrics (running,
    queue depth) and the gateway's in-flight count and pending prompt tokens place the live load on it.
    prefill_tokens_per_s (prompt tokens/s, e.g. 165) makes predicted TTFT grow with the prompts ahead and
    the request's own; 0: prompt length is not modelled. The reserve for must-stay traffic (requests whose
    privacy floor forbids the cloud): reserve_slots slots that requests able to overflow leave free, and
    reserve_ttft_ms: such requests go here only while their predicted TTFT is at most this (or, for a longer
    prompt, while the queue ahead of it is, and most of the tier's boxes keep that room without this one)."""

    tokens_per_s: list[tuple[float, float]] = Field(min_length=1)
    ttft_ms: list[tuple[float, float]] = Field(default_factory=list)
    max_concurrency: int = Field(default=0, ge=0)  # batch slots; 0: the last tokens_per_s point's concurrency
    prefill_tokens_per_s: float = Field(default=0.0, ge=0)
    reserve_slots: int = Field(default=0, ge=0)  # below the box's slots
    reserve_ttft_ms: float | None = Field(default=None, gt=0)
    # The engine's KV cache in tokens (`switchboard engine serve` logs it at start); with it, a conversation's
    # next turn counts on its earlier turns being cached only while that can still be so. 0: always.
    kv_cache_tokens: int = Field(default=0, ge=0)
    # The engine's --max-prefill-tokens and --short-prefill-tokens (512 and 128 for `switchboard engine
    # serve`): with both, a conversation's next turn on the replica caching its history is predicted to
    # wait for at most one chunk of the prompts pending there, as that engine computes short prompts first.
    prefill_chunk_tokens: int = Field(default=0, ge=0)
    short_prefill_tokens: int = Field(default=0, ge=0)
    # With prefill_tokens_per_s: µs a prompt token costs more per token before it (its attention over them;
    # `python -m bench.routing_eval.calibrate` measures it), so a long prompt is predicted at its own pace.
    prefill_us_per_context_token: float = Field(default=0.0, ge=0)
    # µs a decoding stream's step costs more per token in its context (its attention over them; calibrate
    # measures it): with it, a box whose running requests hold long prompts is predicted at its slower steps.
    decode_us_per_context_token: float = Field(default=0.0, ge=0)

    def curve(self) -> Capacity:
        return Capacity(
            tuple(self.tokens_per_s), tuple(self.ttft_ms), self.max_concurrency, self.prefill_tokens_per_s,
            self.reserve_slots, self.reserve_ttft_ms, self.kv_cache_tokens, self.prefill_chunk_tokens,
            self.short_prefill_tokens, self.prefill_us_per_context_token, self.decode_us_per_context_token,
        )  # fmt: skip


class _RoutedBackend(_Strict):
    """What routing needs to know about any backend: privacy tier, labels, price of self-hosting, priors."""

    privacy_tier: PrivacyTier | None = None  # default: external for cloud, internal for openai-compatible
    labels: dict[str, str] = Field(default_factory=dict)  # e.g. {site = "fra1", region = "eu"}
    # Owned capacity: a fixed cost per hour, marginal cost 0 in routing while it meets the SLO; the ledger's
    # owned_micro_usd column charges each request its share back.
    usd_per_hour: Decimal | None = Field(default=None, ge=0)
    capacity: CapacityConfig | None = None  # its throughput curve; None: measured rates only
    prior_ttft_ms: float = Field(default=500.0, gt=0)  # routing's guess until real traffic is measured
    prior_tokens_per_s: float = Field(default=50.0, gt=0)
    prior_latency_ms: float = Field(default=2000.0, gt=0)


class CloudBackendConfig(_RoutedBackend):
    kind: Literal["cloud"]
    provider: str  # litellm provider prefix: "openai", "anthropic", "azure", ...
    api_key_env: str | None = None
    api_base: str | None = None
    timeout_s: float = Field(default=600.0, gt=0)

    @property
    def tier(self) -> PrivacyTier:
        return self.privacy_tier or PrivacyTier.EXTERNAL


class OpenAIBackendConfig(_RoutedBackend):
    kind: Literal["openai"]
    base_url: str  # e.g. "http://127.0.0.1:8081/v1"
    api_key_env: str | None = None
    timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    supports_tools: bool = True
    supports_response_format: bool = True
    metrics_url: str | None = None  # an engine's Prometheus /metrics: queue depth and KV use feed routing
    # A vLLM started with --scheduling-policy priority: each chat call carries vLLM's `priority` field (when
    # its first token is due, from its team's SLO), so vLLM serves the earliest deadline first. Off by
    # default: vLLM refuses a priority other than 0 without that policy.
    send_priority: bool = False
    # GET {base_url}/models this often; a server failing it leaves routing until it answers again.
    # None: every EDGE_HEALTH_INTERVAL_S for privacy_tier = "edge" (a box at a site), off otherwise; 0: off.
    health_interval_s: float | None = Field(default=None, ge=0)

    @property
    def tier(self) -> PrivacyTier:
        return self.privacy_tier or PrivacyTier.INTERNAL

    @property
    def probe_interval_s(self) -> float | None:
        """How often the health probe runs (None: never)."""
        if self.health_interval_s is None:
            return EDGE_HEALTH_INTERVAL_S if self.tier is PrivacyTier.EDGE else None
        return self.health_interval_s or None


class EdgeBackendConfig(_RoutedBackend):
    """The edge nodes connected to the gateway: at routing time, one deployment per live node that serves
    the deployment's upstream_model. `labels` are defaults under each node's own; `usd_per_hour`, when set,
    replaces what each node reports; the priors stand in until a node reports its measured speed."""

    kind: Literal["edge"]
    timeout_s: float = Field(default=120.0, gt=0)  # one attempt's limit (first chunk, and between chunks)

    @property
    def tier(self) -> PrivacyTier:
        return PrivacyTier.EDGE

    @property
    def api_key_env(self) -> None:
        """Nodes authenticate with enrollment tokens, never with a key from the environment."""
        return None


BackendConfig = Annotated[
    CloudBackendConfig | OpenAIBackendConfig | EdgeBackendConfig, Field(discriminator="kind")
]
EDGE_HEALTH_INTERVAL_S = 10.0


class DeploymentConfig(_Strict):
    """One way to serve a public model: a backend, the name it knows the model by, and what it costs."""

    backend: str
    upstream_model: str | None = None  # defaults to the public name
    input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    # What `/v1/batches` items cost here (a provider's batch tier); unset: the prices above.
    batch_input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    batch_output_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    context_tokens: int | None = Field(default=None, ge=1)
    quality_tier: int = Field(default=0, ge=0)  # higher is better; teams may ask for a minimum


class ModelConfig(_Strict):
    """A public model name (or alias such as `auto`): one deployment inline, or several in `deployments`."""

    backend: str | None = None
    upstream_model: str | None = None
    input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    batch_input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    batch_output_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    context_tokens: int | None = Field(default=None, ge=1)
    quality_tier: int = Field(default=0, ge=0)
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    slo_p95_ttft_ms: float | None = Field(default=None, gt=0)  # with the team's: the tighter one applies
    slo_p95_e2e_ms: float | None = Field(default=None, gt=0)
    # Deadlines (as teams.X's; with the team's and the request's, the tightest applies)
    max_latency_ms: float | None = Field(default=None, gt=0)
    max_ttft_ms: float | None = Field(default=None, gt=0)
    cache_ttl_s: float | None = Field(default=None, ge=0)  # overrides cache.ttl_s for this model; 0: off
    mode: Literal["chat", "embedding"] = "chat"  # embedding: served by POST /v1/embeddings only
    supports_dimensions: bool = False  # embedding models that honour the `dimensions` request field

    @model_validator(mode="after")
    def _one_form(self) -> ModelConfig:
        if (self.backend is None) == (not self.deployments):
            raise ValueError("set either `backend` (one deployment) or `deployments` (several), not both")
        return self

    def all_deployments(self) -> list[DeploymentConfig]:
        if self.deployments:
            return self.deployments
        assert self.backend is not None
        return [
            DeploymentConfig(
                backend=self.backend,
                upstream_model=self.upstream_model,
                input_usd_per_mtok=self.input_usd_per_mtok,
                output_usd_per_mtok=self.output_usd_per_mtok,
                batch_input_usd_per_mtok=self.batch_input_usd_per_mtok,
                batch_output_usd_per_mtok=self.batch_output_usd_per_mtok,
                context_tokens=self.context_tokens,
                quality_tier=self.quality_tier,
            )
        ]


class ModelLimitsConfig(_Strict):
    """Per (team, model) limits, counted over `limits.window_s`."""

    requests: int | None = Field(default=None, ge=1)
    tokens: int | None = Field(default=None, ge=1)


class TeamLimitsConfig(_Strict):
    """Rate limits of one team, each counted over `limits.window_s` (default 60 s: RPM and TPM)."""

    requests: int | None = Field(default=None, ge=1)  # whole team, all keys together
    tokens: int | None = Field(default=None, ge=1)  # prompt + completion tokens
    max_concurrent: int | None = Field(default=None, ge=1)  # requests in flight at once, over all replicas
    key_requests: int | None = Field(default=None, ge=1)  # each key of the team (a key's own limit wins)
    key_tokens: int | None = Field(default=None, ge=1)
    models: dict[str, ModelLimitsConfig] = Field(default_factory=dict)  # per (team, public model)


class BudgetConfig(_Strict):
    """A spend limit per period (UTC day or calendar month); `soft_usd` only alerts (log and metric)."""

    period: Literal["day", "month"]
    usd: Decimal = Field(gt=0)
    soft_usd: Decimal | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _soft_below_hard(self) -> BudgetConfig:
        if self.soft_usd is not None and self.soft_usd > self.usd:
            raise ValueError(f"soft_usd ({self.soft_usd}) must not exceed usd ({self.usd})")
        return self


class TeamConfig(_Strict):
    models: list[str] = Field(default_factory=lambda: ["*"])
    privacy_floor: PrivacyTier = PrivacyTier.EXTERNAL  # the least private tier this team's data may reach
    on_sensitive: SensitivePolicy = SensitivePolicy.RAISE_FLOOR  # detectors fired: raise_floor|block|allow
    objective: Literal["latency", "cost", "balanced"] = "balanced"
    max_latency_ms: float | None = Field(default=None, gt=0)  # the hard deadline: past it, 503 or another
    # Latency targets: the cheapest deployment predicted to meet them serves; owned capacity overflows to
    # the cloud only when it would break them (a request that may not leave queues instead).
    slo_p95_ttft_ms: float | None = Field(default=None, gt=0)
    slo_p95_e2e_ms: float | None = Field(default=None, gt=0)
    # The first token's deadline: deployments predicted past it are skipped; a request that may not leave
    # gets 503 deadline_unmeetable instead of queueing beyond it. None: it queues.
    max_ttft_ms: float | None = Field(default=None, gt=0)
    max_usd_per_request: Decimal | None = Field(default=None, gt=0)
    min_quality_tier: int = Field(default=0, ge=0)
    required_labels: dict[str, list[str]] = Field(default_factory=dict)  # e.g. {site = ["plant-7"]}
    preferred_labels: dict[str, str] = Field(default_factory=dict)
    allow_fallbacks: bool = True
    max_attempts: int = Field(default=3, ge=1, le=10)
    limits: TeamLimitsConfig = TeamLimitsConfig()
    budgets: list[BudgetConfig] = Field(default_factory=list)
    cache_ttl_s: float | None = Field(default=None, ge=0)  # overrides the model's and cache.ttl_s; 0: off
    cache_share: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # same group: shared
    cache_all: bool = False  # cache non-deterministic requests too (temperature > 0 and no seed)
    store_responses: bool = True  # false: /v1/responses never keeps this team's prompts (store=true: 400)


class RoutingConfig(_Strict):
    default_output_tokens: int = Field(default=256, ge=1)  # expected output when a request sets no max_tokens
    stats_alpha: float = Field(default=0.2, gt=0, le=1)  # EWMA weight of each new observation
    breaker_failures: int = Field(default=5, ge=1)  # consecutive retryable failures that open a circuit
    breaker_open_s: float = Field(default=5.0, gt=0)  # how long an open circuit rejects before probing
    retry_backoff_s: float = Field(default=0.05, ge=0)  # first retry delay; doubles, capped by the budget
    max_retry_wait_s: float = Field(default=2.0, ge=0)  # a longer Retry-After goes back to the client instead
    metrics_poll_s: float = Field(default=2.0, gt=0)  # how often engines' /metrics are read
    # Prefix affinity: a request whose messages before the last one hold at least this many characters goes
    # to the owned replica that rendezvous hashing picks for them (its prefix cache holds them); 0: off.
    prefix_min_chars: int = Field(default=1024, ge=0)
    prefix_max_chars: int = Field(default=16_384, ge=1)  # hashed: the first this many characters
    affinity_max_waiting: int = Field(default=2, ge=0)  # a replica with more queued is skipped (spill)


class RedisConfig(_Strict):
    """Shared state for several replicas. Without `url`, cache, limits and budgets live in this process,
    which is exact for one replica only."""

    url: str | None = None  # e.g. "redis://127.0.0.1:6379/0"
    prefix: str = Field(default="sb:", pattern=r"^[A-Za-z0-9_.:-]{0,64}$")  # one Redis, several gateways
    timeout_ms: float = Field(default=250.0, gt=0, le=10_000)  # per call; 3 slow in a row: Redis is down
    connect_timeout_ms: float = Field(default=1000.0, gt=0, le=10_000)
    retry_after_s: float = Field(default=1.0, gt=0)  # after a failure Redis is left alone this long
    max_connections: int = Field(default=128, ge=1)
    routing_sync_s: float = Field(default=0.5, gt=0)  # how often routing stats and circuits are shared


class CacheConfig(_Strict):
    enabled: bool = True
    ttl_s: float = Field(default=3600.0, ge=0)  # models.X.cache_ttl_s and teams.X.cache_ttl_s override
    max_entry_bytes: int = Field(default=1 << 20, ge=1024)  # larger answers are not stored
    memory_max_entries: int = Field(default=10_000, ge=1)  # in-process cache only (no redis.url)
    memory_max_mb: int = Field(default=256, ge=1)


class LimitsConfig(_Strict):
    window_s: float = Field(default=60.0, gt=0)  # what `requests`/`tokens` limits count over
    fail_open: bool = False  # Redis down: admit requests unchecked (true) or answer 503 (false)
    budgets_fail_open: bool = False  # the same choice for spend budgets
    budget_sync_s: float = Field(default=60.0, gt=0)  # how often budget counters are reconciled with SQL


class ReportsConfig(_Strict):
    """Usage reports: rollups, retention and the cloud model that savings are measured against."""

    reference_model: str | None = None  # a model under [models] (its first deployment's prices) ...
    reference_input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)  # ... or explicit prices
    reference_output_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    rollup_interval_s: float = Field(default=60.0, gt=0)  # how often the gateway updates hourly rollups
    retention_days: int | None = Field(default=None, ge=1)  # prune raw rows older than this; rollups stay
    # Reports over HTTP (/v1/usage, /admin/reports/*) run on their own threads, bounded in time and number.
    max_span_days: int = Field(default=400, ge=1, le=36_600)  # since..until (or now) longer than this: 400
    max_concurrent: int = Field(default=2, ge=1, le=64)  # report threads; nothing else runs on them
    max_queued: int = Field(default=8, ge=0, le=1024)  # more waiting than this: 429 at once
    timeout_s: float = Field(default=60.0, gt=0, le=3600)  # a report still running then is stopped (503)
    requests_per_minute: int = Field(default=30, ge=1, le=100_000)  # per team key, on /v1/usage


class ConsoleConfig(_Strict):
    """The admin web console at /console (gateway/console/): sessions are stored in SQL."""

    enabled: bool = True
    session_ttl_s: float = Field(default=8 * 3600.0, gt=0, le=30 * 86_400)  # a login lasts this long
    recent_decisions: int = Field(default=50, ge=1, le=1000)  # routing decisions listed per page
    # Login attempts (right or wrong) a minute from one client address, and for one account (the admin, or
    # one team key by its display prefix); more are refused with 429 (across replicas with Redis).
    login_attempts_per_address_per_minute: int = Field(default=10, ge=1, le=10_000)
    login_attempts_per_account_per_minute: int = Field(default=20, ge=1, le=10_000)


class ResponsesConfig(_Strict):
    """`/v1/responses` conversation state: the only prompt text Switchboard keeps (teams may opt out)."""

    store_default: bool = True  # what a request without `store` gets (OpenAI's default is true)
    retention_days: float = Field(default=30.0, gt=0, le=3650)  # stored responses are deleted after this
    prune_interval_s: float = Field(default=3600.0, gt=0)  # how often expired responses are deleted


class S3FilesConfig(_Strict):
    """An S3-compatible bucket for `/v1/files` (files.storage = "s3"): what several replicas share."""

    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = Field(default="switchboard-files/", max_length=512)  # object keys: <prefix><file id>
    endpoint_url: str | None = None  # None: AWS; e.g. "http://minio:9000" for MinIO, Ceph, R2, ...
    region: str | None = None
    # Credentials come from these environment variables; unset: boto3's own chain (instance role, ...).
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    session_token_env: str | None = None
    part_bytes: int = Field(default=8 << 20, ge=5 << 20, le=1 << 30)  # multipart upload part (S3 min 5 MiB)
    timeout_s: float = Field(default=30.0, gt=0, le=600)  # per S3 call (connect and read)


class FilesConfig(_Strict):
    """`/v1/files`: uploads (JSONL, purpose "batch") kept per team until deleted."""

    max_bytes: int = Field(default=200 << 20, ge=1)  # a larger upload is refused (413) while it streams
    max_line_bytes: int = Field(default=8 << 20, ge=1024)  # one JSONL line is parsed whole: its upper bound
    storage: Literal["local", "s3"] = "local"  # local: one replica (or a shared mount); s3: several
    local_dir: str = "./switchboard-files"  # storage = "local": created at the first upload
    s3: S3FilesConfig | None = None  # storage = "s3": [files.s3]

    @model_validator(mode="after")
    def _s3_when_chosen(self) -> FilesConfig:
        if self.storage == "s3" and self.s3 is None:
            raise ValueError('files.s3: set [files.s3] bucket = "..." (files.storage = "s3" needs a bucket)')
        return self


class BatchConfig(_Strict):
    """`/v1/batches`: a worker on every replica runs batch items through the pipeline, on self-hosted capacity
    while it has room, moving what remains to cloud deployments as the completion window nears its end."""

    enabled: bool = True  # false: this replica runs no batch worker (the API still answers)
    window_s: float = Field(default=86_400.0, gt=0)  # what completion_window "24h" gives a batch
    spill_slack_s: float = Field(default=3600.0, ge=0)  # this long before the window ends, items go to cloud
    kv_room_frac: float = Field(default=0.8, gt=0, le=1)  # an engine has room while its KV use is below this
    concurrency: int = Field(default=8, ge=1, le=1024)  # items one replica runs at once
    claim_size: int = Field(default=8, ge=1, le=1000)  # items claimed at a time
    lease_s: float = Field(default=30.0, gt=0)  # a dead replica's items are taken over after this
    poll_s: float = Field(default=0.5, gt=0)  # how often an idle worker looks for work
    max_attempts: int = Field(default=3, ge=1)  # tries of an item failing with a retryable error


class EdgeConfig(_Strict):
    """Edge nodes dialling in over `/v1/edge/connect` (see README, "Edge nodes")."""

    enabled: bool | None = None  # None: on when a backend has kind = "edge"
    heartbeat_s: float = Field(default=2.0, gt=0, le=60)  # nodes send load this often (told in `welcome`)
    ttl_s: float = Field(default=10.0, gt=0, le=600)  # a node silent this long leaves routing
    token_check_s: float = Field(default=2.0, gt=0, le=60)  # revoked/expired tokens disconnect within this
    hello_timeout_s: float = Field(default=10.0, gt=0, le=120)  # a connection must say hello within this
    relay: bool = True  # with Redis: route to nodes held by other replicas, relayed through Redis
    relay_timeout_s: float = Field(default=3.0, gt=0, le=60)  # a relaying replica silent this long: fail over

    @model_validator(mode="after")
    def _ttl_covers_heartbeats(self) -> EdgeConfig:
        if self.ttl_s <= self.heartbeat_s:
            raise ValueError(
                f"edge.ttl_s ({self.ttl_s:g}) must be longer than edge.heartbeat_s ({self.heartbeat_s:g}), "
                "or live nodes leave routing between two heartbeats (set ttl_s to 3-5 x heartbeat_s)"
            )
        return self


class TelemetryConfig(_Strict):
    """OpenTelemetry traces (the `otel` extra): one span per request with the GenAI semantic conventions and
    Switchboard's attributes, a child span per attempt, exported over OTLP/HTTP (protobuf)."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # a collector's OTLP/HTTP traces URL
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every export; no secrets here ...
    headers_env: dict[str, str] = Field(default_factory=dict)  # ... header -> variable holding its value
    service_name: str = Field(default="switchboard", min_length=1)
    sample_ratio: float = Field(default=1.0, ge=0, le=1)  # of requests with no sampled parent
    capture_content: bool = False  # true: prompts and completions go into spans (gen_ai.*.messages)
    export_timeout_s: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _check_endpoint(self) -> TelemetryConfig:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f'telemetry.endpoint: "{self.endpoint}" is not an http(s) URL (e.g. '
                '"http://127.0.0.1:4318/v1/traces", a collector\'s OTLP/HTTP traces endpoint)'
            )
        return self


_DEFAULT_BACKENDS: dict[str, CloudBackendConfig | OpenAIBackendConfig | EdgeBackendConfig] = {
    "local": OpenAIBackendConfig(
        kind="openai",
        base_url="http://127.0.0.1:8081/v1",
        supports_tools=False,
        supports_response_format=False,
        metrics_url="http://127.0.0.1:8081/metrics",
    )
}


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    backends: dict[str, BackendConfig] = Field(default_factory=lambda: dict(_DEFAULT_BACKENDS))
    models: dict[str, ModelConfig] = Field(
        default_factory=lambda: {
            "smollm2": ModelConfig(
                backend="local",
                upstream_model="smollm2",
                input_usd_per_mtok=Decimal(0),
                output_usd_per_mtok=Decimal(0),
            ),
            # Served when the engine runs with `--embedding-model minilm` (as `switchboard up` starts it).
            "minilm": ModelConfig(
                backend="local",
                upstream_model="minilm",
                input_usd_per_mtok=Decimal(0),
                output_usd_per_mtok=Decimal(0),
                mode="embedding",
            ),
        }
    )
    teams: dict[str, TeamConfig] = Field(default_factory=lambda: {"demo": TeamConfig()})
    routing: RoutingConfig = RoutingConfig()
    redis: RedisConfig = RedisConfig()
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()
    reports: ReportsConfig = ReportsConfig()
    console: ConsoleConfig = ConsoleConfig()
    responses: ResponsesConfig = ResponsesConfig()
    files: FilesConfig = FilesConfig()
    batch: BatchConfig = BatchConfig()
    edge: EdgeConfig = EdgeConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    @property
    def edge_enabled(self) -> bool:
        if self.edge.enabled is not None:
            return self.edge.enabled
        return any(isinstance(b, EdgeBackendConfig) for b in self.backends.values())

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        problems = self._edge_problems()
        for name, backend in self.backends.items():
            try:
                _ = backend.capacity.curve() if backend.capacity is not None else None
            except ValueError as exc:
                problems.append(f"backends.{name}.{exc}")
        known_backends = ", ".join(sorted(self.backends)) or "none"
        for name, model in self.models.items():
            for i, dep in enumerate(model.all_deployments()):
                if dep.backend not in self.backends:
                    where = f"models.{name}." + ("backend" if model.backend else f"deployments.{i}.backend")
                    problems.append(
                        f'{where}: unknown backend "{dep.backend}" (defined backends: {known_backends})'
                    )
                elif model.mode == "embedding" and isinstance(self.backends[dep.backend], EdgeBackendConfig):
                    where = f"models.{name}." + ("backend" if model.backend else f"deployments.{i}.backend")
                    problems.append(
                        f'{where}: backend "{dep.backend}" is kind = "edge", which cannot serve embeddings '
                        f'(models.{name}.mode = "embedding"); use a cloud or openai backend'
                    )
        for team, policy in self.teams.items():
            for model_name in policy.models:
                if model_name != "*" and model_name not in self.models:
                    known = ", ".join(sorted(self.models)) or "none"
                    problems.append(
                        f'teams.{team}.models: unknown model "{model_name}" (defined models: {known}, or "*")'
                    )
            for model_name in policy.limits.models:
                if model_name not in self.models:
                    known = ", ".join(sorted(self.models)) or "none"
                    problems.append(
                        f'teams.{team}.limits.models: unknown model "{model_name}" (defined models: {known})'
                    )
        ref = self.reports.reference_model
        if ref is not None and ref not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            problems.append(f'reports.reference_model: unknown model "{ref}" (defined models: {known})')
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _edge_problems(self) -> list[str]:
        problems = []
        for name, backend in self.backends.items():
            if "/" in name:
                problems.append(
                    f'backends.{name}: a backend name may not contain "/" (reserved for edge nodes, '
                    "which route as <edge backend>/<node id>); rename it"
                )
            if not isinstance(backend, EdgeBackendConfig):
                continue
            if backend.privacy_tier not in (None, PrivacyTier.EDGE):
                problems.append(
                    f'backends.{name}.privacy_tier: a kind = "edge" backend is always tier "edge", not '
                    f'"{backend.privacy_tier}" (remove the setting)'
                )
            if self.edge.enabled is False:
                problems.append(
                    f'backends.{name}: kind = "edge" needs the edge hub, but edge.enabled = false '
                    "(remove that setting, or this backend)"
                )
        return problems

    def upstream_model(self, public_name: str) -> str:
        """The upstream name of a model's first deployment (the public name when not set)."""
        return self.models[public_name].all_deployments()[0].upstream_model or public_name


def _format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (remove it, or check its spelling against config.example.toml)"
        elif err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
            msg = 'set kind = "cloud", "openai" or "edge"'
        elif msg.startswith("Value error, "):
            for line in msg.removeprefix("Value error, ").splitlines():
                problems.append(line)
            continue
        problems.append(f"{path}: {msg}" if path else msg)
    return problems


def parse_config(data: dict[str, object], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_validation_error(exc)) from exc


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a TOML file; `None` gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from exc
    return parse_config(data, str(p))
