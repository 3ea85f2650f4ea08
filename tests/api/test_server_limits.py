"""The served connection's limits (gateway/http/server.py) over raw loopback sockets: slow and huge request
heads, header counts, connection caps per address and in total, X-Forwarded-* trust, no `server` header.

An echo app stands in for the gateway: the limits live in the protocol, below any app. Clients bind other
loopback addresses (127.0.0.2, ...) to act as other peers.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.sync.client import connect as ws_connect

from gateway.config import Config, parse_config
from gateway.http.server import uvicorn_config
from tests.support.live import LiveServer


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every request with its client address and scheme; accepts WebSockets and waits."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"client": scope["client"][0], "scheme": scope["scheme"]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(**server: Any) -> Iterator[LiveServer]:
    cfg: Config = parse_config({"server": server})

    def make(app: ASGIApp, port: int) -> uvicorn.Config:
        return uvicorn_config(app, cfg, host="127.0.0.1", port=port, access_log=False, log_level="warning")

    with LiveServer(echo, make_config=make) as srv:
        yield srv


def dial(srv: LiveServer, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Everything until the server closes (or `timeout_s`)."""
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def get(srv: LiveServer, source: str = "127.0.0.1", headers: str = "") -> bytes:
    with dial(srv, source) as sock:
        sock.sendall(f"GET /x HTTP/1.1\r\nHost: gw\r\n{headers}Connection: close\r\n\r\n".encode())
        return read_all(sock)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    return int(response[9:12])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_slow_heads_are_answered_408_and_closed_within_the_timeout_while_others_are_served() -> None:
    with serving(header_timeout_s=1.0) as srv:
        # Measured before dialing: the server's head timer starts when it accepts, which may come before a
        # timestamp taken after `dial` returns (a close at 0.99995 s "before" the timeout was seen that way).
        opened_s = time.monotonic()
        slow = [dial(srv) for _ in range(4)]
        silent = dial(srv)  # connects and never sends a byte
        closed_after_s: dict[int, float] = {}
        for sock in slow:
            sock.sendall(b"GET /x HTTP/1.1\r\n")
            sock.setblocking(False)
        served_in_s: float | None = None
        answers = {i: b"" for i in range(len(slow))}
        while time.monotonic() - opened_s < 6.0 and len(closed_after_s) < len(slow):
            for i, sock in enumerate(slow):  # one byte per connection every 0.1 s: never a whole head
                if i not in closed_after_s:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
            readable, _, _ = select.select(
                [s for i, s in enumerate(slow) if i not in closed_after_s], [], [], 0.1
            )
            for sock in readable:
                i = slow.index(sock)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                answers[i] += chunk
                if not chunk:
                    closed_after_s[i] = time.monotonic() - opened_s
            if served_in_s is None and time.monotonic() - opened_s > 0.3:
                started = time.monotonic()
                assert httpx.get(srv.base_url + "/x", timeout=5).status_code == 200
                served_in_s = time.monotonic() - started
        assert sorted(closed_after_s) == [0, 1, 2, 3], f"still open after 6 s: {closed_after_s}"
        # The timeout is 1 s; the slack is for a loaded 2-core machine (the finding: still open after 75 s).
        # Below: uvicorn's loop is uvloop when installed, whose timers run on libuv's millisecond clock, read
        # once per loop iteration, so a 1 s timer may fire up to ~1 ms early (0.9999 s was seen in CI).
        assert all(0.998 <= t < 4.0 for t in closed_after_s.values()), closed_after_s
        assert all(status_of(a) == 408 and b"request_timeout" in a for a in answers.values())
        assert served_in_s is not None and served_in_s < 2.0
        assert read_all(silent, timeout_s=2.0) == b""  # the idle connection is closed quietly
        for sock in (*slow, silent):
            sock.close()


def ask(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Sends one keep-alive GET and reads its response (content-length body) off the connection."""
    sock.sendall(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_an_idle_kept_alive_connection_outlives_the_head_timeout_until_keep_alive_s() -> None:
    # The race this prevents (bench/chaos): server and client closing an idle connection at the same moment.
    with serving(header_timeout_s=1.0, keep_alive_s=4.0) as srv:
        with dial(srv) as sock:
            assert status_of(ask(sock)) == 200
            time.sleep(1.8)  # idle past the head timeout: the connection stays for the next request
            assert status_of(ask(sock)) == 200
            idle_from = time.monotonic()
            assert read_all(sock, timeout_s=10.0) == b""  # closed quietly once idle for keep_alive_s
            assert 3.0 <= time.monotonic() - idle_from < 8.0
        with dial(srv) as sock:  # a later request's head is still bounded, from its first byte
            assert status_of(ask(sock)) == 200
            time.sleep(1.5)
            sock.sendall(b"GET /x HTTP/1.1\r\n")
            started = time.monotonic()
            answer = read_all(sock, timeout_s=6.0)
            assert status_of(answer) == 408 and b"request_timeout" in answer
            assert 0.9 <= time.monotonic() - started < 4.0


def test_a_huge_unterminated_header_gets_431_without_growing_memory() -> None:
    with serving() as srv, dial(srv) as sock:
        assert status_of(get(srv)) == 200  # warm: the first request's allocations are not counted
        before = rss_bytes()
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: gw\r\nX-Big: ")
        piece, sent = b"a" * 65536, 0
        deadline = time.monotonic() + 10
        while sent < 16 * 2**20 and time.monotonic() < deadline:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered
            try:
                sock.sendall(piece)
            except OSError:
                break
            sent += len(piece)
        answer = read_all(sock)
        grown = rss_bytes() - before
    assert status_of(answer) == 431 and b"request_header_fields_too_large" in answer
    assert b"connection: close" in answer
    assert sent < 4 * 2**20, f"the server read {sent} bytes of one header before refusing it"
    assert grown < 8 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"


def test_a_head_over_the_byte_limit_in_one_piece_gets_431() -> None:
    with serving(max_header_bytes=4096) as srv:
        assert status_of(get(srv, headers="X-A: " + "a" * 3000 + "\r\n")) == 200
        assert status_of(get(srv, headers="X-A: " + "a" * 5000 + "\r\n")) == 431


def test_more_header_fields_than_allowed_get_431() -> None:
    with serving(max_headers=20) as srv:
        fields = "".join(f"X-{i}: v\r\n" for i in range(18))  # + Host and Connection: 20
        assert status_of(get(srv, headers=fields)) == 200
        answer = get(srv, headers=fields + "X-Extra: v\r\n")
        assert status_of(answer) == 431 and b"more than 20 header fields" in answer


def test_connections_are_capped_per_address_and_in_total_and_slots_come_back() -> None:
    with serving(max_connections_per_client=3, max_connections=5) as srv:
        held = [dial(srv) for _ in range(3)]
        refused = get(srv)  # a 4th from 127.0.0.1
        assert status_of(refused) == 503 and b"retry-after: 1" in refused
        assert status_of(get(srv, source="127.0.0.2")) == 200  # another address is still served
        other = dial(srv, "127.0.0.2")
        with dial(srv, "127.0.0.3"):  # 5 open: the total is reached
            assert status_of(get(srv, source="127.0.0.4")) == 503
        held.pop().close()
        deadline = time.monotonic() + 5
        while status_of(answer := get(srv)) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices the close on its next loop turn
        assert status_of(answer) == 200
        for sock in (*held, other):
            sock.close()


def test_a_websocket_holds_its_slot_until_it_closes() -> None:
    with serving(max_connections_per_client=2) as srv:
        ws_url = srv.base_url.replace("http", "ws") + "/ws"
        with ws_connect(ws_url, open_timeout=5), dial(srv):
            assert status_of(get(srv)) == 503
        deadline = time.monotonic() + 5
        while status_of(answer := get(srv)) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status_of(answer) == 200


def test_forwarded_headers_are_ignored_unless_the_peer_is_a_trusted_proxy() -> None:
    forged = "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
    with serving() as srv:  # uvicorn's own default believes any loopback peer
        answer = get(srv, headers=forged)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"client": "127.0.0.1", "scheme": "http"}
    with serving(trusted_proxies=["127.0.0.0/30"]) as srv:
        answer = get(srv, headers=forged)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"client": "203.0.113.9", "scheme": "https"}
        answer = get(srv, source="127.0.0.5", headers=forged)  # outside the trusted network
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"client": "127.0.0.5", "scheme": "http"}


def test_trusted_proxies_are_exempt_from_the_per_address_cap() -> None:
    with serving(max_connections_per_client=1, trusted_proxies=["127.0.0.1"]) as srv:
        with dial(srv), dial(srv):
            assert status_of(get(srv)) == 200
        with dial(srv, "127.0.0.2"):
            assert status_of(get(srv, source="127.0.0.2")) == 503


def test_responses_carry_no_server_header() -> None:
    with serving() as srv:
        response = httpx.get(srv.base_url + "/x", timeout=5)
    assert response.status_code == 200
    assert "server" not in response.headers and "date" in response.headers


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"trusted_proxies": ["*"]}, "server.trusted_proxies.0"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "is not an IP address or CIDR"),
        ({"tls_key_file": "key.pem"}, "set server.tls_cert_file too"),
        ({"max_header_bytes": 100}, "server.max_header_bytes"),
    ],
)
def test_bad_server_settings_name_their_path(setting: dict[str, Any], message: str) -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config({"server": setting})
