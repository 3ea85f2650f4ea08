"""An edge node dialling a TLS gateway: with the CA from `--ca-file` it enrolls; with another CA, or with the
system's CAs only, it does not, and its log says to pass `--ca-file`. Runs the tiny random-weight model."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.edge.node import EXIT_OK, NodeOptions, run_node  # noqa: E402
from backends.local.loader import LoadedModel  # noqa: E402
from tests.support.edge_node import TOKEN, FakeGateway, tiny_loaded, wait_for  # noqa: E402
from tests.support.tls import Certificates, make_certificates  # noqa: E402

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_loaded()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certificates]:
    yield make_certificates(tmp_path_factory.mktemp("tls"))


def _server_tls(certs: Certificates) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_pem)
    return ctx


def _options(gateway: FakeGateway, ca_file: Path | None) -> NodeOptions:
    return NodeOptions(
        gateway_url=gateway.url,
        token=TOKEN,
        node_id="plant7-tls",
        served_name="tiny-edge",
        kv_cache_mb=2,
        max_batch=2,
        measure_tokens=0,
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        ca_file=None if ca_file is None else str(ca_file),
    )


async def test_a_node_with_the_gateways_ca_enrolls_over_wss(certs: Certificates, tiny: LoadedModel) -> None:
    async with FakeGateway(tls=_server_tls(certs)) as gw:
        assert gw.url.startswith("https://")
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(_options(gw, certs.ca_file), stop=stop, loaded=tiny))
        conn = await gw.next_connection()
        assert conn.hello.node_id == "plant7-tls"
        stop.set()
        assert await asyncio.wait_for(task, 30) == EXIT_OK


@pytest.mark.parametrize("trust", ["other-ca", "system-cas"])
async def test_a_node_that_does_not_trust_the_certificate_says_to_pass_ca_file(
    certs: Certificates, tiny: LoadedModel, caplog: pytest.LogCaptureFixture, trust: str
) -> None:
    caplog.set_level(logging.INFO, logger="backends.edge.node")
    ca_file = certs.other_ca_file if trust == "other-ca" else None

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]

    async with FakeGateway(tls=_server_tls(certs)) as gw:
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(_options(gw, ca_file), stop=stop, loaded=tiny))
        await wait_for(lambda: len(errors()) >= 2, timeout_s=20)  # it keeps retrying, each time saying why
        assert gw.connections.empty() and gw.auth_headers == []  # nothing, not even the token, was sent
        stop.set()
        assert await asyncio.wait_for(task, 30) == EXIT_OK
    message = errors()[0]
    assert "TLS certificate" in message and "not trusted" in message and "--ca-file" in message
    if ca_file is not None:
        assert str(ca_file) in message
