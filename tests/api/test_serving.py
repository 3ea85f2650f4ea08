"""The gateway as `switchboard serve` runs it (gateway/http/server.py): TLS with a test-made CA for the OpenAI
SDK, httpx and the edge WebSocket; TLS settings that cannot work; no `server` header; no slash redirects."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.types import ASGIApp
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from backends.edge.options import client_ssl_context, connect_url
from gateway.config import Config, ConfigError, parse_config
from gateway.http.app import create_app
from gateway.http.server import server_ssl_context, uvicorn_config
from gateway.store import keys
from gateway.store.db import make_engine
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.tls import Certificates, make_certificates


@dataclass(frozen=True, slots=True)
class TlsGateway:
    base_url: str
    certs: Certificates
    api_key: str


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def _config(fake: FakeProvider, tmp: Path, **server: Any) -> Config:
    return parse_config(
        {
            "server": server,
            "database": {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "spill.jsonl")},
            "backends": {
                "fakeoai": {"kind": "openai", "base_url": fake.base_url + "/v1"},
                "edge": {"kind": "edge"},
            },
            "models": {"fast": {"backend": "fakeoai"}},
            "teams": {"alpha": {}},
        }
    )


def _served(config: Config) -> LiveServer:
    def make(app: ASGIApp, port: int) -> uvicorn.Config:
        return uvicorn_config(app, config, host="127.0.0.1", port=port, access_log=False, log_level="warning")

    return LiveServer(create_app(config), make_config=make)


@pytest.fixture(scope="module")
def tls_gateway(
    fake: FakeProvider, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsGateway]:
    tmp = tmp_path_factory.mktemp("gw-tls")
    config = _config(fake, tmp, tls_cert_file=str(certs.server_pem))
    with _served(config) as server:
        db = make_engine(config.database.url)
        try:
            key = keys.create_key(db, "alpha", name="tls", models=None, expires_at=None).plaintext
            yield TlsGateway(server.base_url, certs, key)
        finally:
            db.dispose()


def test_the_openai_sdk_is_served_over_tls_with_the_ca(tls_gateway: TlsGateway) -> None:
    assert tls_gateway.base_url.startswith("https://")
    with httpx.Client(verify=ssl.create_default_context(cafile=tls_gateway.certs.ca_file)) as http:
        client = openai.OpenAI(
            base_url=tls_gateway.base_url + "/v1", api_key=tls_gateway.api_key, http_client=http
        )
        reply = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        health = http.get(tls_gateway.base_url + "/healthz")
    assert health.status_code == 200 and "server" not in health.headers


def test_a_client_without_the_ca_is_refused(tls_gateway: TlsGateway) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls_gateway.base_url + "/healthz", timeout=5)
    other = ssl.create_default_context(cafile=tls_gateway.certs.other_ca_file)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls_gateway.base_url + "/healthz", verify=other, timeout=5)
    with pytest.raises(
        (httpx.RemoteProtocolError, httpx.ConnectError)
    ):  # plain http to the TLS port: no answer
        httpx.get(tls_gateway.base_url.replace("https", "http") + "/healthz", timeout=5)


def test_the_edge_websocket_handshakes_over_wss_with_the_nodes_ssl_context(tls_gateway: TlsGateway) -> None:
    url = connect_url(tls_gateway.base_url)
    assert url.startswith("wss://")

    async def refusal(ca_file: str) -> int:
        tls = client_ssl_context(url, ca_file)
        headers = {"Authorization": "Bearer sbe_not_a_token"}
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(url, ssl=tls, additional_headers=headers, open_timeout=5):
                pass
        return refused.value.response.status_code

    # The handshake got through TLS and the guarded protocol; the hub refused the token before the upgrade.
    assert asyncio.run(refusal(str(tls_gateway.certs.ca_file))) == 401
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(refusal(str(tls_gateway.certs.other_ca_file)))


def test_tls_min_version_13_refuses_a_tls12_client(
    fake: FakeProvider, certs: Certificates, tmp_path: Path
) -> None:
    config = _config(fake, tmp_path, tls_cert_file=str(certs.server_pem), tls_min_version="1.3")
    ctx = ssl.create_default_context(cafile=certs.ca_file)
    with _served(config) as server:
        assert httpx.get(server.base_url + "/healthz", verify=ctx, timeout=5).status_code == 200
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.base_url + "/healthz", verify=ctx, timeout=5)


def test_unusable_tls_files_name_the_setting(certs: Certificates, tmp_path: Path) -> None:
    missing = parse_config({"server": {"tls_cert_file": str(tmp_path / "nope.pem")}})
    with pytest.raises(ConfigError, match=r"server\.tls_cert_file.*cannot read .*nope\.pem"):
        server_ssl_context(missing.server)
    no_key = parse_config({"server": {"tls_cert_file": str(certs.ca_file)}})  # a certificate without its key
    with pytest.raises(ConfigError, match=r"server\.tls_cert_file.*not a PEM certificate with its matching"):
        server_ssl_context(no_key.server)


def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_callers_host(tls_gateway: TlsGateway) -> None:
    verify = ssl.create_default_context(cafile=tls_gateway.certs.ca_file)
    headers = {"Host": "evil.example", "Authorization": f"Bearer {tls_gateway.api_key}"}
    with httpx.Client(verify=verify, follow_redirects=False, timeout=5) as http:
        for method, path in [("GET", "/v1/models/"), ("GET", "/healthz/"), ("POST", "/v1/chat/completions/")]:
            response = http.request(method, tls_gateway.base_url + path, headers=headers)
            assert response.status_code == 404, (method, path)
            assert "location" not in response.headers
            error = response.json()["error"]
            assert error["code"] == "not_found" and error["type"] == "invalid_request_error"
            assert "evil.example" not in response.text
