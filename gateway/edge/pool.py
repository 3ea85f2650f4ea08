"""Edge deployments at routing time: each configured deployment on a `kind = "edge"` backend becomes one
`DeploymentSpec` per live node that serves its upstream model.

Pure (no I/O, no clock): `expand` takes the nodes and `now_s`. A node counts as live while its last
heartbeat is within `ttl_s`. A node's deployment is `{public}@{backend}/{node_id}` on backend
`{backend}/{node_id}` (e.g. `smollm2@edge/plant7-a`): one id per node, so stats, circuits and the ledger's
`backend` column are per node. Labels are the backend's config labels under the node's effective ones; the
price is the deployment's per-token price if configured, else the hourly price of the backend's
`usd_per_hour` or, when unset, the node's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from types import MappingProxyType

from backends.base import BackendKind
from gateway.config import Config, EdgeBackendConfig
from gateway.live.stats import Prior
from routing.decision import Price
from routing.privacy import PrivacyTier
from routing.snapshot import DeploymentSpec, DeploymentStats, HourlyPrice

NODE_SEPARATOR = "/"  # config refuses backend names containing it, so node backends never collide


@dataclass(frozen=True, slots=True)
class LiveNode:
    """What routing needs of one node (held here or by another replica); `last_seen_s` is monotonic."""

    node_id: str
    models: frozenset[str]
    labels: Mapping[str, str]
    usd_per_hour: Decimal
    tokens_per_s: float  # the node's measured decode rate of one stream (0: not measured)
    in_flight: int
    queue_depth: int
    kv_used_frac: float
    last_seen_s: float


@dataclass(frozen=True, slots=True)
class EdgeTemplate:
    """A configured deployment on an edge backend, before it meets any node."""

    public_model: str
    backend: str
    upstream_model: str
    price: Price | None  # both per-token prices set in config; None: hourly
    usd_per_hour: Decimal | None  # backends.X.usd_per_hour; None: each node's own
    quality_tier: int
    context_tokens: int | None
    labels: Mapping[str, str]
    prior: Prior


def node_backend(backend: str, node_id: str) -> str:
    return f"{backend}{NODE_SEPARATOR}{node_id}"


def split_node_backend(name: str) -> tuple[str, str] | None:
    """`edge/plant7-a` -> ("edge", "plant7-a"); None for a configured backend's name."""
    backend, sep, node_id = name.partition(NODE_SEPARATOR)
    return (backend, node_id) if sep and backend and node_id else None


def edge_templates(config: Config) -> tuple[EdgeTemplate, ...]:
    out = []
    for public, model in config.models.items():
        for dep in model.all_deployments():
            bcfg = config.backends[dep.backend]
            if not isinstance(bcfg, EdgeBackendConfig):
                continue
            usd_in, usd_out = dep.input_usd_per_mtok, dep.output_usd_per_mtok
            out.append(
                EdgeTemplate(
                    public_model=public,
                    backend=dep.backend,
                    upstream_model=dep.upstream_model or public,
                    price=Price(usd_in, usd_out) if usd_in is not None and usd_out is not None else None,
                    usd_per_hour=bcfg.usd_per_hour,
                    quality_tier=dep.quality_tier,
                    context_tokens=dep.context_tokens,
                    labels=MappingProxyType(dict(bcfg.labels)),
                    prior=Prior(bcfg.prior_ttft_ms, bcfg.prior_tokens_per_s, bcfg.prior_latency_ms),
                )
            )
    return tuple(out)


def is_live(node: LiveNode, now_s: float, ttl_s: float) -> bool:
    return now_s - node.last_seen_s <= ttl_s


def spec_for(template: EdgeTemplate, node: LiveNode) -> DeploymentSpec:
    backend = node_backend(template.backend, node.node_id)
    hourly = HourlyPrice(template.usd_per_hour if template.usd_per_hour is not None else node.usd_per_hour)
    return DeploymentSpec(
        public_model=template.public_model,
        deployment_id=f"{template.public_model}@{backend}",
        backend=backend,
        backend_kind=BackendKind.EDGE,
        upstream_model=template.upstream_model,
        privacy_tier=PrivacyTier.EDGE,
        price=template.price if template.price is not None else hourly,
        quality_tier=template.quality_tier,
        context_tokens=template.context_tokens,
        supports_tools=False,  # the node's engine takes messages and sampling settings only (wire.Request)
        supports_json=False,
        labels=MappingProxyType({**template.labels, **node.labels}),
    )


def prior_for(template: EdgeTemplate, node: LiveNode) -> Prior:
    """The config priors, with the node's measured decode rate in place of the guessed one."""
    if node.tokens_per_s <= 0:
        return template.prior
    return replace(template.prior, decode_tokens_per_s=node.tokens_per_s)


def expand(
    templates: Sequence[EdgeTemplate], nodes: Iterable[LiveNode], *, now_s: float, ttl_s: float
) -> list[tuple[EdgeTemplate, LiveNode, DeploymentSpec]]:
    """Every (template, live node serving its upstream model) pair, with the spec it routes as."""
    live = [n for n in nodes if is_live(n, now_s, ttl_s)]
    return [(t, n, spec_for(t, n)) for t in templates for n in live if t.upstream_model in n.models]


def with_node_load(stats: DeploymentStats, node: LiveNode) -> DeploymentStats:
    """The gateway's own view of a node's deployment, plus what the node's last heartbeat said: its queue
    and KV use, in-flight requests from every replica, and its measured decode rate."""
    return replace(
        stats,
        decode_tokens_per_s=node.tokens_per_s if node.tokens_per_s > 0 else stats.decode_tokens_per_s,
        in_flight=max(stats.in_flight, node.in_flight),
        queue_depth=node.queue_depth,
        kv_cache_used_frac=node.kv_used_frac,
    )
