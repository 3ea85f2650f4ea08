"""A streamed answer whose client stops reading: after `server.write_timeout_s` the gateway drops the
connection, records the request client_closed and charges what was produced, and frees the upstream.

Before, such a client held its upstream connection with no bound, and closing later left a row that said
ok/200 with every token. The gateway runs under its own server protocol (gateway/http/server.py), which
gives the app the means to abort a connection."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
import uvicorn
from starlette.types import ASGIApp

from gateway.http.app import create_app
from gateway.http.server import uvicorn_config
from gateway.store import keys
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer

TOKENS = 60_000  # about 9 MB of SSE: far more than the socket buffers hold


@pytest.fixture(scope="module")
def served(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, sa.Engine]]:
    tmp: Path = tmp_path_factory.mktemp("gw-write-timeout")
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    config = gateway_config(fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "s")})
    server = config.server.model_copy(update={"write_timeout_s": 1.0})
    config = config.model_copy(update={"server": server})
    app = create_app(config)

    def make(app: ASGIApp, port: int) -> uvicorn.Config:
        return uvicorn_config(app, config, host="127.0.0.1", port=port, access_log=False, log_level="warning")

    with LiveServer(app, make_config=make) as srv:
        db = make_engine(config.database.url)
        try:
            yield srv.base_url, db
        finally:
            db.dispose()


def test_a_client_that_stops_reading_is_cut_off_and_charged(
    served: tuple[str, sa.Engine], fake: FakeProvider
) -> None:
    base_url, db = served
    fake.configure("mslow", ttft_ms=0, tokens_per_s=0, n_tokens=TOKENS)
    key = keys.create_key(db, "alpha", name="stalls", models=None, expires_at=None)
    body = orjson.dumps({"model": "mslow", "messages": [{"role": "user", "content": "x"}], "stream": True})
    port = int(base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key.plaintext}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # then read nothing more
        row = None
        deadline = time.monotonic() + 30
        while row is None and time.monotonic() < deadline:
            time.sleep(0.2)
            with db.connect() as conn:
                row = conn.execute(
                    sa.text("SELECT status, http_status, completion_tokens, cost_micro_usd FROM usage "
                            "WHERE key_id = :k"),
                    {"k": key.key_id},
                ).first()  # fmt: skip
        assert row is not None, "the stalled stream was never recorded"
        assert (row.status, row.http_status) == ("client_closed", 499)
        assert 0 < row.completion_tokens < TOKENS and row.cost_micro_usd > 0
        # The connection was dropped: reading on finds its end (or a reset), not the rest of the answer.
        sock.settimeout(10)
        received = 0
        try:
            while chunk := sock.recv(1 << 16):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < TOKENS * 100
    finally:
        sock.close()
        fake.configure("mslow", n_tokens=8)
