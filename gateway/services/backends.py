"""Configured backends and the deployments of each public model, with their prices.

Prices come from config, else from a backend that knows list prices (litellm's local cost map for the cloud
backend); a cloud deployment with neither is recorded at cost 0, with a warning naming the settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from decimal import Decimal
from typing import Protocol, runtime_checkable

from backends.base import Backend, BackendKind
from gateway.config import (
    CloudBackendConfig,
    Config,
    ConfigError,
    DeploymentConfig,
    EdgeBackendConfig,
    OpenAIBackendConfig,
)
from gateway.edge.pool import split_node_backend
from gateway.live.state import is_edge
from gateway.metrics import Capacity, CapacityOf
from routing.decision import FREE, Deployment, Price
from routing.privacy import PrivacyTier

log = logging.getLogger("switchboard")


@runtime_checkable
class PriceSource(Protocol):
    """A backend that knows list prices (the cloud backend reads litellm's local cost map)."""

    def price_usd_per_mtok(self, model: str) -> tuple[Decimal, Decimal] | None: ...


def missing_secrets(config: Config) -> list[str]:
    """One line per `api_key_env` of a backend, or `files.s3.*_env`, naming an unset variable (checked before
    serving)."""
    named = [(f"backends.{name}.api_key_env", b.api_key_env) for name, b in config.backends.items()]
    s3 = config.files.s3
    if config.files.storage == "s3" and s3 is not None:
        secrets = ("access_key_id_env", "secret_access_key_env", "session_token_env")
        named += [(f"files.s3.{setting}", getattr(s3, setting)) for setting in secrets]
    return [
        f"{path}: environment variable {env} is not set (export it)"
        for path, env in named
        if env and not os.environ.get(env)
    ]


def _secret(env_name: str | None, path: str) -> str | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError("environment", [f"{path}: environment variable {env_name} is not set (export it)"])
    return value


def build_backend(name: str, cfg: CloudBackendConfig | OpenAIBackendConfig) -> Backend:
    """A configured backend (kind "edge" has none: its nodes' backends come from the edge hub)."""
    api_key = _secret(cfg.api_key_env, f"backends.{name}.api_key_env")
    if isinstance(cfg, CloudBackendConfig):
        from backends.cloud import CloudBackend  # imports litellm: only when a cloud backend is configured

        return CloudBackend(
            name, cfg.provider, api_key=api_key, api_base=cfg.api_base, timeout_s=cfg.timeout_s
        )
    from backends.openai_compat import OpenAICompatBackend

    return OpenAICompatBackend(
        name,
        cfg.base_url,
        api_key=api_key,
        timeout_s=cfg.timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
        max_connections=cfg.max_connections,
        supports_tools=cfg.supports_tools,
        supports_response_format=cfg.supports_response_format,
        send_priority=cfg.send_priority,
    )


def _price(public: str, dep: DeploymentConfig, upstream: str, backend: Backend) -> Price:
    if dep.input_usd_per_mtok is not None and dep.output_usd_per_mtok is not None:
        return Price(dep.input_usd_per_mtok, dep.output_usd_per_mtok)
    if isinstance(backend, PriceSource):
        listed = backend.price_usd_per_mtok(upstream)
        if listed is not None:
            return Price(
                dep.input_usd_per_mtok if dep.input_usd_per_mtok is not None else listed[0],
                dep.output_usd_per_mtok if dep.output_usd_per_mtok is not None else listed[1],
            )
    if backend.info.kind is BackendKind.CLOUD:
        log.warning(
            "model %s on backend %s: no price known; cost is recorded as 0 "
            "(set input_usd_per_mtok and output_usd_per_mtok under models.%s)",
            public,
            dep.backend,
            public,
        )
    return FREE


def build_deployments(config: Config, backends: Mapping[str, Backend]) -> dict[str, tuple[Deployment, ...]]:
    out: dict[str, tuple[Deployment, ...]] = {}
    for public, model in config.models.items():
        deps = []
        for dep in model.all_deployments():
            if is_edge(config.backends[dep.backend]):
                continue  # one deployment per live node, made at snapshot time (gateway/edge/pool.py)
            backend = backends[dep.backend]
            upstream = dep.upstream_model or public
            deps.append(
                Deployment(
                    public_model=public,
                    backend=dep.backend,
                    backend_kind=backend.info.kind,
                    upstream_model=upstream,
                    price=_price(public, dep, upstream, backend),
                    supports_tools=backend.info.supports_tools,
                    supports_response_format=backend.info.supports_response_format,
                    context_tokens=dep.context_tokens,
                )
            )
        out[public] = tuple(deps)
    return out


def build_batch_prices(
    config: Config, deployments: Mapping[str, tuple[Deployment, ...]]
) -> dict[tuple[str, str], Price]:
    """(public model, backend) -> batch price, for deployments that name one (models.X.batch_*); a side
    left unset keeps the interactive price."""
    prices: dict[tuple[str, str], Price] = {}
    for public, model in config.models.items():
        interactive = {d.backend: d.price for d in deployments.get(public, ())}
        for dep in model.all_deployments():
            usual = interactive.get(dep.backend)
            if usual is None or (
                dep.batch_input_usd_per_mtok is None and dep.batch_output_usd_per_mtok is None
            ):
                continue
            prices[(public, dep.backend)] = Price(
                usual.input_usd_per_mtok
                if dep.batch_input_usd_per_mtok is None
                else dep.batch_input_usd_per_mtok,
                usual.output_usd_per_mtok
                if dep.batch_output_usd_per_mtok is None
                else dep.batch_output_usd_per_mtok,
            )
    return prices


def capacity_classes(config: Config) -> CapacityOf:
    """A ledger backend name -> its capacity class: cloud backends and external-tier servers are cloud,
    edge backends (and their nodes, `<edge backend>/<node id>`) and edge-tier servers edge, the rest owned."""
    classes: dict[str, Capacity] = {}
    for name, bcfg in config.backends.items():
        external = bcfg.tier in (PrivacyTier.EXTERNAL, PrivacyTier.EXTERNAL_ZDR)
        if isinstance(bcfg, CloudBackendConfig) or external:
            classes[name] = Capacity.CLOUD
        elif isinstance(bcfg, EdgeBackendConfig) or bcfg.tier is PrivacyTier.EDGE:
            classes[name] = Capacity.EDGE
        else:
            classes[name] = Capacity.OWNED

    def capacity_of(backend: str) -> Capacity:
        found = classes.get(backend)
        if found is None:
            node = split_node_backend(backend)
            found = classes.get(node[0]) if node is not None else None
        return Capacity.NONE if found is None else found

    return capacity_of
